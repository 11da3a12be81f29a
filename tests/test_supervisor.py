"""The supervisor: start semantics, restart types, strategies, intensity, backoff, shutdown.

Every async test runs on trio's MockClock with autojump (the ``autojump_clock`` fixture), so
times read with ``trio.current_time()`` are exact.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from itertools import pairwise
from random import Random
from typing import Any

import pytest
import trio

from plugin_execution.supervisor import (
    ChildCounts,
    ChildInfo,
    ChildSpec,
    DynamicChild,
    SupervisorError,
    backoff_delay,
    open_dynamic_supervisor,
    open_supervisor,
)

Start = Callable[..., Awaitable[object]]


class Boom(Exception):
    pass


class Family:
    """Children that log their starts and stops, with times, in one shared list."""

    def __init__(self) -> None:
        self.log: list[tuple[str, float]] = []
        self.runs: Counter[str] = Counter()

    @property
    def events(self) -> list[str]:
        return [event for event, _ in self.log]

    def rounded(self) -> list[tuple[str, float]]:
        """The log with times rounded to the nanosecond, for exact comparisons."""
        return [(event, round(at, 9)) for event, at in self.log]

    def note(self, event: str) -> None:
        self.log.append((event, trio.current_time()))

    def child(
        self,
        name: str,
        *,
        crash_after: float | None = None,
        start_delay: float = 0.0,
        cleanup: float = 0.0,
    ) -> Start:
        """Runs until cancelled; its first run raises ``Boom`` ``crash_after`` s after starting.

        It takes ``start_delay`` s to call ``started()`` and ``cleanup`` s (shielded) to stop.
        """

        async def start(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            self.runs[name] += 1
            run = self.runs[name]
            await trio.sleep(start_delay)
            self.note(f"start {name}")
            task_status.started()
            try:
                if crash_after is not None and run == 1:
                    await trio.sleep(crash_after)
                    raise Boom(f"{name} crashed")
                await trio.sleep_forever()
            except trio.Cancelled:
                self.note(f"stop {name}")
                with trio.CancelScope(shield=True):
                    await trio.sleep(cleanup)
                self.note(f"stopped {name}")
                raise

        return start


async def forever() -> None:
    await trio.sleep_forever()


# -- backoff_delay ----------------------------------------------------------------------------


def test_backoff_delay_grows_by_the_factor_up_to_the_cap() -> None:
    delays = [
        backoff_delay(k, initial=0.1, factor=2.0, maximum=1.0, jitter=0.0, rng=Random(0))
        for k in range(1, 7)
    ]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_backoff_delay_jitter_is_bounded_and_reproducible() -> None:
    def draw(seed: int) -> list[float]:
        rng = Random(seed)
        return [
            backoff_delay(3, initial=0.1, factor=2.0, maximum=5.0, jitter=0.25, rng=rng)
            for _ in range(200)
        ]

    delays = draw(7)
    assert all(0.3 <= d <= 0.5 for d in delays)
    assert len(set(delays)) > 100
    assert draw(7) == delays
    assert draw(8) != delays


def test_backoff_delay_caps_attempts_too_large_to_compute() -> None:
    def delay(initial: float) -> float:
        return backoff_delay(
            100_000, initial=initial, factor=2.0, maximum=3.0, jitter=0.0, rng=Random()
        )

    assert delay(0.1) == 3.0
    assert delay(0.0) == 0.0


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"strategy": "all_for_one"}, "strategy"),
        ({"max_restarts": -1}, "max_restarts"),
        ({"within": 0}, "within"),
        ({"within": -5.0}, "within"),
        ({"backoff_initial": -0.1}, "backoff_initial"),
        ({"backoff_max": -1.0}, "backoff_max"),
        ({"backoff_factor": 0.5}, "backoff_factor"),
        ({"jitter": 1.5}, "jitter"),
        ({"jitter": -0.1}, "jitter"),
    ],
)
async def test_open_supervisor_rejects_bad_arguments(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        async with open_supervisor(**options):
            pytest.fail("the block must not run")


def test_child_spec_validates_its_fields() -> None:
    assert ChildSpec("a", forever) == ChildSpec(
        name="a", start=forever, restart="permanent", shutdown_timeout=5.0
    )
    with pytest.raises(ValueError, match="name"):
        ChildSpec("", forever)
    with pytest.raises(ValueError, match="restart"):
        ChildSpec("a", forever, restart="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shutdown_timeout"):
        ChildSpec("a", forever, shutdown_timeout=-1.0)
    with pytest.raises(TypeError, match="start"):
        ChildSpec("a", 42)  # type: ignore[arg-type]


# -- start_child ------------------------------------------------------------------------------


async def test_start_child_returns_once_the_child_called_started(autojump_clock: Any) -> None:
    family = Family()
    seen: list[tuple[ChildInfo, ...]] = []
    async with open_supervisor() as sup:

        async def peek() -> None:
            await trio.sleep(1)
            seen.append(sup.children())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(peek)
            await sup.start_child(ChildSpec("slow", family.child("slow", start_delay=3)))
            assert trio.current_time() == 3.0
        assert seen == [(ChildInfo("slow", "permanent", "starting", 0, None),)]
        assert sup.children() == (ChildInfo("slow", "permanent", "running", 0, 3.0),)


async def test_start_child_propagates_an_error_raised_before_started(autojump_clock: Any) -> None:
    async def broken(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await trio.sleep(1)
        raise Boom("no config")

    async with open_supervisor() as sup:
        with pytest.raises(Boom, match="no config"):
            await sup.start_child(ChildSpec("broken", broken))
        await trio.sleep(10)
        assert sup.children() == ()
        assert sup.failures == ()
        assert sup.restart_count == 0
        await sup.start_child(ChildSpec("broken", forever))  # the name is free again
        assert [c.name for c in sup.children()] == ["broken"]


async def test_a_child_without_task_status_counts_as_started_once_scheduled(
    autojump_clock: Any,
) -> None:
    reached: list[float] = []

    async def plain() -> None:
        await trio.sleep(2)
        reached.append(trio.current_time())
        await trio.sleep_forever()

    async with open_supervisor() as sup:
        await sup.start_child(ChildSpec("plain", plain))
        assert trio.current_time() == 0.0
        assert sup.children()[0].state == "running"
        await trio.sleep(3)
    assert reached == [2.0]


async def test_cancelling_start_child_cancels_the_child_and_does_not_add_it(
    autojump_clock: Any,
) -> None:
    family = Family()
    async with open_supervisor() as sup:
        with trio.move_on_after(1) as waited:
            await sup.start_child(ChildSpec("slow", family.child("slow", start_delay=5)))
        assert waited.cancelled_caught
        await trio.sleep(10)
        assert sup.children() == ()
        assert family.runs["slow"] == 1
        assert family.events == []


async def test_a_start_cancelled_as_the_child_calls_started_leaves_nothing_behind(
    autojump_clock: Any,
) -> None:
    async with open_supervisor() as sup:
        with trio.CancelScope() as caller:

            async def start(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                caller.cancel()  # trio then keeps the child under start_child: it must not shield
                task_status.started()
                await trio.sleep_forever()

            await sup.start_child(ChildSpec("c", start))
        assert caller.cancelled_caught
        assert sup.children() == ()


async def test_stopping_a_child_before_it_started_fails_its_start_child(
    autojump_clock: Any,
) -> None:
    family = Family()
    async with open_supervisor() as sup:

        async def start_slow() -> None:
            with pytest.raises(RuntimeError, match="'slow' was stopped before it finished"):
                await sup.start_child(ChildSpec("slow", family.child("slow", start_delay=5)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(start_slow)
            await trio.sleep(1)
            await sup.terminate_child("slow")
        assert trio.current_time() == 1.0
        assert sup.children() == ()
        assert family.events == []


async def test_start_child_rejects_a_duplicate_name(autojump_clock: Any) -> None:
    async with open_supervisor() as sup:
        await sup.start_child(ChildSpec("a", forever))
        with pytest.raises(ValueError, match="'a' is already supervised"):
            await sup.start_child(ChildSpec("a", forever))
        assert len(sup.children()) == 1


async def test_start_child_after_the_block_raises(autojump_clock: Any) -> None:
    async with open_supervisor() as sup:
        pass
    with pytest.raises(RuntimeError, match="stopping"):
        await sup.start_child(ChildSpec("late", forever))


# -- restart types ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("restart", "ending", "runs", "failures", "supervised"),
    [
        ("permanent", "return", 4, 0, True),
        ("permanent", "raise", 4, 3, True),
        ("transient", "return", 1, 0, False),
        ("transient", "raise", 4, 3, True),
        ("temporary", "return", 1, 0, False),
        ("temporary", "raise", 1, 1, False),
    ],
)
async def test_restart_types(
    restart: Any, ending: str, runs: int, failures: int, supervised: bool, autojump_clock: Any
) -> None:
    count = 0

    async def ends_after_a_second() -> None:
        nonlocal count
        count += 1
        await trio.sleep(1)
        if ending == "raise":
            raise Boom(f"run {count}")

    async with open_supervisor(max_restarts=100, backoff_initial=0.0) as sup:
        await sup.start_child(ChildSpec("child", ends_after_a_second, restart=restart))
        await trio.sleep(3.5)  # restarted runs start at 0, 1, 2 and 3, and end a second later
        assert count == runs
        assert sup.restart_count == runs - 1
        assert [c.name for c in sup.children()] == (["child"] if supervised else [])
        assert [(f.child, str(f.exception), f.at) for f in sup.failures] == [
            ("child", f"run {n}", float(n)) for n in range(1, failures + 1)
        ]


# -- strategies -------------------------------------------------------------------------------


async def test_one_for_one_restarts_only_the_failed_child(autojump_clock: Any) -> None:
    family = Family()
    async with open_supervisor(strategy="one_for_one", jitter=0.0) as sup:
        for name in "abc":
            crash = 1.0 if name == "b" else None
            await sup.start_child(ChildSpec(name, family.child(name, crash_after=crash)))
        await trio.sleep(5)
        assert family.events == ["start a", "start b", "start c", "start b"]
        assert family.rounded()[-1] == ("start b", 1.05)  # after backoff_initial
        assert [c.restarts for c in sup.children()] == [0, 1, 0]
    assert family.runs == {"a": 1, "b": 2, "c": 1}


async def test_one_for_all_stops_the_rest_in_reverse_then_restarts_all_in_order(
    autojump_clock: Any,
) -> None:
    family = Family()
    async with open_supervisor(strategy="one_for_all", jitter=0.0) as sup:
        for name in "abcd":
            crash = 1.0 if name == "b" else None
            await sup.start_child(ChildSpec(name, family.child(name, crash_after=crash)))
        await trio.sleep(5)
        assert family.events == [
            *["start a", "start b", "start c", "start d"],
            *["stop d", "stopped d", "stop c", "stopped c", "stop a", "stopped a"],
            *["start a", "start b", "start c", "start d"],
        ]
        assert [c.restarts for c in sup.children()] == [1, 1, 1, 1]
        assert sup.restart_count == 1
        assert [f.child for f in sup.failures] == ["b"]


async def test_rest_for_one_restarts_the_failed_child_and_those_started_after_it(
    autojump_clock: Any,
) -> None:
    family = Family()
    async with open_supervisor(strategy="rest_for_one", jitter=0.0) as sup:
        for name in "abcd":
            crash = 1.0 if name == "b" else None
            await sup.start_child(ChildSpec(name, family.child(name, crash_after=crash)))
        await trio.sleep(5)
        assert family.events == [
            *["start a", "start b", "start c", "start d"],
            *["stop d", "stopped d", "stop c", "stopped c"],
            *["start b", "start c", "start d"],
        ]
        assert [c.restarts for c in sup.children()] == [0, 1, 1, 1]


async def test_ordered_restarts_wait_for_each_child_to_start(autojump_clock: Any) -> None:
    family = Family()
    async with open_supervisor(strategy="one_for_all", jitter=0.0) as sup:
        await sup.start_child(ChildSpec("a", family.child("a", start_delay=2)))
        await sup.start_child(ChildSpec("b", family.child("b", crash_after=1, cleanup=0.5)))
        await sup.start_child(ChildSpec("c", family.child("c", cleanup=0.5)))
        await trio.sleep(10)
    starts = [(event, at) for event, at in family.rounded() if event.startswith("start")]
    # b crashes at 3; c takes 0.5 s to stop, a 0 s; backoff 0.05 s; a takes 2 s to start.
    assert starts == [
        ("start a", 2.0),
        ("start b", 2.0),
        ("start c", 2.0),
        ("start a", 5.55),
        ("start b", 5.55),
        ("start c", 5.55),
    ]


async def test_temporary_siblings_stopped_by_a_strategy_are_not_restarted(
    autojump_clock: Any,
) -> None:
    family = Family()
    async with open_supervisor(strategy="one_for_all") as sup:
        await sup.start_child(ChildSpec("temp", family.child("temp"), restart="temporary"))
        await sup.start_child(ChildSpec("b", family.child("b", crash_after=1)))
        await trio.sleep(5)
        assert [c.name for c in sup.children()] == ["b"]
    assert family.runs == {"temp": 1, "b": 2}


@pytest.mark.parametrize("strategy", ["one_for_one", "one_for_all", "rest_for_one"])
async def test_a_failed_restart_counts_and_is_retried_after_backoff(
    strategy: Any, autojump_clock: Any
) -> None:
    attempts: list[float] = []

    async def flaky(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        attempts.append(trio.current_time())
        if len(attempts) in (2, 3):
            raise Boom("cannot start")
        task_status.started()
        if len(attempts) == 1:
            await trio.sleep(1)
            raise Boom("crashed")
        await trio.sleep_forever()

    options: dict[str, Any] = {"max_restarts": 3, "within": 100, "backoff_initial": 0.1}
    async with open_supervisor(strategy=strategy, jitter=0.0, **options) as sup:
        await sup.start_child(ChildSpec("flaky", flaky))
        await trio.sleep(5)
        assert attempts == pytest.approx([0.0, 1.1, 1.3, 1.7])  # backoff 0.1, 0.2, 0.4
        assert sup.restart_count == 3
        assert [str(f.exception) for f in sup.failures] == [
            "crashed",
            "cannot start",
            "cannot start",
        ]
        assert [(c.state, c.restarts) for c in sup.children()] == [("running", 3)]


# -- intensity and backoff --------------------------------------------------------------------


async def test_too_many_restarts_raise_a_bare_supervisor_error(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="plugin_execution.supervisor")
    family = Family()
    runs = 0
    body_cancelled = False

    async def crashy(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal runs
        runs += 1
        task_status.started()
        await trio.sleep(0.5)
        raise Boom(f"crash {runs}")

    with pytest.raises(SupervisorError) as raised:
        async with open_supervisor(max_restarts=2, within=10, jitter=0.0) as sup:
            await sup.start_child(ChildSpec("first", family.child("first")))
            await sup.start_child(ChildSpec("crashy", crashy))
            await sup.start_child(ChildSpec("last", family.child("last", cleanup=1)))
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                body_cancelled = True
                raise

    error = raised.value
    assert type(error) is SupervisorError
    assert "'crashy'" in str(error)
    assert "3 restarts within 10 s" in str(error)
    assert "max_restarts=2" in str(error)
    assert [(f.child, str(f.exception)) for f in error.failures] == [
        ("crashy", "crash 1"),
        ("crashy", "crash 2"),
        ("crashy", "crash 3"),
    ]
    assert [f.at for f in error.failures] == pytest.approx([0.5, 1.05, 1.65])
    assert error.__cause__ is error.failures[-1].exception
    assert body_cancelled
    assert runs == 3
    # Gave up at 1.65: stopped the others in reverse start order, then left the block.
    assert family.rounded()[2:] == [
        ("stop last", 1.65),
        ("stopped last", 2.65),
        ("stop first", 2.65),
        ("stopped first", 2.65),
    ]
    assert trio.current_time() == pytest.approx(2.65)
    assert any(r.levelno == logging.ERROR and "gave up" in r.getMessage() for r in caplog.records)
    assert any("restarting 'crashy'" in r.getMessage() for r in caplog.records)


async def test_restarts_spread_wider_than_the_window_never_give_up(autojump_clock: Any) -> None:
    starts: list[float] = []

    async def crash_after_three_seconds() -> None:
        starts.append(trio.current_time())
        await trio.sleep(3)
        raise Boom("again")

    async with open_supervisor(max_restarts=1, within=2.5, jitter=0.0) as sup:
        await sup.start_child(ChildSpec("c", crash_after_three_seconds))
        await trio.sleep(20)
        assert sup.restart_count == 6
    # Each restart is the first within the window, so each waits only backoff_initial.
    gaps = [b - a for a, b in pairwise(starts)]
    assert gaps == pytest.approx([3.05] * 6)


async def test_zero_max_restarts_gives_up_on_the_first_failure(autojump_clock: Any) -> None:
    async def crash() -> None:
        await trio.sleep(1)
        raise Boom("once")

    with pytest.raises(SupervisorError) as raised:
        async with open_supervisor(max_restarts=0) as sup:
            await sup.start_child(ChildSpec("c", crash))
            await trio.sleep_forever()
    assert [str(f.exception) for f in raised.value.failures] == ["once"]
    assert trio.current_time() == 1.0


@pytest.mark.parametrize("jitter", [0.0, 0.3])
async def test_restarts_in_a_row_back_off_exponentially(jitter: float, autojump_clock: Any) -> None:
    starts: list[float] = []

    async def crash() -> None:
        starts.append(trio.current_time())
        raise Boom("at once")

    async with open_supervisor(
        max_restarts=100,
        within=60,
        backoff_initial=0.1,
        backoff_factor=2.0,
        backoff_max=1.0,
        jitter=jitter,
        random=Random(42),
    ) as sup:
        await sup.start_child(ChildSpec("c", crash))
        await trio.sleep(5)
    rng = Random(42)
    expected = [
        backoff_delay(k, initial=0.1, factor=2.0, maximum=1.0, jitter=jitter, rng=rng)
        for k in range(1, 7)
    ]
    if not jitter:
        assert expected == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    gaps = [b - a for a, b in pairwise(starts)]
    assert gaps[:6] == pytest.approx(expected)


# -- shutdown and terminate_child --------------------------------------------------------------


async def test_exit_stops_children_one_at_a_time_in_reverse_start_order(
    autojump_clock: Any,
) -> None:
    family = Family()
    async with open_supervisor() as sup:
        for name in "abc":
            await sup.start_child(ChildSpec(name, family.child(name, cleanup=1)))
        await trio.sleep(1)
    assert family.log[3:] == [
        ("stop c", 1.0),
        ("stopped c", 2.0),
        ("stop b", 2.0),
        ("stopped b", 3.0),
        ("stop a", 3.0),
        ("stopped a", 4.0),
    ]
    assert trio.current_time() == 4.0
    assert sup.children() == ()
    assert sup.failures == ()  # being stopped is not failing


async def test_cancelling_the_block_still_stops_children_in_reverse_order(
    autojump_clock: Any,
) -> None:
    family = Family()
    with trio.move_on_after(1) as outer:
        async with open_supervisor() as sup:
            await sup.start_child(ChildSpec("a", family.child("a", cleanup=1)))
            await sup.start_child(ChildSpec("b", family.child("b", cleanup=1)))
            await trio.sleep_forever()
    assert outer.cancelled_caught
    assert family.log[2:] == [
        ("stop b", 1.0),
        ("stopped b", 2.0),
        ("stop a", 2.0),
        ("stopped a", 3.0),
    ]


async def test_an_exception_from_the_body_propagates_unchanged(autojump_clock: Any) -> None:
    family = Family()
    cause = KeyError("why")
    with pytest.raises(ValueError, match="body failed") as raised:
        async with open_supervisor() as sup:
            await sup.start_child(ChildSpec("a", family.child("a")))
            raise ValueError("body failed") from cause
    assert type(raised.value) is ValueError
    assert raised.value.__cause__ is cause
    assert family.events == ["start a", "stop a", "stopped a"]


async def test_shutdown_timeout_bounds_the_wait_for_a_shielding_child(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    family = Family()

    async def stubborn(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(10)
            family.note("stubborn done")

    async with open_supervisor() as sup:
        await sup.start_child(ChildSpec("polite", family.child("polite")))
        await sup.start_child(ChildSpec("stubborn", stubborn, shutdown_timeout=2))
    assert family.log[1:] == [
        ("stop polite", 2.0),  # stubborn had its 2 s, then the next child was stopped
        ("stopped polite", 2.0),
        ("stubborn done", 10.0),  # and the block still waited for it
    ]
    assert trio.current_time() == 10.0
    assert "'stubborn' is still running 2 s after it was cancelled" in caplog.text


async def test_terminate_child_stops_it_for_good(autojump_clock: Any) -> None:
    family = Family()

    async def noisy_when_cancelled(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        family.runs["noisy"] += 1
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            raise Boom("cleanup failed")  # while being stopped: not a failure

    async with open_supervisor() as sup:
        await sup.start_child(ChildSpec("a", family.child("a", cleanup=1)))
        await sup.start_child(ChildSpec("noisy", noisy_when_cancelled))
        await sup.terminate_child("a")
        assert trio.current_time() == 1.0  # waited for a to finish
        await sup.terminate_child("noisy")
        await trio.sleep(10)
        assert [(c.name, c.state) for c in sup.children()] == [
            ("a", "terminated"),
            ("noisy", "terminated"),
        ]
        assert family.runs == {"a": 1, "noisy": 1}
        assert sup.restart_count == 0
        assert sup.failures == ()
        await sup.terminate_child("a")  # already terminated: nothing to do
        assert trio.current_time() == 11.0
        sup.delete_child("a")
        sup.delete_child("noisy")
        assert sup.children() == ()
        with pytest.raises(KeyError, match="no child named 'a'"):
            await sup.terminate_child("a")


async def test_terminate_child_gives_up_waiting_after_the_shutdown_timeout(
    autojump_clock: Any,
) -> None:
    finished: list[float] = []

    async def stubborn() -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(10)
            finished.append(trio.current_time())

    async with open_supervisor() as sup:
        await sup.start_child(ChildSpec("stubborn", stubborn, shutdown_timeout=3))
        await sup.terminate_child("stubborn")
        assert trio.current_time() == 3.0
        assert sup.children()[0].state == "terminated"
        assert sup.count_children() == ChildCounts(specs=1, active=0, terminated=1, overdue=1)
    assert finished == [10.0]


# -- observing --------------------------------------------------------------------------------


async def test_children_and_restart_count_describe_the_supervisor(autojump_clock: Any) -> None:
    family = Family()
    async with open_supervisor(jitter=0.0, backoff_initial=1.0) as sup:
        await sup.start_child(ChildSpec("a", family.child("a")))
        await sup.start_child(ChildSpec("b", family.child("b", crash_after=1), restart="transient"))
        await sup.start_child(ChildSpec("c", family.child("c"), restart="temporary"))
        assert sup.children() == (
            ChildInfo("a", "permanent", "running", 0, 0.0),
            ChildInfo("b", "transient", "running", 0, 0.0),
            ChildInfo("c", "temporary", "running", 0, 0.0),
        )
        assert sup.restart_count == 0
        await trio.sleep(1.5)  # b crashed at 1 and waits 1 s of backoff
        assert sup.children()[1] == ChildInfo("b", "transient", "restarting", 1, 0.0)
        await trio.sleep(1)
        assert sup.children()[1] == ChildInfo("b", "transient", "running", 1, 2.0)
        assert sup.restart_count == 1
        assert [(f.child, f.at) for f in sup.failures] == [("b", 1.0)]


# -- one instance at a time -------------------------------------------------------------------


def alive_at_once(family: Family, name: str) -> int:
    """The most instances of ``name`` alive at once, from the family's start/stopped log."""
    alive = most = 0
    for event in family.events:
        if event == f"start {name}":
            alive += 1
            most = max(most, alive)
        elif event == f"stopped {name}":
            alive -= 1
    return most


async def test_a_strategy_restarts_a_child_only_once_its_previous_instance_finished(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    family = Family()
    counts: list[ChildCounts] = []
    async with open_supervisor(strategy="one_for_all", jitter=0.0) as sup:
        # S takes 3 s to stop but promises 1; B crashes at 1 and S is stopped with it.
        await sup.start_child(ChildSpec("S", family.child("S", cleanup=3), shutdown_timeout=1))
        await sup.start_child(ChildSpec("B", family.child("B", crash_after=1)))
        await trio.sleep(2.5)
        counts.append(sup.count_children())
        await trio.sleep(2.5)
        assert [(c.name, c.state) for c in sup.children()] == [("S", "running"), ("B", "running")]
    assert counts == [ChildCounts(specs=2, active=0, terminated=0, overdue=1)]
    assert family.rounded()[2:6] == [
        ("stop S", 1.0),
        ("stopped S", 4.0),  # overdue from 2.0, and waited for
        ("start S", 4.0),
        ("start B", 4.0),
    ]
    assert alive_at_once(family, "S") == 1
    assert "'S' is still running 1 s after it was cancelled" in caplog.text


@pytest.mark.parametrize("restart", ["permanent", "temporary"])
async def test_starting_a_terminated_child_again_waits_for_its_previous_instance(
    restart: Any, autojump_clock: Any
) -> None:
    family = Family()
    spec = ChildSpec("S", family.child("S", cleanup=3), restart=restart, shutdown_timeout=1)
    async with open_supervisor() as sup:
        await sup.start_child(spec)
        await sup.terminate_child("S")
        assert trio.current_time() == 1.0  # gave up waiting after its shutdown_timeout
        if restart == "temporary":  # removed, so started afresh under the same name
            await sup.start_child(spec)
        else:  # kept as terminated
            await sup.restart_child("S")
        assert trio.current_time() == 3.0
        assert sup.count_children() == ChildCounts(specs=1, active=1, terminated=0, overdue=0)
    assert family.rounded()[:4] == [
        ("start S", 0.0),
        ("stop S", 0.0),
        ("stopped S", 3.0),
        ("start S", 3.0),
    ]
    assert alive_at_once(family, "S") == 1


async def test_a_child_that_will_not_finish_makes_the_supervisor_give_up_not_double_it(
    autojump_clock: Any,
) -> None:
    family = Family()
    with pytest.raises(SupervisorError) as raised:
        async with open_supervisor(strategy="one_for_all", within=5, jitter=0.0) as sup:
            await sup.start_child(
                ChildSpec("S", family.child("S", cleanup=100), shutdown_timeout=1)
            )
            await sup.start_child(ChildSpec("B", family.child("B", crash_after=1)))
            await trio.sleep_forever()
    message = str(raised.value)
    assert "'S' must be restarted but its previous instance is still running" in message
    assert "shutdown_timeout=1 s" in message
    assert [f.child for f in raised.value.failures] == ["B"]
    assert family.runs == {"S": 1, "B": 1}
    # Overdue at 2, waited `within` (5 s) more, gave up at 7.05; the block waited for S anyway.
    assert family.rounded()[-1] == ("stopped S", 101.0)
    assert trio.current_time() == 101.0


async def test_restart_child_gives_up_on_an_instance_that_will_not_finish(
    autojump_clock: Any,
) -> None:
    family = Family()
    async with open_supervisor(within=5) as sup:
        await sup.start_child(ChildSpec("S", family.child("S", cleanup=100), shutdown_timeout=1))
        await sup.terminate_child("S")
        with pytest.raises(RuntimeError, match="'S': its previous instance is still running"):
            await sup.restart_child("S")
        assert trio.current_time() == 6.0
        assert sup.children()[0].state == "terminated"
        assert sup.count_children().overdue == 1
    assert family.runs == {"S": 1}
    assert trio.current_time() == 100.0


# -- shutdown_timeout=0: brutal kill --------------------------------------------------------


async def test_zero_shutdown_timeout_waits_for_a_cleanup_that_takes_no_time(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def quick_cleanup(family: Family, name: str) -> Start:
        async def start(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            family.note(f"start {name}")
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                family.note(f"stop {name}")
                with trio.CancelScope(shield=True):
                    for _ in range(3):  # takes no time, but a few scheduling rounds
                        await trio.lowlevel.checkpoint()
                family.note(f"stopped {name}")

        return start

    for _ in range(20):  # trio runs a batch in random order: try both orders, many times
        family = Family()
        async with open_supervisor() as sup:
            for name in "abc":
                start = await quick_cleanup(family, name)
                await sup.start_child(ChildSpec(name, start, shutdown_timeout=0))
            await sup.terminate_child("a")
            assert family.events[-1] == "stopped a"
        assert family.events[5:] == [
            *["stop c", "stopped c"],
            *["stop b", "stopped b"],
        ]
    assert "still running" not in caplog.text


async def test_zero_shutdown_timeout_moves_on_from_a_child_that_waits(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    family = Family()
    async with open_supervisor() as sup:
        await sup.start_child(ChildSpec("a", family.child("a")))
        await sup.start_child(
            ChildSpec("slow", family.child("slow", cleanup=1), shutdown_timeout=0)
        )
    assert family.rounded()[2:] == [
        ("stop slow", 0.0),
        ("stop a", 0.0),
        ("stopped a", 0.0),
        ("stopped slow", 1.0),
    ]
    assert "'slow' is still running 0 s after it was cancelled" in caplog.text


# -- started values, restart_child, delete_child, count_children --------------------------------


async def test_start_and_restart_child_return_the_value_passed_to_started(
    autojump_clock: Any,
) -> None:
    runs = 0

    async def serve(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal runs
        runs += 1
        task_status.started(f"port {8000 + runs}")
        await trio.sleep_forever()

    async with open_supervisor() as sup:
        assert await sup.start_child(ChildSpec("server", serve)) == "port 8001"
        assert await sup.start_child(ChildSpec("plain", forever)) is None
        await sup.terminate_child("server")
        assert await sup.restart_child("server") == "port 8002"


async def test_restart_child_and_delete_child_act_on_terminated_children_only(
    autojump_clock: Any,
) -> None:
    family = Family()
    async with open_supervisor() as sup:
        await sup.start_child(ChildSpec("a", family.child("a")))
        with pytest.raises(RuntimeError, match="'a' is running; only a terminated child can be"):
            await sup.restart_child("a")
        with pytest.raises(RuntimeError, match="'a' is running; only a terminated child can be"):
            sup.delete_child("a")
        with pytest.raises(KeyError, match="no child named 'x'"):
            await sup.restart_child("x")
        with pytest.raises(KeyError, match="no child named 'x'"):
            sup.delete_child("x")
        await sup.terminate_child("a")
        with pytest.raises(ValueError, match="'a' is already supervised"):
            await sup.start_child(ChildSpec("a", forever))
        await sup.restart_child("a")
        assert sup.children() == (ChildInfo("a", "permanent", "running", 0, 0.0),)
        await sup.terminate_child("a")
        sup.delete_child("a")
        await sup.start_child(ChildSpec("a", family.child("a", cleanup=1)))  # the name is free
    assert family.runs == {"a": 3}


async def test_a_restart_child_that_fails_to_start_leaves_it_terminated(
    autojump_clock: Any,
) -> None:
    runs = 0

    async def once(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal runs
        runs += 1
        if runs > 1:
            raise Boom("cannot start again")
        task_status.started()
        await trio.sleep_forever()

    async with open_supervisor() as sup:
        await sup.start_child(ChildSpec("once", once))
        await sup.terminate_child("once")
        with pytest.raises(Boom):
            await sup.restart_child("once")
        assert sup.children()[0].state == "terminated"
        assert sup.restart_count == 0
        assert sup.failures == ()


async def test_terminated_children_stay_terminated_through_a_strategy_restart(
    autojump_clock: Any,
) -> None:
    family = Family()
    async with open_supervisor(strategy="one_for_all") as sup:
        await sup.start_child(ChildSpec("a", family.child("a")))
        await sup.start_child(ChildSpec("b", family.child("b", crash_after=1)))
        await sup.terminate_child("a")
        await trio.sleep(5)
        assert [(c.name, c.state) for c in sup.children()] == [
            ("a", "terminated"),
            ("b", "running"),
        ]
    assert family.runs == {"a": 1, "b": 2}


async def test_count_children_counts_specs_active_and_terminated(autojump_clock: Any) -> None:
    async with open_supervisor() as sup:
        assert sup.count_children() == ChildCounts(specs=0, active=0, terminated=0, overdue=0)
        for name in "abc":
            await sup.start_child(ChildSpec(name, forever))
        await sup.terminate_child("b")
        assert sup.count_children() == ChildCounts(specs=3, active=2, terminated=1, overdue=0)


# -- significant children and auto_shutdown ----------------------------------------------------


def test_a_significant_child_must_not_be_permanent() -> None:
    with pytest.raises(ValueError, match="significant child must be 'transient' or 'temporary'"):
        ChildSpec("main", forever, significant=True)


async def test_significant_children_need_an_auto_shutdown(autojump_clock: Any) -> None:
    with pytest.raises(ValueError, match="auto_shutdown"):
        async with open_supervisor(auto_shutdown="sometimes"):  # type: ignore[arg-type]
            pytest.fail("the block must not run")
    async with open_supervisor() as sup:
        with pytest.raises(ValueError, match="significant but the supervisor's auto_shutdown"):
            await sup.start_child(ChildSpec("m", forever, restart="transient", significant=True))
        assert sup.children() == ()


async def returns_after(seconds: float) -> None:
    await trio.sleep(seconds)


async def test_any_significant_ends_the_supervisor_when_its_main_child_ends(
    autojump_clock: Any,
) -> None:
    family = Family()
    body_cancelled = False
    async with open_supervisor(auto_shutdown="any_significant") as sup:
        await sup.start_child(ChildSpec("helper", family.child("helper", cleanup=1)))
        main = functools.partial(returns_after, 2)
        await sup.start_child(ChildSpec("main", main, restart="transient", significant=True))
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            body_cancelled = True
            raise
    assert body_cancelled  # and the block exited without an error
    assert family.rounded()[1:] == [("stop helper", 2.0), ("stopped helper", 3.0)]
    with pytest.raises(RuntimeError, match="stopping"):
        await sup.start_child(ChildSpec("late", forever))


async def test_all_significant_waits_for_the_last_significant_child(autojump_clock: Any) -> None:
    async with open_supervisor(auto_shutdown="all_significant") as sup:
        await sup.start_child(ChildSpec("helper", forever))
        for seconds in (1, 3):
            start = functools.partial(returns_after, seconds)
            await sup.start_child(ChildSpec(f"m{seconds}", start, "temporary", significant=True))
        await trio.sleep_forever()
    assert trio.current_time() == 3.0


async def test_only_a_significant_child_ending_on_its_own_ends_the_supervisor(
    autojump_clock: Any,
) -> None:
    crashes = 0

    async def crashes_once() -> None:
        nonlocal crashes
        await trio.sleep(1)
        if not crashes:
            crashes += 1
            raise Boom("restarted: not an end")
        await trio.sleep_forever()

    async with open_supervisor(auto_shutdown="any_significant") as sup:
        await sup.start_child(ChildSpec("crashy", crashes_once, "transient", significant=True))
        await sup.start_child(ChildSpec("stopped", forever, "temporary", significant=True))
        await sup.terminate_child("stopped")  # the supervisor's doing: not an end either
        await trio.sleep(10)
        assert [(c.name, c.state) for c in sup.children()] == [("crashy", "running")]


# -- nesting ----------------------------------------------------------------------------------


async def test_a_transient_parent_restarts_a_child_supervisor_that_gave_up(
    autojump_clock: Any,
) -> None:
    runs = 0

    async def crashing_subtree() -> None:
        nonlocal runs
        runs += 1
        async with open_supervisor(max_restarts=0) as inner:
            await inner.start_child(ChildSpec("crash", functools.partial(crash_after, 1)))
            await trio.sleep_forever()

    with pytest.raises(SupervisorError, match="'subtree'") as raised:
        async with open_supervisor(max_restarts=2, within=100) as outer:
            await outer.start_child(ChildSpec("subtree", crashing_subtree, restart="transient"))
            await trio.sleep_forever()
    # Each give-up is a failure the parent restarts, until the parent gives up in turn.
    assert runs == 3
    assert [type(f.exception) for f in raised.value.failures] == [SupervisorError] * 3
    assert "'crash'" in str(raised.value.__cause__)


async def test_a_transient_parent_does_not_restart_a_child_supervisor_that_shut_down(
    autojump_clock: Any,
) -> None:
    runs = 0

    async def subtree() -> None:
        nonlocal runs
        runs += 1
        async with open_supervisor(auto_shutdown="any_significant") as inner:
            main = functools.partial(returns_after, 1)
            await inner.start_child(ChildSpec("main", main, "transient", significant=True))
            await trio.sleep_forever()

    async with open_supervisor() as outer:
        await outer.start_child(ChildSpec("subtree", subtree, restart="transient"))
        await trio.sleep(10)
        assert outer.children() == ()
    assert runs == 1


async def crash_after(seconds: float) -> None:
    await trio.sleep(seconds)
    raise Boom(f"crashed after {seconds} s")


# -- the dynamic (template) form --------------------------------------------------------------


async def test_a_dynamic_supervisor_starts_many_children_of_one_template(
    autojump_clock: Any,
) -> None:
    log: list[tuple[str, int, float]] = []

    async def worker(port: int, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        log.append(("start", port, trio.current_time()))
        task_status.started(f"listening on {port}")
        try:
            if port == 2 and sum(e[1] == 2 for e in log) == 1:
                await trio.sleep(1)
                raise Boom("crash once")
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(1)
            log.append(("stopped", port, trio.current_time()))

    template = ChildSpec("w", worker, restart="transient", shutdown_timeout=5)
    async with open_dynamic_supervisor(template, jitter=0.0) as dyn:
        assert dyn.template is template
        assert await dyn.start_child(1) == DynamicChild("w-1", "listening on 1")
        assert await dyn.start_child(2, name="two") == DynamicChild("two", "listening on 2")
        assert await dyn.start_child(3) == DynamicChild("w-2", "listening on 3")
        await trio.sleep(5)  # "two" crashed at 1, stopped at 2, restarted with its args
        assert dyn.restart_count == 1
        assert [(c.name, c.restarts) for c in dyn.children()] == [
            ("w-1", 0),
            ("two", 1),
            ("w-2", 0),
        ]
        await dyn.terminate_child("w-1")  # removed, not kept
        assert [c.name for c in dyn.children()] == ["two", "w-2"]
        assert dyn.count_children() == ChildCounts(specs=2, active=2, terminated=0, overdue=0)
        with pytest.raises(KeyError):
            await dyn.terminate_child("w-1")
        assert await dyn.start_child(4) == DynamicChild("w-3", "listening on 4")
        stopping_at = trio.current_time()
    # Stopped all at once on exit: 1 s of cleanup each, 1 s in all.
    assert trio.current_time() == stopping_at + 1
    assert sorted(p for event, p, _ in log if event == "stopped") == [1, 2, 2, 3, 4]
    assert [(e, p) for e, p, _ in log if p == 2] == [
        ("start", 2),
        ("stopped", 2),
        ("start", 2),
        ("stopped", 2),
    ]


async def test_a_dynamic_supervisor_refuses_a_significant_template(autojump_clock: Any) -> None:
    template = ChildSpec("w", forever, restart="temporary", significant=True)
    with pytest.raises(ValueError, match="significant"):
        async with open_dynamic_supervisor(template):
            pytest.fail("the block must not run")


async def test_cancelled_terminate_and_restart_child_leave_the_child_terminated(
    autojump_clock: Any,
) -> None:
    family = Family()
    async with open_supervisor() as sup:
        await sup.start_child(ChildSpec("a", family.child("a", cleanup=2)))
        with trio.move_on_after(1):
            await sup.terminate_child("a")  # only the wait is cut short
        assert trio.current_time() == 1.0
        assert sup.children()[0].state == "terminated"
        with trio.move_on_after(0.5) as waited:
            await sup.restart_child("a")  # waits for the instance stopping until 2
        assert waited.cancelled_caught
        assert sup.children()[0].state == "terminated"
        await sup.restart_child("a")
        assert trio.current_time() == 2.0
    assert alive_at_once(family, "a") == 1
    assert family.runs == {"a": 2}


async def test_dynamic_names_skip_those_taken(autojump_clock: Any) -> None:
    async with open_dynamic_supervisor(ChildSpec("w", forever)) as dyn:
        await dyn.start_child(name="w-1")
        assert (await dyn.start_child()).name == "w-2"
        with pytest.raises(ValueError, match="'w-2' is already supervised"):
            await dyn.start_child(name="w-2")
