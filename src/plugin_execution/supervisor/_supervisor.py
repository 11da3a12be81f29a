"""The static supervisor: :class:`Supervisor` and :func:`open_supervisor`.

The supervisor keeps its children in a :class:`~._children.ChildTable`, runs and stops them
with a :class:`~._runner.ChildRunner`, and handles their exits one at a time in a manager
task: the restart type decides whether a child comes back, the strategy which siblings restart
with it, and :class:`~._policy.RestartIntensity` when it gives up with
:class:`SupervisorError`. ``supervising`` is the nursery and shutdown both forms share.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from random import Random
from typing import NoReturn

import trio

from .._groups import unwrap_single
from ._children import Child, ChildTable, Run
from ._policy import Policy, RestartIntensity
from ._runner import ChildRunner, accepts_task_status
from ._specs import (
    AutoShutdown,
    ChildCounts,
    ChildFailure,
    ChildInfo,
    ChildSpec,
    Strategy,
    SupervisorError,
)

__all__ = ["Supervisor", "open_supervisor", "supervising"]

logger = logging.getLogger("plugin_execution.supervisor")


class Supervisor:
    """Supervises children in a nursery. Made by :func:`open_supervisor`, not directly."""

    def __init__(
        self, nursery: trio.Nursery, policy: Policy, rng: Random, *, ordered: bool = True
    ) -> None:
        self._policy = policy
        self._ordered = ordered  # False: shutdown stops all children at once (dynamic form)
        self._table = ChildTable()
        self._runner = ChildRunner(nursery, policy.within)
        self._intensity = RestartIntensity(policy, rng)
        self._closing = False
        self._body_scope = trio.CancelScope()  # cancelled by auto_shutdown
        self._manager_scope = trio.CancelScope(shield=True)

    @property
    def restart_count(self) -> int:
        """Restarts so far: one per handled exit, however many children it restarted."""
        return self._intensity.count

    @property
    def failures(self) -> tuple[ChildFailure, ...]:
        """The most recent failures (at most ``max_restarts + 1``), oldest first."""
        return tuple(self._intensity.failures)

    def children(self) -> tuple[ChildInfo, ...]:
        """The supervised children, in start order."""
        return self._table.infos()

    def count_children(self) -> ChildCounts:
        """How many children there are, by what they are doing (see :class:`ChildCounts`)."""
        return self._table.counts()

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
        if spec.name in self._table.lingering:
            await self._runner.previous_finished(spec.name, self._table.lingering[spec.name])
            self._check_can_add(spec)
        child = Child(spec, accepts_task_status(spec.start), Run(trio.CancelScope()))
        self._table.children[spec.name] = child
        try:
            return await self._runner.start(child, child.run)
        except BaseException:
            self._table.forget(child)
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
        await self._terminate(self._table.get(name), keep=True)

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
        child = self._table.terminated(name, "restarted")
        self._check_open(name)
        child.state = "starting"
        try:
            await self._runner.previous_finished(name, child.run)
            if child.state != "starting" or self._closing:
                raise RuntimeError(f"child {name!r} was stopped before it finished starting")
            run = child.run = Run(trio.CancelScope())
            return await self._runner.start(child, run)
        except BaseException:
            if self._table.holds(child):
                child.state = "terminated"
            raise

    def delete_child(self, name: str) -> None:
        """Remove a terminated child's spec, freeing its name. Not a checkpoint.

        Raises ``KeyError`` for an unknown name and ``RuntimeError`` if the child is not
        terminated (call :meth:`terminate_child` first).
        """
        self._table.forget(self._table.terminated(name, "deleted"))

    # -- bookkeeping ----------------------------------------------------------------------

    def _check_open(self, name: str) -> None:
        if self._closing:
            raise RuntimeError(
                f"cannot start child {name!r}: the supervisor is stopping "
                "(its block is exiting, it gave up, or a significant child ended it)"
            )

    def _check_can_add(self, spec: ChildSpec) -> None:
        self._check_open(spec.name)
        if spec.name in self._table.children:
            raise ValueError(
                f"a child named {spec.name!r} is already supervised; pick another name "
                "(or restart_child / delete_child a terminated one)"
            )
        if spec.significant and self._policy.auto_shutdown == "never":
            raise ValueError(
                f"child {spec.name!r} is significant but the supervisor's auto_shutdown is "
                "'never'; open it with auto_shutdown='any_significant' or 'all_significant'"
            )

    def _name_in_use(self, name: str) -> bool:
        """Whether a child, or a still running instance of a removed one, is called ``name``."""
        return self._table.in_use(name)

    # -- stopping children ----------------------------------------------------------------

    async def _remove(self, name: str) -> None:
        """Stop the child ``name`` and remove it (the dynamic supervisor's terminate)."""
        await self._terminate(self._table.get(name), keep=False)

    async def _terminate(self, child: Child, *, keep: bool) -> None:
        """Stop ``child``; keep it as terminated (unless temporary or ``keep`` is false)."""
        if child.state == "terminated":
            if not keep:
                self._table.forget(child)
            return
        if not keep or child.spec.restart == "temporary":
            self._table.forget(child)
        try:
            await self._runner.stop(child)
        finally:
            if self._table.holds(child):
                child.state = "terminated"

    async def _stop_all(self) -> None:
        """Stop every child: one at a time in reverse start order, or all at once if not
        ordered. Terminated children are only removed."""
        children = list(self._table.children.values())
        running = [c for c in children if c.state != "terminated"]
        if self._ordered:
            for child in reversed(running):
                await self._runner.stop(child)
                self._table.forget(child)
        else:
            async with trio.open_nursery() as nursery:
                for child in running:
                    nursery.start_soon(self._runner.stop, child)
        for child in children:
            self._table.forget(child)

    async def _shutdown(self) -> None:
        """Stop restarting, then stop every child in reverse start order. Call shielded."""
        self._closing = True
        self._manager_scope.cancel()
        await self._stop_all()

    # -- restarting -----------------------------------------------------------------------

    async def _manage(self) -> None:
        """Handle child exits one at a time, so strategies never interleave."""
        with self._manager_scope:
            async for child, run, outcome in self._runner.exits:
                await self._handle_exit(child, run, outcome)

    async def _handle_exit(self, child: Child, run: Run, outcome: Exception | None) -> None:
        if self._closing or not self._table.holds(child) or child.run is not run:
            return  # stale: the child was stopped or restarted since this run ended
        if outcome is not None:
            self._record_failure(child, outcome)
        restart = child.spec.restart
        if restart == "temporary" or (restart == "transient" and outcome is None):
            logger.info("child %r (%s) ended and is not restarted", child.spec.name, restart)
            self._table.forget(child)
            if child.spec.significant:
                self._significant_ended(child)
            return
        await self._restart(child, outcome)

    def _significant_ended(self, child: Child) -> None:
        """A significant child ended on its own: end the supervisor if auto_shutdown says so."""
        if self._policy.auto_shutdown == "all_significant" and any(
            c.spec.significant and c.state != "terminated" for c in self._table.children.values()
        ):
            return
        logger.info(
            "significant child %r ended; the supervisor shuts down (auto_shutdown=%r)",
            child.spec.name,
            self._policy.auto_shutdown,
        )
        self._closing = True
        self._body_scope.cancel()

    async def _restart(self, failed: Child, cause: Exception | None) -> None:
        """Apply the strategy to ``failed``; a restart that fails is retried the same way."""
        while not self._closing:
            group = self._group(failed)
            delay = self._intensity.admit(failed.recent_restarts)
            if delay is None:
                await self._give_up(self._intensity.too_many(failed.spec.name), cause)
            for child in reversed(group):
                if child is not failed:
                    await self._runner.stop(child)
            again = self._restartable(group, failed)
            logger.info(
                "restarting %s in %.3f s (%s, restart %d)",
                ", ".join(repr(c.spec.name) for c in again),
                delay,
                self._policy.strategy,
                self._intensity.count,
            )
            if self._policy.strategy == "one_for_one":
                # The failed run has finished (it reported its exit): no instance is left.
                run = failed.run = Run(trio.CancelScope(shield=True))
                self._runner.start_after(failed, run, delay)
                return
            await trio.sleep(delay)
            retry = await self._start_in_order(again, cause)
            if retry is None:
                return
            failed, cause = retry

    def _group(self, failed: Child) -> list[Child]:
        """The children the strategy restarts with ``failed``, in start order."""
        if self._policy.strategy == "one_for_one":
            return [failed]
        # Children in a start_child / restart_child belong to its caller: leave them be; so
        # do terminated ones, until restart_child.
        children = self._table.children.values()
        settled = [c for c in children if c.state not in ("starting", "terminated")]
        if self._policy.strategy == "one_for_all":
            return settled
        return settled[settled.index(failed) :]

    def _restartable(self, group: list[Child], failed: Child) -> list[Child]:
        """Drop stopped temporary siblings; mark the rest as restarting."""
        again = []
        for child in group:
            if child.spec.restart == "temporary" and child is not failed:
                self._table.forget(child)
            elif self._table.holds(child) and child.state != "terminated":
                child.state = "restarting"
                child.restarts += 1
                again.append(child)
        return again

    async def _start_in_order(
        self, children: list[Child], cause: Exception | None
    ) -> tuple[Child, Exception] | None:
        """Start each child after the previous one has started (and its own previous instance
        has finished); the first failure, if any."""
        for child in children:
            if self._closing:
                return None
            if not self._table.holds(child) or child.state != "restarting":
                continue  # terminated meanwhile
            if not await self._runner.wait_previous(child.spec.name, child.run):
                await self._give_up(self._stuck_message(child), cause)
            if self._closing or child.state != "restarting":
                continue
            run = child.run = Run(trio.CancelScope())
            try:
                await self._runner.start(child, run)
            except Exception as exc:
                if run.stopping:
                    continue
                self._record_failure(child, exc)
                return child, exc
        return None

    def _record_failure(self, child: Child, exc: Exception) -> None:
        logger.warning("child %r failed", child.spec.name, exc_info=exc)
        self._intensity.record_failure(child.spec.name, exc)

    def _stuck_message(self, child: Child) -> str:
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
    policy = Policy(
        strategy,
        max_restarts,
        within,
        backoff_initial,
        backoff_max,
        backoff_factor,
        jitter,
        auto_shutdown,
    )
    async with supervising(policy, random, ordered=True) as supervisor:
        yield supervisor


@asynccontextmanager
async def supervising(
    policy: Policy, random: Random | None, *, ordered: bool
) -> AsyncIterator[Supervisor]:
    """A running supervisor for the body of an ``async with``; its children stopped after."""
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
