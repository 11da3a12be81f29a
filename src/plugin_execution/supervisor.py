"""An Erlang/OTP-style supervisor built on a trio nursery.

``open_supervisor()`` is an async context manager yielding a :class:`Supervisor`. Children are
described by :class:`ChildSpec` and started with :meth:`Supervisor.start_child`; each runs as a
task in the supervisor's nursery, in a cancel scope of its own. When a child returns or raises,
its restart type decides whether it comes back, the strategy decides which siblings restart with
it, and the restart intensity (``max_restarts`` within ``within`` seconds) decides when the
supervisor gives up with :class:`SupervisorError`. Restarts wait an exponential, jittered
backoff (:func:`backoff_delay`). When the block exits, children are stopped in reverse start
order and none is left running. See ``docs/supervisor.md``.
"""

from __future__ import annotations

import inspect
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
    "ChildFailure",
    "ChildInfo",
    "ChildSpec",
    "ChildState",
    "RestartType",
    "Strategy",
    "Supervisor",
    "SupervisorError",
    "backoff_delay",
    "open_supervisor",
]

logger = logging.getLogger("plugin_execution.supervisor")

Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
RestartType = Literal["permanent", "transient", "temporary"]
ChildState = Literal["starting", "running", "restarting", "stopping"]

_STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")
_RESTART_TYPES = ("permanent", "transient", "temporary")


@attrs.frozen
class ChildSpec:
    """How to run one child.

    ``start`` is an async callable; if it has a ``task_status`` parameter it is started with
    :meth:`trio.Nursery.start` semantics and counts as started once it calls
    ``task_status.started()``. ``restart``: ``"permanent"`` children are always restarted,
    ``"transient"`` ones only after raising, ``"temporary"`` ones never. ``shutdown_timeout``
    is how long stopping the child waits for it to finish after cancelling it.
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


@attrs.frozen
class ChildInfo:
    """A snapshot of one child: ``started_at`` is the ``trio.current_time()`` of its last start."""

    name: str
    restart: RestartType
    state: ChildState
    restarts: int
    started_at: float | None


@attrs.frozen
class ChildFailure:
    """A child raised ``exception`` at ``trio.current_time()`` ``at``."""

    child: str
    exception: Exception
    at: float


class SupervisorError(Exception):
    """The supervisor gave up: restarts exceeded ``max_restarts`` within ``within`` seconds.

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


@attrs.define(eq=False)
class _Run:
    """One run of a child: its cancel scope and how it ended."""

    scope: trio.CancelScope
    done: trio.Event = attrs.Factory(trio.Event)
    task: trio.lowlevel.Task = attrs.field(init=False)  # set as the run begins
    started: bool = False
    stopping: bool = False


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

    def __init__(self, nursery: trio.Nursery, policy: _Policy, rng: Random) -> None:
        self._nursery = nursery
        self._policy = policy
        self._rng = rng
        self._children: dict[str, _Child] = {}
        self._failures: deque[ChildFailure] = deque(maxlen=policy.max_restarts + 1)
        self._recent_restarts: deque[float] = deque()
        self._restart_count = 0
        self._closing = False
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

    async def start_child(self, spec: ChildSpec) -> None:
        """Start a child and return once it has started.

        A child whose ``start`` takes ``task_status`` has started when it calls
        ``task_status.started()``; an exception it raises before that propagates here and the
        child is not added. Any other child has started once scheduled. Cancelling the caller
        before the child has started cancels the child, which is not added.

        Raises ``ValueError`` if a child of that name is already supervised and
        ``RuntimeError`` once the supervisor is stopping.
        """
        if self._closing:
            raise RuntimeError(
                f"cannot start child {spec.name!r}: the supervisor is stopping "
                "(its block is exiting or it gave up)"
            )
        if spec.name in self._children:
            raise ValueError(
                f"a child named {spec.name!r} is already supervised; pick another name"
            )
        child = _Child(spec, _accepts_task_status(spec.start), _Run(trio.CancelScope()))
        self._children[spec.name] = child
        try:
            await self._nursery.start(self._run_child, child, child.run, 0.0, True)
        except BaseException:
            self._forget(child)
            raise

    async def terminate_child(self, name: str) -> None:
        """Stop a child for good: cancel it, wait up to its ``shutdown_timeout``, remove it.

        A child still running after its ``shutdown_timeout`` (one that shields itself) is
        logged and left to finish; the supervisor's block still waits for it on exit.
        Cancelling the caller only cuts the wait short: the child is cancelled and removed
        either way. Raises ``KeyError`` for an unknown name.
        """
        child = self._children.get(name)
        if child is None:
            raise KeyError(f"no child named {name!r}; supervised: {sorted(self._children)}")
        self._forget(child)
        await self._stop(child)

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

        With ``raise_before_started`` (the ``nursery.start`` callers: ``start_child`` and
        ordered restarts), ending before ``started()`` is raised to the caller, not reported.
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

    async def _stop(self, child: _Child) -> None:
        """Cancel the child's current run and wait up to its shutdown_timeout for it to end."""
        run = child.run
        run.stopping = True
        child.state = "stopping"
        run.scope.cancel()
        timeout = child.spec.shutdown_timeout
        with trio.move_on_after(timeout):
            await run.done.wait()
        if not run.done.is_set():
            logger.warning(
                "child %r is still running %g s after it was cancelled; moving on",
                child.spec.name,
                timeout,
            )

    async def _stop_all(self) -> None:
        for child in reversed(list(self._children.values())):
            await self._stop(child)
            self._forget(child)

    def _forget(self, child: _Child) -> None:
        if self._children.get(child.spec.name) is child:
            del self._children[child.spec.name]

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
            return
        await self._restart(child, outcome)

    async def _restart(self, failed: _Child, cause: Exception | None) -> None:
        """Apply the strategy to ``failed``; a restart that fails is retried the same way."""
        while not self._closing:
            group = self._group(failed)
            delay = self._admit_restart(failed)
            if delay is None:
                await self._give_up(failed, cause)
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
                run = failed.run = _Run(trio.CancelScope(shield=True))
                self._nursery.start_soon(self._run_child, failed, run, delay, False)
                return
            await trio.sleep(delay)
            retry = await self._start_in_order(again)
            if retry is None:
                return
            failed, cause = retry

    def _group(self, failed: _Child) -> list[_Child]:
        """The children the strategy restarts with ``failed``, in start order."""
        if self._policy.strategy == "one_for_one":
            return [failed]
        # Children still in their first start belong to start_child's caller: leave them be.
        settled = [c for c in self._children.values() if c.state != "starting"]
        if self._policy.strategy == "one_for_all":
            return settled
        return settled[settled.index(failed) :]

    def _restartable(self, group: list[_Child], failed: _Child) -> list[_Child]:
        """Drop stopped temporary siblings; mark the rest as restarting."""
        again = []
        for child in group:
            if child.spec.restart == "temporary" and child is not failed:
                self._forget(child)
            elif self._children.get(child.spec.name) is child:
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

    async def _start_in_order(self, children: list[_Child]) -> tuple[_Child, Exception] | None:
        """Start each child after the previous one has started; the first failure, if any."""
        for child in children:
            if self._closing:
                return None
            if self._children.get(child.spec.name) is not child:
                continue  # terminated meanwhile
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

    async def _give_up(self, failed: _Child, cause: Exception | None) -> NoReturn:
        self._closing = True
        policy = self._policy
        message = (
            f"child {failed.spec.name!r} ended and restarting it would make "
            f"{len(self._recent_restarts) + 1} restarts within {policy.within:g} s, more than "
            f"max_restarts={policy.max_restarts}; the supervisor stopped all children and "
            "gave up. See .failures; fix the child or raise max_restarts / within."
        )
        logger.error(message)
        with trio.CancelScope(shield=True):
            await self._stop_all()
        raise SupervisorError(message, self.failures) from cause


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
) -> AsyncIterator[Supervisor]:
    """Open a supervisor whose children live no longer than the ``async with`` block.

    ``strategy`` picks which children restart when one ends: ``"one_for_one"`` (just it),
    ``"one_for_all"`` (all) or ``"rest_for_one"`` (it and those started after it). If more
    than ``max_restarts`` restarts would happen within ``within`` seconds, the supervisor
    stops all children, cancels the block's body and raises :class:`SupervisorError` out of
    the block. Before a child's k-th restart within ``within``, it waits :func:`backoff_delay`
    (``backoff_initial`` s doubling by ``backoff_factor`` up to ``backoff_max``, times a
    ``jitter`` factor drawn from ``random``).

    When the body finishes, raises or is cancelled, children are cancelled one at a time
    in reverse start order, each given its ``shutdown_timeout`` to finish; the block exits
    only once every child has finished. Once started, children are shielded from
    cancellation of the block: only the supervisor stops them. An exception from the body
    propagates unchanged. Raises ``ValueError`` on entry for invalid arguments.
    """
    policy = _Policy(
        strategy, max_restarts, within, backoff_initial, backoff_max, backoff_factor, jitter
    )
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(nursery, policy, random if random is not None else Random())
            nursery.start_soon(supervisor._manage)
            try:
                yield supervisor
            finally:
                with trio.CancelScope(shield=True):
                    await supervisor._shutdown()
