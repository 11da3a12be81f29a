"""The children a supervisor holds: each child's state and its current run, by name.

A :class:`Child` is a spec the supervisor keeps (running, restarting or terminated); a
:class:`Run` is one instance of it, a task in the supervisor's nursery. A child removed while
its run is still going (it outlived its ``shutdown_timeout``) leaves that run *lingering*:
nothing of that name starts before it has finished, so two instances never run at once.
"""

from __future__ import annotations

from collections import deque

import attrs
import trio

from ._specs import ChildCounts, ChildInfo, ChildSpec, ChildState

__all__ = ["Child", "ChildTable", "Run"]


@attrs.define(eq=False)
class Run:
    """One run of a child: its cancel scope and how it ended."""

    scope: trio.CancelScope
    done: trio.Event = attrs.Factory(trio.Event)
    task: trio.lowlevel.Task = attrs.field(init=False)  # set as the run begins
    started: bool = False
    stopping: bool = False
    overdue: bool = False  # still running past its shutdown_timeout


@attrs.define(eq=False)
class Child:
    """A supervised child: its spec, its current run and what the supervisor did with it."""

    spec: ChildSpec
    takes_status: bool
    run: Run
    state: ChildState = "starting"
    restarts: int = 0
    started_at: float | None = None
    recent_restarts: deque[float] = attrs.Factory(deque)


class ChildTable:
    """The supervised children in start order, and the lingering runs of removed ones."""

    def __init__(self) -> None:
        self.children: dict[str, Child] = {}
        self.lingering: dict[str, Run] = {}  # runs of removed children, not finished yet

    def get(self, name: str) -> Child:
        """The child ``name``; ``KeyError`` naming the supervised children if there is none."""
        child = self.children.get(name)
        if child is None:
            raise KeyError(f"no child named {name!r}; supervised: {sorted(self.children)}")
        return child

    def terminated(self, name: str, action: str) -> Child:
        """The child ``name``, which must be terminated for it to be ``action``."""
        child = self.get(name)
        if child.state != "terminated":
            raise RuntimeError(
                f"child {name!r} is {child.state}; only a terminated child can be {action} "
                "(call terminate_child first)"
            )
        return child

    def holds(self, child: Child) -> bool:
        """Whether ``child`` is still the one supervised under its name."""
        return self.children.get(child.spec.name) is child

    def in_use(self, name: str) -> bool:
        """Whether a child, or a run of a removed one, goes by ``name``."""
        return name in self.children or name in self.lingering

    def forget(self, child: Child) -> None:
        """Remove ``child``; a run of it still going lingers until it finishes."""
        if self.holds(child):
            del self.children[child.spec.name]
            self.prune_lingering()
            if not child.run.done.is_set():
                self.lingering[child.spec.name] = child.run

    def prune_lingering(self) -> None:
        for name, run in list(self.lingering.items()):
            if run.done.is_set():
                del self.lingering[name]

    def infos(self) -> tuple[ChildInfo, ...]:
        return tuple(
            ChildInfo(c.spec.name, c.spec.restart, c.state, c.restarts, c.started_at)
            for c in self.children.values()
        )

    def counts(self) -> ChildCounts:
        self.prune_lingering()
        children = self.children.values()
        runs = [c.run for c in children] + list(self.lingering.values())
        return ChildCounts(
            specs=len(children),
            active=sum(c.state == "running" for c in children),
            terminated=sum(c.state == "terminated" for c in children),
            overdue=sum(r.overdue and not r.done.is_set() for r in runs),
        )
