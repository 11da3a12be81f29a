"""WorkerPoolBackend under repeated faults (issue 14, items 1-3), each mounted for real.

- the pool never has more than ``max_workers`` worker processes alive, whatever crashes;
- a worker killed by its work fails that execution only: replaced at once, no restart
  charged; a plugin that keeps doing it is quarantined while everyone else is served;
- a worker being killed (or exiting: out of memory) is never handed another execution.
"""

from __future__ import annotations

import os
import random
import signal

import pytest
import trio

from conftest import PLUGINS, child_pids
from plugin_execution import (
    ExecutionError,
    ExecutionRequest,
    ExecutionTimeoutError,
    PluginQuarantinedError,
    PluginRegistry,
    WorkerCrashedError,
    WorkspaceManager,
    create_execution_backend,
)

P = "tests.sample"
CRASHY = "tests.crashy"


def req(handler: str, input: object = None, plugin: str = P, **kw: object) -> ExecutionRequest:
    return ExecutionRequest(plugin_id=plugin, handler_id=handler, input=input, **kw)  # type: ignore[arg-type]


def pool(registry: PluginRegistry, workspaces: WorkspaceManager, **options: object):  # type: ignore[no-untyped-def]
    options.setdefault("cancel_grace", 0.3)
    return create_execution_backend(
        type="worker-pool", registry=registry, workspace=workspaces, **options
    )


def register_crashy(registry: PluginRegistry) -> None:
    """A plugin whose only handler kills its worker on every call (tests/plugins/crashy.py)."""
    registry.register(
        {"id": CRASHY, "root": str(PLUGINS), "handlers": [{"id": "run", "entry": "crashy:run"}]}
    )


async def full_strength(backend, workers: int, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while (await backend.health()).details["workers_idle"] < workers:
            await trio.sleep(0.02)


async def crashes_counted(backend, crashes: int) -> None:  # type: ignore[no-untyped-def]
    """Wait until the slots have replaced ``crashes`` crashed workers (counted as they do)."""
    with trio.fail_after(30):
        while backend.stats().worker_crashes < crashes:
            await trio.sleep(0.02)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def live_workers() -> set[int]:
    """The pool's worker processes now, from /proc: this process's children and its
    zygote's, zombies included (a worker counts until it is reaped), less the zygote. Only
    Python processes count: the zygote's warm-up runs ``ldconfig`` (ctypes' find_library)."""
    pids = set()
    for pid in child_pids():
        if b"--zygote" in _read(f"/proc/{pid}/cmdline").split(b"\0"):
            pids |= child_pids(pid)
        else:
            pids.add(pid)
    return {pid for pid in pids if b"(python" in _read(f"/proc/{pid}/stat")[:40]}


class Sampler:
    """Samples :func:`live_workers` until cancelled; keeps the largest count seen.

    It starts once the pool's zygote is up: until then the zygote's own start (before its
    exec, and its ldconfig before that one's) would look like one more worker."""

    def __init__(self, backend) -> None:  # type: ignore[no-untyped-def]
        self.backend = backend
        self.peak = 0
        self.samples = 0

    async def run(self) -> None:
        with trio.fail_after(30):
            while self.backend._launcher.zygote.current is None:
                await trio.sleep(0.01)
        while True:
            seen = live_workers()
            self.peak = max(self.peak, len(seen))
            self.samples += 1
            await trio.sleep(0.002)


# -- 1. bounds --------------------------------------------------------------------------


async def test_crashes_never_grow_the_pool_past_max_workers(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    """The issue's case: min=max=2, six executions calling os._exit(3), then 8 at once."""
    async with pool(
        registry, workspaces, min_workers=2, max_workers=2, crash_breaker_threshold=0
    ) as backend:
        await full_strength(backend, 2)
        sampler = Sampler(backend)
        async with trio.open_nursery() as sampling:
            sampling.start_soon(sampler.run)
            for _ in range(6):
                with pytest.raises(WorkerCrashedError) as info:
                    await backend.execute(req("crash", {"code": 3}))
                assert info.value.exit_code == 3
            await crashes_counted(backend, 6)
            await full_strength(backend, 2)
            states = backend.stats().details["workers"]
            assert sum(states.values()) == 2, states
            pids: set[int] = set()

            async def whoami() -> None:
                pids.add((await backend.execute(req("sleep_sync", {"seconds": 0.2}))).worker_id)

            async with trio.open_nursery() as callers:
                for _ in range(8):
                    callers.start_soon(whoami)
            sampling.cancel_scope.cancel()
        assert len(pids) <= 2, pids
        assert sampler.samples > 0 and sampler.peak <= 2
        stats = backend.stats()
        assert stats.worker_crashes == 6
        assert stats.details["workers_peak"] == 2
        assert (await backend.health()).details["workers_peak"] == 2
        assert stats.details["restarts"] == 0  # the work killed them: no restart charged


async def test_live_workers_stay_within_max_workers_under_crashing_load(
    registry, workspaces
) -> None:  # type: ignore[no-untyped-def]
    """64 callers, ~5% of executions crash or are killed for a timeout, workers recycled
    every few executions (successors started ahead): /proc never shows more than
    max_workers workers, and neither does the peak the pool reports."""
    max_workers = 4
    rng = random.Random(14)
    outcomes: dict[str, int] = {}

    async def caller(backend, n: int) -> None:  # type: ignore[no-untyped-def]
        for _ in range(n):
            roll = rng.random()
            if roll < 0.03:
                request, timeout = req("crash", {"code": 3}), None
            elif roll < 0.05:
                request, timeout = req("spin"), 0.3
            else:
                request, timeout = req("echo", "hi"), None
            result = await backend.execute(request, timeout=timeout, raise_errors=False)
            code = "ok" if result.ok else result.error.code
            outcomes[code] = outcomes.get(code, 0) + 1

    async with pool(
        registry,
        workspaces,
        min_workers=1,
        max_workers=max_workers,
        max_executions_per_worker=10,
        max_queue=1000,
        acquire_timeout=60,
    ) as backend:
        sampler = Sampler(backend)
        async with trio.open_nursery() as sampling:
            sampling.start_soon(sampler.run)
            with trio.fail_after(120):
                async with trio.open_nursery() as callers:
                    for _ in range(64):
                        callers.start_soon(caller, backend, 8)
            sampling.cancel_scope.cancel()
        stats = backend.stats()
        states = stats.details["workers"]
    assert sum(outcomes.values()) == 64 * 8
    assert set(outcomes) <= {"ok", "WORKER_CRASHED", "TIMEOUT"}, outcomes
    assert outcomes.get("WORKER_CRASHED", 0) > 0 and outcomes["ok"] > 400
    assert sampler.samples > 10
    assert 1 <= sampler.peak <= max_workers
    assert sampler.peak <= stats.details["workers_peak"] <= max_workers
    assert sum(states.values()) <= max_workers, states
    assert stats.details["restarts"] == 0
    assert stats.workers_recycled > 0


# -- 2. restart intensity and the crash breaker ------------------------------------------


async def test_many_crashes_and_kills_do_not_exhaust_restart_intensity(
    registry, workspaces
) -> None:  # type: ignore[no-untyped-def]
    """max_restarts=2, yet 12 crashing and 4 timed-out executions: each fails alone, the
    pool serves on, and leaving the block raises nothing (no SupervisorError)."""
    async with pool(
        registry,
        workspaces,
        min_workers=2,
        max_workers=2,
        max_restarts=2,
        restart_window=600,
        crash_breaker_threshold=0,
    ) as backend:
        await full_strength(backend, 2)
        codes: list[str] = []

        async def one(request: ExecutionRequest, timeout: float | None) -> None:
            result = await backend.execute(request, timeout=timeout, raise_errors=False)
            codes.append("ok" if result.ok else result.error.code)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(12):
                    nursery.start_soon(one, req("crash", {"code": 3}), None)
                    nursery.start_soon(one, req("echo", i), None)
            await crashes_counted(backend, 12)
            for _ in range(4):  # one at a time: a timeout spent queued would kill nothing
                await full_strength(backend, 2)
                await one(req("spin"), 0.5)
            # A kill is counted by its slot once it has closed the killed worker, after the
            # caller got its TIMEOUT; the slot then starts its replacement. Back at full
            # strength, the last kill is counted too.
            await full_strength(backend, 2)
        assert codes.count("WORKER_CRASHED") == 12
        assert codes.count("TIMEOUT") == 4
        assert codes.count("ok") == 12
        assert (await backend.execute(req("add", {"a": 1, "b": 2}))).output == 3
        details = backend.stats().details
        assert details["restarts"] == 0
        assert details["workers_killed"] == 4
        assert backend.stats().worker_crashes == 12


async def test_a_worker_dying_idle_is_charged_as_a_restart(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    async with pool(registry, workspaces, min_workers=1, max_workers=1) as backend:
        await full_strength(backend, 1)
        pid = (await backend.execute(req("whoami"))).output["pid"]
        os.kill(pid, signal.SIGKILL)  # nothing running on it: the worker failed on its own
        with trio.fail_after(30):
            while backend.stats().details["restarts"] < 1:
                await trio.sleep(0.02)
        await full_strength(backend, 1)
        assert (await backend.execute(req("whoami"))).output["pid"] != pid
        assert backend.stats().details["restarts"] == 1


async def test_workers_killed_with_their_zygote_are_restarts_not_the_works_fault(  # type: ignore[no-untyped-def]
    registry, workspaces
) -> None:
    """The zygote dies (SIGKILL): its children go with it. A busy one's caller gets
    WORKER_CRASHED, but the plugin is not charged: the pool failed, not the work."""
    async with pool(
        registry, workspaces, min_workers=1, max_workers=1, crash_breaker_threshold=1
    ) as backend:
        await full_strength(backend, 1)
        with trio.fail_after(30):
            while True:  # the first worker may predate the zygote: replace it until forked
                pid = (await backend.execute(req("whoami"))).output["pid"]
                if backend._launcher.zygote.current is not None and pid in child_pids(
                    backend._launcher.zygote.current.pid
                ):
                    break
                restarts = backend.stats().details["restarts"]
                os.kill(pid, signal.SIGKILL)
                while backend.stats().details["restarts"] == restarts:
                    await trio.sleep(0.02)
                await full_strength(backend, 1)
        restarts = backend.stats().details["restarts"]
        zygote = backend._launcher.zygote.current.pid
        async with trio.open_nursery() as nursery:

            async def kill_zygote() -> None:
                await trio.sleep(0.3)
                os.kill(zygote, signal.SIGKILL)

            nursery.start_soon(kill_zygote)
            with pytest.raises(WorkerCrashedError):
                await backend.execute(req("sleep_sync", {"seconds": 30}))
        with trio.fail_after(30):
            while backend.stats().details["restarts"] == restarts:
                await trio.sleep(0.02)
        await full_strength(backend, 1)
        assert (await backend.execute(req("add", {"a": 1, "b": 1}))).output == 2
        breaker = backend.stats().details["crash_breaker"]
        assert breaker["quarantined"] == {} and breaker["trips"] == 0


async def test_a_sigkill_from_outside_is_not_held_against_the_plugin(registry, workspaces) -> None:  # type: ignore[no-untyped-def]
    """An operator (or the OOM killer) SIGKILLs busy workers: their callers get
    WORKER_CRASHED, the workers are replaced, and the plugin is not quarantined."""
    async with pool(
        registry, workspaces, min_workers=1, max_workers=1, crash_breaker_threshold=1
    ) as backend:
        for _ in range(3):
            await full_strength(backend, 1)
            pid = (await backend.execute(req("whoami"))).output["pid"]
            async with trio.open_nursery() as nursery:

                async def kill_soon(pid: int = pid) -> None:
                    await trio.sleep(0.3)
                    os.kill(pid, signal.SIGKILL)

                nursery.start_soon(kill_soon)
                with pytest.raises(WorkerCrashedError) as info:
                    await backend.execute(req("sleep_sync", {"seconds": 30}))
            assert info.value.signal == signal.SIGKILL
        assert (await backend.execute(req("add", {"a": 1, "b": 1}))).output == 2
        stats = backend.stats()
        assert stats.details["crash_breaker"]["trips"] == 0
        assert stats.details["restarts"] == 0  # busy: not the workers failing on their own


async def test_a_plugin_crashing_on_every_call_is_quarantined_and_others_served(  # type: ignore[no-untyped-def]
    registry, workspaces
) -> None:
    register_crashy(registry)
    async with pool(
        registry,
        workspaces,
        min_workers=2,
        max_workers=2,
        max_restarts=1,
        crash_breaker_threshold=3,
        crash_breaker_cooldown=600,
    ) as backend:
        await full_strength(backend, 2)
        for _ in range(3):
            with pytest.raises(WorkerCrashedError):
                await backend.execute(req("run", plugin=CRASHY))
        await crashes_counted(backend, 3)
        crashes = backend.stats().worker_crashes
        for _ in range(20):  # refused at once: no worker started, none killed
            with pytest.raises(PluginQuarantinedError) as info:
                await backend.execute(req("run", plugin=CRASHY))
            assert info.value.code == "PLUGIN_QUARANTINED"
            assert info.value.plugin_id == CRASHY
            assert 0 < info.value.retry_after_s <= 600
        # Everyone else is served, by workers that are not replaced any more.
        results = [await backend.execute(req("echo", i)) for i in range(10)]
        assert [r.output for r in results] == list(range(10))
        stats = backend.stats()
        assert stats.worker_crashes == crashes == 3
        assert stats.failed_by_code["PLUGIN_QUARANTINED"] == 20
        breaker = stats.details["crash_breaker"]
        assert set(breaker["quarantined"]) == {CRASHY}
        assert breaker["trips"] == 1 and breaker["refused"] == 20
        health = await backend.health()
        assert health.status == "degraded"
        assert CRASHY in health.details["crash_breaker"]["quarantined"]
        assert stats.details["restarts"] == 0


@pytest.mark.parametrize("workers", [1, 2])
async def test_workers_that_cannot_start_fail_the_block_with_a_bare_worker_crashed(  # type: ignore[no-untyped-def]
    registry, workspaces, workers
) -> None:
    """Every worker dies at start (an address-space limit no Python starts in): entering
    the block raises the WorkerCrashedError itself, not the group the start-up's tasks
    wrap it in, however many workers fail at once. Nothing is left behind."""
    with pytest.raises(WorkerCrashedError) as info:
        async with pool(
            registry, workspaces, min_workers=workers, max_workers=workers, memory_mb=1
        ):
            raise AssertionError("a worker started under a 1 MiB address-space limit")
    assert "exited with status" in info.value.message
    assert all("WorkerCrashedError" in note for note in getattr(info.value, "__notes__", []))
    assert not live_workers()


# -- 3. a worker being killed takes no more work -----------------------------------------


@pytest.mark.parametrize("path", ["address_space", "quota"])
async def test_the_execution_after_a_memory_kill_runs_on_a_fresh_worker(  # type: ignore[no-untyped-def]
    registry, workspaces, path
) -> None:
    """A handler over its memory limit is killed (the worker's address-space limit: it
    reports and exits; or the plugin's quota, sampled by the host); the innocent execution
    sent right after must not land on that dying worker. Five times."""
    options: dict[str, object] = {"min_workers": 1, "max_workers": 1}
    quotas = {"timeout": 60}
    if path == "address_space":
        options["memory_mb"] = 400
    else:
        quotas["memory_mb"] = 150
    registry.register(
        {
            "id": "tests.hungry",
            "root": str(PLUGINS),
            "handlers": [{"id": "keep", "entry": "hog:keep"}],
            "permissions": {"quotas": quotas},
        }
    )
    async with pool(registry, workspaces, crash_breaker_threshold=0, **options) as backend:
        await full_strength(backend, 1)
        errors: list[ExecutionError] = []

        async def hungry() -> None:
            with pytest.raises(WorkerCrashedError) as info:
                await backend.execute(req("keep", {"mb": 600}, plugin="tests.hungry"))
            errors.append(info.value)

        for _ in range(5):
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(hungry)
                    await trio.sleep(0.05)  # queued behind it, as the next caller would be
                    innocent = await backend.execute(req("add", {"a": 2, "b": 3}))
            assert innocent.output == 5
            assert errors[-1].details["reason"] == "memory_limit"
        assert backend.stats().failed_by_code == {"WORKER_CRASHED": 5}
        assert backend.stats().details["restarts"] == 0


async def test_a_timed_out_worker_is_handed_nothing_while_it_is_killed(
    registry, workspaces
) -> None:  # type: ignore[no-untyped-def]
    """A CPU loop past its timeout: the worker is killed; the caller queued behind it runs
    on its replacement."""
    async with pool(registry, workspaces, min_workers=1, max_workers=1) as backend:
        await full_strength(backend, 1)
        for _ in range(3):
            await full_strength(backend, 1)  # so the whole timeout is spent running
            async with trio.open_nursery() as nursery:

                async def spin() -> None:
                    with pytest.raises(ExecutionTimeoutError):
                        await backend.execute(req("spin"), timeout=0.5)

                nursery.start_soon(spin)
                await trio.sleep(0.05)
                assert (await backend.execute(req("add", {"a": 1, "b": 1}))).output == 2
        assert backend.stats().details["workers_killed"] == 3
