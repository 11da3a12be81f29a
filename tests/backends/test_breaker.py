"""The per-plugin crash breaker: its state machine on trio's MockClock (no processes), its
options, and the subprocess backend refusing a plugin whose children keep crashing, for real
(the worker pool's real-process tests are in test_worker_pool_faults.py)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from plugin_execution import (
    ExecutionRequest,
    InvalidRequestError,
    PluginQuarantinedError,
    PluginRegistry,
    WorkerCrashedError,
    WorkspaceManager,
    create_execution_backend,
)
from plugin_execution.backends._breaker import CrashBreaker


def kill(breaker: CrashBreaker, plugin: str, times: int = 1) -> None:
    for _ in range(times):
        trial = breaker.admit(plugin)
        breaker.record(plugin, True, trial=trial)


async def test_trips_after_threshold_kills_in_a_row_and_refuses_for_the_cooldown(
    autojump_clock: Any,
) -> None:
    breaker = CrashBreaker(3, 10.0)
    kill(breaker, "p", 2)
    assert breaker.quarantined() == {}
    kill(breaker, "p")
    assert breaker.quarantined() == {"p": 10.0}
    assert breaker.trips == 1
    await trio.sleep(4)
    with pytest.raises(PluginQuarantinedError) as info:
        breaker.admit("p")
    assert info.value.code == "PLUGIN_QUARANTINED"
    assert info.value.plugin_id == "p"
    assert info.value.retry_after_s == pytest.approx(6.0)
    assert info.value.details["threshold"] == 3
    assert breaker.admit("other") is False  # per plugin
    assert breaker.refused == 1


async def test_an_execution_that_leaves_its_worker_alive_resets_the_count(
    autojump_clock: Any,
) -> None:
    breaker = CrashBreaker(3, 10.0)
    for _ in range(5):
        kill(breaker, "p", 2)
        breaker.record("p", False, trial=breaker.admit("p"))
    assert breaker.quarantined() == {} and breaker.trips == 0
    assert breaker.details()["quarantined"] == {}


async def test_after_the_cooldown_one_trial_runs_and_its_outcome_decides(
    autojump_clock: Any,
) -> None:
    breaker = CrashBreaker(2, 10.0)
    kill(breaker, "p", 2)
    await trio.sleep(10)
    assert breaker.admit("p") is True  # the trial
    with pytest.raises(PluginQuarantinedError, match="until a trial execution ends"):
        breaker.admit("p")  # others wait for its verdict
    breaker.record("p", True, trial=True)  # it killed its worker too: open again
    assert breaker.quarantined() == {"p": 10.0}
    assert breaker.trips == 2
    await trio.sleep(10)
    assert breaker.admit("p") is True
    breaker.record("p", False, trial=True)  # it survived: closed
    assert breaker.quarantined() == {}
    assert breaker.admit("p") is False
    kill(breaker, "p")  # the count starts afresh
    assert breaker.quarantined() == {}


async def test_a_trial_that_never_ran_gives_its_turn_to_the_next(autojump_clock: Any) -> None:
    breaker = CrashBreaker(1, 5.0)
    kill(breaker, "p")
    await trio.sleep(5)
    assert breaker.admit("p") is True
    breaker.record("p", None, trial=True)  # e.g. cancelled while queued
    assert breaker.quarantined() == {"p": 0.0}
    assert breaker.admit("p") is True


async def test_successes_while_open_do_not_close_it(autojump_clock: Any) -> None:
    """Executions admitted before the trip may end after it: only a trial closes."""
    breaker = CrashBreaker(1, 5.0)
    kill(breaker, "p")
    breaker.record("p", False)
    assert set(breaker.quarantined()) == {"p"}


@pytest.mark.parametrize("threshold", [0, None])
async def test_off(autojump_clock: Any, threshold: int | None) -> None:
    breaker = CrashBreaker(threshold, 5.0)
    kill(breaker, "p", 100)
    assert breaker.admit("p") is False
    assert breaker.details()["enabled"] is False


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="crash_breaker_threshold"):
        CrashBreaker(-1, 5.0)
    with pytest.raises(ValueError, match="crash_breaker_cooldown"):
        CrashBreaker(3, -1.0)


@pytest.mark.parametrize("backend_type", ["worker-pool", "subprocess"])
@pytest.mark.parametrize(
    "options",
    [{"crash_breaker_threshold": -1}, {"crash_breaker_cooldown": -5}],
)
def test_bad_breaker_options_are_invalid_requests(
    registry: PluginRegistry, backend_type: str, options: dict[str, Any]
) -> None:
    with pytest.raises(InvalidRequestError, match="crash_breaker"):
        create_execution_backend(type=backend_type, registry=registry, **options)


async def test_the_subprocess_backend_quarantines_a_plugin_whose_children_crash(
    registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    registry.register(
        {
            "id": "tests.crashy",
            "root": str(registry.get("tests.sample").root),
            "handlers": [{"id": "run", "entry": "crashy:run"}],
        }
    )
    crashy = ExecutionRequest(plugin_id="tests.crashy", handler_id="run")
    async with create_execution_backend(
        type="subprocess",
        registry=registry,
        workspace=workspaces,
        crash_breaker_threshold=2,
        crash_breaker_cooldown=600,
    ) as backend:
        for _ in range(2):
            with pytest.raises(WorkerCrashedError):
                await backend.execute(crashy)
        for _ in range(5):
            with pytest.raises(PluginQuarantinedError):
                await backend.execute(crashy)
        other = ExecutionRequest(plugin_id="tests.sample", handler_id="add", input={"a": 1, "b": 2})
        assert (await backend.execute(other)).output == 3
        stats = backend.stats()
        assert stats.failed_by_code == {"WORKER_CRASHED": 2, "PLUGIN_QUARANTINED": 5}
        assert set(stats.details["crash_breaker"]["quarantined"]) == {"tests.crashy"}
        health = await backend.health()
        assert health.details["crash_breaker"]["refused"] == 5
