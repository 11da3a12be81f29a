"""An Erlang/OTP-style supervisor built on a trio nursery.

``open_supervisor()`` is an async context manager yielding a :class:`Supervisor`. Children are
described by :class:`ChildSpec` and started with :meth:`Supervisor.start_child`; each runs as a
task in the supervisor's nursery, in a cancel scope of its own. When a child returns or raises,
its restart type decides whether it comes back, the strategy decides which siblings restart with
it, and the restart intensity (``max_restarts`` within ``within`` seconds) decides when the
supervisor gives up with :class:`SupervisorError`. Restarts wait an exponential, jittered
backoff (:func:`backoff_delay`), and never start a child while its previous instance is still
running. When the block exits, children are stopped in reverse start order and none is left
running. ``open_dynamic_supervisor()`` is the template form (OTP's ``simple_one_for_one``):
many children of one spec. See ``docs/supervisor.md``.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from random import Random
from typing import Literal, NoReturn

import attrs
import trio

from ._groups import unwrap_single

__all__ = [
    "AutoShutdown",
    "ChildCounts",
    "ChildFailure",
    "ChildInfo",
    "ChildSpec",
    "ChildState",
    "DynamicChild",
    "DynamicSupervisor",
    "RestartType",
    "Strategy",
    "Supervisor",
    "SupervisorError",
    "backoff_delay",
    "open_dynamic_supervisor",
    "open_supervisor",
]

logger = logging.getLogger("plugin_execution.supervisor")

Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
RestartType = Literal["permanent", "transient", "temporary"]
ChildState = Literal["starting", "running", "restarting", "stopping", "terminated"]
AutoShutdown = Literal["never", "any_significant", "all_significant"]

_STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")
_RESTART_TYPES = ("permanent", "transient", "temporary")
_AUTO_SHUTDOWNS = ("never", "any_significant", "all_significant")

# Past its deadline a cancelled child still gets this many scheduling rounds to finish: a
# cleanup that takes no time (a few checkpoints, all cancelled at once) is never overdue, even
# with shutdown_timeout=0, whatever order trio runs the child and the supervisor in.
_GRACE_ROUNDS = 8


@attrs.frozen
class ChildSpec:
    """How to run one child.

    ``start`` is an async callable; if it has a ``task_status`` parameter it is started with
    :meth:`trio.Nursery.start` semantics and counts as started once it calls
    ``task_status.started()``. ``restart``: ``"permanent"`` children are always restarted,
    ``"transient"`` ones only after raising, ``"temporary"`` ones never. ``shutdown_timeout``
    is how long stopping the child waits for it to finish after cancelling it (0: no time at
    all, OTP's ``brutal_kill``). A ``significant`` child (transient or temporary only) ends its
    supervisor when it ends on its own, as the supervisor's ``auto_shutdown`` says.
    """

    name: str = attrs.field(
        validator=attrs.validators.and_(
            attrs.validators.instance_of(str), attrs.validators.min_len(1)
        )
    )
    start: Callable[..., Awaitable[object]] = attrs.field(validator=attrs.validators.is_callable())
    restart: RestartType = attrs.field(
        default="permanent", validator=attrs.validators.in_(_RESTART_TYPES)
    )
    shutdown_timeout: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    significant: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    def __attrs_post_init__(self) -> None:
        if self.significant and self.restart == "permanent":
            raise ValueError(
                f"child {self.name!r}: a significant child must be 'transient' or 'temporary' "
                "(a permanent child never ends on its own, so it could never end its supervisor)"
            )


@attrs.frozen
class ChildInfo:
    """A snapshot of one child: ``started_at`` is the ``trio.current_time()`` of its last start.

    ``restarts`` counts the restarts the supervisor made, not :meth:`Supervisor.restart_child`.
    """

    name: str
    restart: RestartType
    state: ChildState
    restarts: int
    started_at: float | None


@attrs.frozen
class ChildCounts:
    """What :meth:`Supervisor.count_children` reports.

    ``specs``: children held (any state); ``active``: children running; ``terminated``: children
    stopped by ``terminate_child`` whose spec is kept; ``overdue``: instances still running after
    their ``shutdown_timeout`` passed (including those of children since removed).
    """

    specs: int
    active: int
    terminated: int
    overdue: int


@attrs.frozen
class ChildFailure:
    """A child raised ``exception`` at ``trio.current_time()`` ``at``."""

    child: str
    exception: Exception
    at: float


@attrs.frozen
class DynamicChild:
    """A child started by :meth:`DynamicSupervisor.start_child`: its name and started value."""

    name: str
    value: object


class SupervisorError(Exception):
    """The supervisor gave up: restarts exceeded ``max_restarts`` within ``within`` seconds, or
    a child to restart was still running long after it was cancelled.

    ``failures`` holds the most recent child failures, oldest first.
    """

    def __init__(self, message: str, failures: tuple[ChildFailure, ...]) -> None:
        super().__init__(message)
        self.failures = failures


def backoff_delay(
    attempt: int, *, initial: float, factor: float, maximum: float, jitter: float, rng: Random
) -> float:
    """Seconds to wait before a child's ``attempt``-th restart in a row (``attempt >= 1``).

    ``min(maximum, initial * factor ** (attempt - 1))`` times a factor drawn uniformly from
    ``[1 - jitter, 1 + jitter]`` with ``rng``.
    """
    try:
        grown = initial * factor ** (attempt - 1)
    except OverflowError:  # factor ** (attempt - 1) beyond a float: far past any cap
        grown = maximum if initial else 0.0
    return min(maximum, grown) * rng.uniform(1 - jitter, 1 + jitter)


@attrs.frozen
class _Policy:
    strategy: Strategy = attrs.field(validator=attrs.validators.in_(_STRATEGIES))
    max_restarts: int = attrs.field(
        validator=[attrs.validators.instance_of(int), attrs.validators.ge(0)]
    )
    within: float = attrs.field(validator=attrs.validators.gt(0))
    backoff_initial: float = attrs.field(validator=attrs.validators.ge(0))
    backoff_max: float = attrs.field(validator=attrs.validators.ge(0))
    backoff_factor: float = attrs.field(validator=attrs.validators.ge(1))
    jitter: float = attrs.field(validator=[attrs.validators.ge(0), attrs.validators.le(1)])
    auto_shutdown: AutoShutdown = attrs.field(
        default="never", validator=attrs.validators.in_(_AUTO_SHUTDOWNS)
    )


@attrs.define(eq=False)
class _Run:
    """One run of a child: its cancel scope and how it ended."""

    scope: trio.CancelScope
    done: trio.Event = attrs.Factory(trio.Event)
    task: trio.lowlevel.Task = attrs.field(init=False)  # set as the run begins
    started: bool = False
    stopping: bool = False
    overdue: bool = False  # still running past its shutdown_timeout


@attrs.define(eq=False)
class _Child:
    spec: ChildSpec
    takes_status: bool
    run: _Run
    state: ChildState = "starting"
    restarts: int = 0
    started_at: float | None = None
    recent_restarts: deque[float] = attrs.Factory(deque)


class _Status:
    """The ``task_status`` a child sees: forwards ``started()`` and marks the run started."""

    def __init__(
        self, supervisor: Supervisor, child: _Child, run: _Run, status: trio.TaskStatus[object]
    ) -> None:
        self._supervisor = supervisor
        self._child = child
        self._run = run
        self._status = status

    def started(self, value: object = None) -> None:
        self._supervisor._mark_started(self._child, self._run, self._status, value)


_Exit = tuple[_Child, _Run, Exception | None]


class Supervisor:
    """Supervises children in a nursery. Made by :func:`open_supervisor`, not directly."""

    def __init__(
        self, nursery: trio.Nursery, policy: _Policy, rng: Random, *, ordered: bool = True
    ) -> None:
        self._nursery = nursery
        self._policy = policy
        self._rng = rng
        self._ordered = ordered  # False: shutdown stops all children at once (dynamic form)
        self._children: dict[str, _Child] = {}
        self._lingering: dict[str, _Run] = {}  # runs of removed children, not finished yet
        self._failures: deque[ChildFailure] = deque(maxlen=policy.max_restarts + 1)
        self._recent_restarts: deque[float] = deque()
        self._restart_count = 0
        self._closing = False
        self._body_scope = trio.CancelScope()  # cancelled by auto_shutdown
        self._manager_scope = trio.CancelScope(shield=True)
        self._exits_in, self._exits = trio.open_memory_channel[_Exit](float("inf"))

    @property
    def restart_count(self) -> int:
        """Restarts so far: one per handled exit, however many children it restarted."""
        return self._restart_count

    @property
    def failures(self) -> tuple[ChildFailure, ...]:
        """The most recent failures (at most ``max_restarts + 1``), oldest first."""
        return tuple(self._failures)

    def children(self) -> tuple[ChildInfo, ...]:
        """The supervised children, in start order."""
        return tuple(
            ChildInfo(c.spec.name, c.spec.restart, c.state, c.restarts, c.started_at)
            for c in self._children.values()
        )

    def count_children(self) -> ChildCounts:
        """How many children there are, by what they are doing (see :class:`ChildCounts`)."""
        self._prune_lingering()
        children = self._children.values()
        runs = [c.run for c in children] + list(self._lingering.values())
        return ChildCounts(
            specs=len(children),
            active=sum(c.state == "running" for c in children),
            terminated=sum(c.state == "terminated" for c in children),
            overdue=sum(r.overdue and not r.done.is_set() for r in runs),
        )

    async def start_child(self, spec: ChildSpec) -> object:
        """Start a child; return once it has started, with the value it passed to ``started()``.

        A child whose ``start`` takes ``task_status`` has started when it calls
        ``task_status.started(value)``, and ``value`` is returned (as :meth:`trio.Nursery.start`
        does); an exception it raises before that propagates here and the child is not added.
        Any other child has started once scheduled, and ``None`` is returned. If an earlier
        child of that name was removed while still running, this first waits for it to finish
        (see :meth:`restart_child`): two instances of one child never run at once.

        Cancellation: cancelling the caller before the child has started cancels the child,
        which is not added; once it has started, only the supervisor stops it.

        Raises ``ValueError`` if a child of that name is already supervised (terminated ones
        included: use :meth:`restart_child` or :meth:`delete_child`) or if the spec is
        ``significant`` but ``auto_shutdown`` is ``"never"``; ``RuntimeError`` once the
        supervisor is stopping, or if the earlier instance is still running ``within`` seconds
        later.
        """
        self._check_can_add(spec)
        if spec.name in self._lingering:
            await self._previous_finished(spec.name, self._lingering[spec.name])
            self._check_can_add(spec)
        child = _Child(spec, _accepts_task_status(spec.start), _Run(trio.CancelScope()))
        self._children[spec.name] = child
        try:
            return await self._nursery.start(self._run_child, child, child.run, 0.0, True)
        except BaseException:
            self._forget(child)
            raise

    async def terminate_child(self, name: str) -> None:
        """Stop a child and keep it stopped: cancel it and wait up to its ``shutdown_timeout``.

        A temporary child is removed; any other is kept as ``"terminated"`` (as in OTP), never
        restarted by the supervisor, until :meth:`restart_child` or :meth:`delete_child`.
        Terminating a terminated child does nothing. A child still running after its
        ``shutdown_timeout`` (one that shields itself) is logged and counted ``overdue``, and
        left to finish: nothing starts it again before it has, and the supervisor's block still
        waits for it on exit.

        Cancellation: cancelling the caller only cuts the wait short; the child is cancelled
        and terminated either way. Raises ``KeyError`` for an unknown name.
        """
        await self._terminate(self._get(name), keep=True)

    async def restart_child(self, name: str) -> object:
        """Start a terminated child again from its spec; return what it passed to ``started()``.

        If its previous instance is still running (it outlived its ``shutdown_timeout``), this
        first waits for it to finish, for at most ``within`` seconds: a child is never run twice
        at once. A restart that fails before ``started()`` raises here and leaves the child
        terminated. It does not count toward the restart intensity.

        Cancellation: as :meth:`start_child`; the child stays terminated.

        Raises ``KeyError`` for an unknown name; ``RuntimeError`` if the child is not
        terminated, if the supervisor is stopping, or if its previous instance is still running
        after the wait.
        """
        child = self._terminated(name, "restarted")
        self._check_open(name)
        child.state = "starting"
        try:
            await self._previous_finished(name, child.run)
            if child.state != "starting" or self._closing:
                raise RuntimeError(f"child {name!r} was stopped before it finished starting")
            run = child.run = _Run(trio.CancelScope())
            return await self._nursery.start(self._run_child, child, run, 0.0, True)
        except BaseException:
            if self._children.get(name) is child:
                child.state = "terminated"
            raise

    def delete_child(self, name: str) -> None:
        """Remove a terminated child's spec, freeing its name. Not a checkpoint.

        Raises ``KeyError`` for an unknown name and ``RuntimeError`` if the child is not
        terminated (call :meth:`terminate_child` first).
        """
        self._forget(self._terminated(name, "deleted"))

    # -- bookkeeping ----------------------------------------------------------------------

    def _terminated(self, name: str, action: str) -> _Child:
        """The child ``name``, which must be terminated for it to be ``action``."""
        child = self._get(name)
        if child.state != "terminated":
            raise RuntimeError(
                f"child {name!r} is {child.state}; only a terminated child can be {action} "
                "(call terminate_child first)"
            )
        return child

    def _get(self, name: str) -> _Child:
        child = self._children.get(name)
        if child is None:
            raise KeyError(f"no child named {name!r}; supervised: {sorted(self._children)}")
        return child

    def _check_open(self, name: str) -> None:
        if self._closing:
            raise RuntimeError(
                f"cannot start child {name!r}: the supervisor is stopping "
                "(its block is exiting, it gave up, or a significant child ended it)"
            )

    def _check_can_add(self, spec: ChildSpec) -> None:
        self._check_open(spec.name)
        if spec.name in self._children:
            raise ValueError(
                f"a child named {spec.name!r} is already supervised; pick another name "
                "(or restart_child / delete_child a terminated one)"
            )
        if spec.significant and self._policy.auto_shutdown == "never":
            raise ValueError(
                f"child {spec.name!r} is significant but the supervisor's auto_shutdown is "
                "'never'; open it with auto_shutdown='any_significant' or 'all_significant'"
            )

    def _forget(self, child: _Child) -> None:
        if self._children.get(child.spec.name) is child:
            del self._children[child.spec.name]
            self._prune_lingering()
            if not child.run.done.is_set():
                self._lingering[child.spec.name] = child.run

    def _prune_lingering(self) -> None:
        for name, run in list(self._lingering.items()):
            if run.done.is_set():
                del self._lingering[name]

    # -- running children -----------------------------------------------------------------

    async def _run_child(
        self,
        child: _Child,
        run: _Run,
        delay: float,
        raise_before_started: bool,
        task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run ``child`` once and report how it ended to the manager.

        With ``raise_before_started`` (the ``nursery.start`` callers: ``start_child``,
        ``restart_child`` and ordered restarts), ending before ``started()`` is raised to the
        caller, not reported.
        """
        outcome: Exception | None = None
        run.task = trio.lowlevel.current_task()
        try:
            with run.scope:
                if delay:
                    await trio.sleep(delay)
                try:
                    if child.takes_status:
                        await child.spec.start(task_status=_Status(self, child, run, task_status))
                    else:
                        self._mark_started(child, run, task_status, None)
                        await child.spec.start()
                except Exception as exc:
                    if raise_before_started and not run.started:
                        raise
                    outcome = exc
        finally:
            run.done.set()
        if raise_before_started and not run.started:
            if run.stopping:
                raise RuntimeError(
                    f"child {child.spec.name!r} was stopped before it finished starting"
                )
            return  # nursery.start raises: the child returned without calling started()
        if not run.stopping:
            self._exits_in.send_nowait((child, run, outcome))

    def _mark_started(
        self, child: _Child, run: _Run, status: trio.TaskStatus[object], value: object
    ) -> None:
        status.started(value)
        run.started = True
        # Once it lives in our nursery only the supervisor stops it, in order, whatever cancels
        # the block. (If the start was cancelled, trio left it with the caller: don't shield.)
        if run.task.parent_nursery is self._nursery:
            run.scope.shield = True
        child.started_at = trio.current_time()
        if not run.stopping:
            child.state = "running"

    async def _terminate(self, child: _Child, *, keep: bool) -> None:
        """Stop ``child``; keep it as terminated (unless temporary or ``keep`` is false)."""
        if child.state == "terminated":
            if not keep:
                self._forget(child)
            return
        if not keep or child.spec.restart == "temporary":
            self._forget(child)
        try:
            await self._stop(child)
        finally:
            if self._children.get(child.spec.name) is child:
                child.state = "terminated"

    async def _stop(self, child: _Child) -> None:
        """Cancel the child's current run and wait up to its shutdown_timeout for it to end."""
        run = child.run
        run.stopping = True
        child.state = "stopping"
        run.scope.cancel()
        await self._wait_stopped(child.spec, run)

    async def _wait_stopped(self, spec: ChildSpec, run: _Run) -> None:
        """Wait for a cancelled run up to ``spec.shutdown_timeout``; past it, mark it overdue."""
        with trio.move_on_after(spec.shutdown_timeout):
            await run.done.wait()
        for _ in range(_GRACE_ROUNDS):
            if run.done.is_set():
                return
            await trio.lowlevel.cancel_shielded_checkpoint()
        if not run.done.is_set():
            run.overdue = True
            logger.warning(
                "child %r is still running %g s after it was cancelled; moving on "
                "(it will not be started again before it finishes)",
                spec.name,
                spec.shutdown_timeout,
            )

    async def _previous_finished(self, name: str, run: _Run) -> None:
        """Wait up to ``within`` s for a child's earlier run to finish, else raise RuntimeError."""
        if not await self._wait_previous(name, run):
            raise RuntimeError(
                f"child {name!r}: its previous instance is still running "
                f"{self._policy.within:g} s after this start began waiting for it; not starting "
                "a second instance (its start function ignores cancellation)"
            )

    async def _wait_previous(self, name: str, run: _Run) -> bool:
        """Whether a child's earlier run finished, waiting up to ``within`` s for it."""
        if not run.done.is_set():
            logger.warning(
                "child %r: waiting for its previous instance to finish before starting it again",
                name,
            )
            with trio.move_on_after(self._policy.within):
                await run.done.wait()
        return run.done.is_set()

    async def _stop_all(self) -> None:
        """Stop every child: one at a time in reverse start order, or all at once if not
        ordered. Terminated children are only removed."""
        children = list(self._children.values())
        running = [c for c in children if c.state != "terminated"]
        if self._ordered:
            for child in reversed(running):
                await self._stop(child)
                self._forget(child)
        else:
            async with trio.open_nursery() as nursery:
                for child in running:
                    nursery.start_soon(self._stop, child)
        for child in children:
            self._forget(child)

    async def _shutdown(self) -> None:
        """Stop restarting, then stop every child in reverse start order. Call shielded."""
        self._closing = True
        self._manager_scope.cancel()
        await self._stop_all()

    # -- restarting -----------------------------------------------------------------------

    async def _manage(self) -> None:
        """Handle child exits one at a time, so strategies never interleave."""
        with self._manager_scope:
            async for child, run, outcome in self._exits:
                await self._handle_exit(child, run, outcome)

    async def _handle_exit(self, child: _Child, run: _Run, outcome: Exception | None) -> None:
        if (
            self._closing
            or self._children.get(child.spec.name) is not child
            or child.run is not run
        ):
            return  # stale: the child was stopped or restarted since this run ended
        if outcome is not None:
            self._record_failure(child, outcome)
        restart = child.spec.restart
        if restart == "temporary" or (restart == "transient" and outcome is None):
            logger.info("child %r (%s) ended and is not restarted", child.spec.name, restart)
            self._forget(child)
            if child.spec.significant:
                self._significant_ended(child)
            return
        await self._restart(child, outcome)

    def _significant_ended(self, child: _Child) -> None:
        """A significant child ended on its own: end the supervisor if auto_shutdown says so."""
        if self._policy.auto_shutdown == "all_significant" and any(
            c.spec.significant and c.state != "terminated" for c in self._children.values()
        ):
            return
        logger.info(
            "significant child %r ended; the supervisor shuts down (auto_shutdown=%r)",
            child.spec.name,
            self._policy.auto_shutdown,
        )
        self._closing = True
        self._body_scope.cancel()

    async def _restart(self, failed: _Child, cause: Exception | None) -> None:
        """Apply the strategy to ``failed``; a restart that fails is retried the same way."""
        while not self._closing:
            group = self._group(failed)
            delay = self._admit_restart(failed)
            if delay is None:
                await self._give_up(self._too_many_message(failed), cause)
            for child in reversed(group):
                if child is not failed:
                    await self._stop(child)
            again = self._restartable(group, failed)
            logger.info(
                "restarting %s in %.3f s (%s, restart %d)",
                ", ".join(repr(c.spec.name) for c in again),
                delay,
                self._policy.strategy,
                self._restart_count,
            )
            if self._policy.strategy == "one_for_one":
                # The failed run has finished (it reported its exit): no instance is left.
                run = failed.run = _Run(trio.CancelScope(shield=True))
                self._nursery.start_soon(self._run_child, failed, run, delay, False)
                return
            await trio.sleep(delay)
            retry = await self._start_in_order(again, cause)
            if retry is None:
                return
            failed, cause = retry

    def _group(self, failed: _Child) -> list[_Child]:
        """The children the strategy restarts with ``failed``, in start order."""
        if self._policy.strategy == "one_for_one":
            return [failed]
        # Children in a start_child / restart_child belong to its caller: leave them be; so
        # do terminated ones, until restart_child.
        settled = [c for c in self._children.values() if c.state not in ("starting", "terminated")]
        if self._policy.strategy == "one_for_all":
            return settled
        return settled[settled.index(failed) :]

    def _restartable(self, group: list[_Child], failed: _Child) -> list[_Child]:
        """Drop stopped temporary siblings; mark the rest as restarting."""
        again = []
        for child in group:
            if child.spec.restart == "temporary" and child is not failed:
                self._forget(child)
            elif self._children.get(child.spec.name) is child and child.state != "terminated":
                child.state = "restarting"
                child.restarts += 1
                again.append(child)
        return again

    def _admit_restart(self, failed: _Child) -> float | None:
        """Count one restart; its backoff delay, or None if it would exceed the intensity."""
        now = trio.current_time()
        policy = self._policy
        _drop_older(self._recent_restarts, now - policy.within)
        if len(self._recent_restarts) >= policy.max_restarts:
            return None
        self._recent_restarts.append(now)
        self._restart_count += 1
        _drop_older(failed.recent_restarts, now - policy.within)
        failed.recent_restarts.append(now)
        return backoff_delay(
            len(failed.recent_restarts),
            initial=policy.backoff_initial,
            factor=policy.backoff_factor,
            maximum=policy.backoff_max,
            jitter=policy.jitter,
            rng=self._rng,
        )

    async def _start_in_order(
        self, children: list[_Child], cause: Exception | None
    ) -> tuple[_Child, Exception] | None:
        """Start each child after the previous one has started (and its own previous instance
        has finished); the first failure, if any."""
        for child in children:
            if self._closing:
                return None
            if self._children.get(child.spec.name) is not child or child.state != "restarting":
                continue  # terminated meanwhile
            if not await self._wait_previous(child.spec.name, child.run):
                await self._give_up(self._stuck_message(child), cause)
            if self._closing or child.state != "restarting":
                continue
            run = child.run = _Run(trio.CancelScope())
            try:
                await self._nursery.start(self._run_child, child, run, 0.0, True)
            except Exception as exc:
                if run.stopping:
                    continue
                self._record_failure(child, exc)
                return child, exc
        return None

    def _record_failure(self, child: _Child, exc: Exception) -> None:
        logger.warning("child %r failed", child.spec.name, exc_info=exc)
        self._failures.append(ChildFailure(child.spec.name, exc, trio.current_time()))

    def _too_many_message(self, failed: _Child) -> str:
        policy = self._policy
        return (
            f"child {failed.spec.name!r} ended and restarting it would make "
            f"{len(self._recent_restarts) + 1} restarts within {policy.within:g} s, more than "
            f"max_restarts={policy.max_restarts}; the supervisor stopped all children and "
            "gave up. See .failures; fix the child or raise max_restarts / within."
        )

    def _stuck_message(self, child: _Child) -> str:
        return (
            f"child {child.spec.name!r} must be restarted but its previous instance is still "
            f"running, well past its shutdown_timeout={child.spec.shutdown_timeout:g} s "
            f"(waited {self._policy.within:g} s more); rather than run two instances at once "
            "the supervisor stopped all children and gave up. Make the child honour "
            "cancellation, or raise its shutdown_timeout."
        )

    async def _give_up(self, message: str, cause: Exception | None) -> NoReturn:
        self._closing = True
        logger.error(message)
        with trio.CancelScope(shield=True):
            await self._stop_all()
        raise SupervisorError(message, self.failures) from cause


class DynamicSupervisor:
    """Many children of one template spec (OTP's ``simple_one_for_one``, Elixir's
    ``DynamicSupervisor``). Made by :func:`open_dynamic_supervisor`, not directly.

    Children restart ``one_for_one``; on exit they are all stopped at once, each given the
    template's ``shutdown_timeout``.
    """

    def __init__(self, core: Supervisor, template: ChildSpec) -> None:
        self._core = core
        self._template = template
        self._numbers = itertools.count(1)

    @property
    def template(self) -> ChildSpec:
        """The spec every child is made from."""
        return self._template

    @property
    def restart_count(self) -> int:
        """Restarts so far (see :attr:`Supervisor.restart_count`)."""
        return self._core.restart_count

    @property
    def failures(self) -> tuple[ChildFailure, ...]:
        """The most recent failures, oldest first (see :attr:`Supervisor.failures`)."""
        return self._core.failures

    def children(self) -> tuple[ChildInfo, ...]:
        """The children, in start order."""
        return self._core.children()

    def count_children(self) -> ChildCounts:
        """How many children there are (see :class:`ChildCounts`)."""
        return self._core.count_children()

    async def start_child(self, *args: object, name: str | None = None) -> DynamicChild:
        """Start a child running ``template.start(*args)``; return its name and started value.

        ``name`` defaults to ``"<template name>-<n>"``, the first free ``n`` counting up.
        Started, cancelled and failing before ``started()`` as :meth:`Supervisor.start_child`,
        which raises what this raises.
        """
        if name is None:
            name = self._free_name()
        spec = attrs.evolve(
            self._template, name=name, start=functools.partial(self._template.start, *args)
        )
        return DynamicChild(name, await self._core.start_child(spec))

    async def terminate_child(self, name: str) -> None:
        """Stop a child and remove it (a dynamic child's spec is never kept).

        Cancellation and the ``shutdown_timeout`` as :meth:`Supervisor.terminate_child`; the
        child is removed either way. Raises ``KeyError`` for an unknown name.
        """
        await self._core._terminate(self._core._get(name), keep=False)

    def _free_name(self) -> str:
        core = self._core
        while True:
            name = f"{self._template.name}-{next(self._numbers)}"
            if name not in core._children and name not in core._lingering:
                return name


def _drop_older(times: deque[float], cutoff: float) -> None:
    while times and times[0] <= cutoff:
        times.popleft()


def _accepts_task_status(start: Callable[..., object]) -> bool:
    try:
        return "task_status" in inspect.signature(start).parameters
    except (TypeError, ValueError):  # no signature to inspect (some builtins)
        return False


@asynccontextmanager
async def open_supervisor(
    *,
    strategy: Strategy = "one_for_one",
    max_restarts: int = 3,
    within: float = 5.0,
    backoff_initial: float = 0.05,
    backoff_max: float = 2.0,
    backoff_factor: float = 2.0,
    jitter: float = 0.1,
    random: Random | None = None,
    auto_shutdown: AutoShutdown = "never",
) -> AsyncIterator[Supervisor]:
    """Open a supervisor whose children live no longer than the ``async with`` block.

    ``strategy`` picks which children restart when one ends: ``"one_for_one"`` (just it),
    ``"one_for_all"`` (all) or ``"rest_for_one"`` (it and those started after it). If more
    than ``max_restarts`` restarts would happen within ``within`` seconds, the supervisor
    stops all children, cancels the block's body and raises :class:`SupervisorError` out of
    the block. Before a child's k-th restart within ``within``, it waits :func:`backoff_delay`
    (``backoff_initial`` s doubling by ``backoff_factor`` up to ``backoff_max``, times a
    ``jitter`` factor drawn from ``random``). A child is never started while its previous
    instance still runs; one still running ``within`` s past its ``shutdown_timeout`` when it
    must be restarted makes the supervisor give up the same way.

    ``auto_shutdown``: ``"any_significant"`` ends the supervisor when any significant child
    ends on its own (is not restarted), ``"all_significant"`` when the last one does; the
    block's body is then cancelled and the block exits normally. ``"never"`` (default): no
    child may be significant.

    When the body finishes, raises or is cancelled, children are cancelled one at a time
    in reverse start order, each given its ``shutdown_timeout`` to finish; the block exits
    only once every child has finished. Once started, children are shielded from
    cancellation of the block: only the supervisor stops them. An exception from the body
    propagates unchanged. Raises ``ValueError`` on entry for invalid arguments.
    """
    policy = _Policy(
        strategy,
        max_restarts,
        within,
        backoff_initial,
        backoff_max,
        backoff_factor,
        jitter,
        auto_shutdown,
    )
    async with _supervising(policy, random, ordered=True) as supervisor:
        yield supervisor


@asynccontextmanager
async def open_dynamic_supervisor(
    template: ChildSpec,
    *,
    max_restarts: int = 3,
    within: float = 5.0,
    backoff_initial: float = 0.05,
    backoff_max: float = 2.0,
    backoff_factor: float = 2.0,
    jitter: float = 0.1,
    random: Random | None = None,
) -> AsyncIterator[DynamicSupervisor]:
    """Open a supervisor of many children made from one ``template`` spec.

    Each :meth:`DynamicSupervisor.start_child` call starts one more child running
    ``template.start(*args)`` under its own name, with the template's restart type and
    ``shutdown_timeout``; children restart ``one_for_one`` within the same intensity and
    backoff as :func:`open_supervisor`, which raises what this raises. When the block exits,
    all children are cancelled at once (no order among them), each given its
    ``shutdown_timeout``, and the block waits for every one. Raises ``ValueError`` on entry for
    invalid arguments or a significant template.
    """
    if template.significant:
        raise ValueError(
            f"template {template.name!r} is significant; a dynamic supervisor has no "
            "auto_shutdown (use open_supervisor)"
        )
    policy = _Policy(
        "one_for_one", max_restarts, within, backoff_initial, backoff_max, backoff_factor, jitter
    )
    async with _supervising(policy, random, ordered=False) as supervisor:
        yield DynamicSupervisor(supervisor, template)


@asynccontextmanager
async def _supervising(
    policy: _Policy, random: Random | None, *, ordered: bool
) -> AsyncIterator[Supervisor]:
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            rng = random if random is not None else Random()
            supervisor = Supervisor(nursery, policy, rng, ordered=ordered)
            nursery.start_soon(supervisor._manage)
            try:
                with supervisor._body_scope:
                    yield supervisor
            finally:
                with trio.CancelScope(shield=True):
                    await supervisor._shutdown()
