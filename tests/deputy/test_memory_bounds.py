"""The host's memory is not the plugin's to fill: every buffer the host keeps for a plugin
is bounded in bytes (issue 20, item 4).

Each test mounts the attack for real, from a handler on a real backend, with the limits
configured small and the attack many times over them, and checks what the host holds after
(the buffer is within its bound) and how its own memory grew meanwhile: ``tracemalloc``
(allocations of this process, exact) and ``VmRSS`` (generous slack: the allocator keeps what
it freed). Without the bounds each attack would leave this process holding 30-250 MiB.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from plugin_execution import (
    ExecutionBackend,
    ExecutionRequest,
    PluginRegistry,
    WorkerCrashedError,
    WorkspaceManager,
    create_execution_backend,
)
from plugin_execution.host.process import WorkerProcess
from plugin_execution.platform import EventBus, MemoryCache, Platform
from plugin_execution.protocol import MAX_ID_LENGTH

PLUGINS = Path(__file__).parents[1] / "plugins"
PLUGIN = "deputy.bounds"
MiB = 1024 * 1024
BACKENDS: dict[str, dict[str, Any]] = {
    "in-process": {},
    "worker-pool": {"min_workers": 1, "max_workers": 1},
    "subprocess": {"start_method": "spawn"},
    "zygote": {"start_method": "zygote"},
}
PROCESS_BACKENDS = ["worker-pool", "subprocess", "zygote"]


class Growth:
    """How much this process's memory grew over a block (see :func:`host_memory`)."""

    current = peak = rss = 0


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@contextmanager
def host_memory() -> Iterator[Growth]:
    """Measure the block: allocations still alive after it (``current``), the most alive at
    once during it (``peak``), both as traced by ``tracemalloc``, and the growth of RSS."""
    growth = Growth()
    gc.collect()
    rss = _rss()
    tracemalloc.start()
    try:
        yield growth
    finally:
        gc.collect()
        growth.current, growth.peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        growth.rss = _rss() - rss


def within(growth: Growth, bound: int, *, slack: int = 16 * MiB) -> None:
    """The host held at most ``bound`` plus transient copies (``slack``) at any time, and
    RSS grew by no more than that plus what an allocator keeps (64 MiB more)."""
    assert growth.current <= bound + slack, f"{growth.current / MiB:.1f} MiB still held"
    assert growth.peak <= bound + 2 * slack, f"{growth.peak / MiB:.1f} MiB at the peak"
    assert growth.rss <= bound + 2 * slack + 64 * MiB, f"RSS grew {growth.rss / MiB:.1f} MiB"


@pytest.fixture
def plugins() -> PluginRegistry:
    registry = PluginRegistry()
    handlers = (
        "fill_cache",
        "flood_subscribers",
        "emit_blobs",
        "emit_blobs_nowait",
        "forge_pcalls",
        "invoke_many",
        "hold",
    )
    registry.register(
        {
            "id": PLUGIN,
            "root": str(PLUGINS),
            "handlers": [{"id": h, "entry": f"deputy_bounds:{h}"} for h in handlers],
            "permissions": {
                "platform": ["cache", "events:flood.*"],
                "invoke": {"allow": [PLUGIN]},
            },
        }
    )
    return registry


@pytest.fixture
def platform(tmp_path: Path) -> Platform:
    return Platform(
        storage_root=tmp_path / "storage",
        cache=MemoryCache(max_bytes=8 * MiB, max_owner_bytes=4 * MiB),
        events=EventBus(subscriber_bytes=MiB, owner_bytes=4 * MiB, max_bytes=8 * MiB),
    )


@asynccontextmanager
async def _open(
    kind: str, plugins: PluginRegistry, workspaces: WorkspaceManager, platform: Platform, **kw: Any
) -> AsyncIterator[ExecutionBackend]:
    options = dict(BACKENDS[kind])
    backend_type = "subprocess" if kind == "zygote" else kind
    async with create_execution_backend(
        type=backend_type,
        registry=plugins,
        workspace=workspaces,
        platform=platform,
        **options,
        **kw,
    ) as backend:
        yield backend


@pytest.fixture(params=list(BACKENDS))
async def backend(
    request: pytest.FixtureRequest,
    plugins: PluginRegistry,
    workspaces: WorkspaceManager,
    platform: Platform,
) -> AsyncIterator[ExecutionBackend]:
    async with _open(request.param, plugins, workspaces, platform) as backend:
        yield backend


def run(handler: str, input: Any) -> ExecutionRequest:
    return ExecutionRequest(plugin_id=PLUGIN, handler_id=handler, input=input, timeout=60)


# -- ctx.cache ----------------------------------------------------------------------------


async def test_cache_holds_its_byte_bound_per_plugin_and_in_all(backend: ExecutionBackend) -> None:
    """The issue's 80 x 25 MB ``ctx.cache.set``, scaled: 160 x 1 MiB against a plugin bound
    of 4 MiB. The least recently used of the plugin's own entries go."""
    cache = backend.platform.cache
    assert isinstance(cache, MemoryCache)
    await cache.set("host-ns", "kept", b"h" * MiB, None, owner="host")  # another owner's entry
    with host_memory() as growth:
        result = await backend.execute(run("fill_cache", {"count": 160, "size": MiB}))
        assert result.output == 160
    assert cache.owner_bytes(PLUGIN) <= cache.max_owner_bytes == 4 * MiB
    assert cache.size_bytes <= cache.max_bytes
    assert cache.owner_bytes("host") == MiB + len("host-ns") + len("kept")
    assert await cache.get("host-ns", "kept") == b"h" * MiB  # not evicted by the flood
    assert await cache.get(PLUGIN, "k159") is not None  # the newest stayed
    assert await cache.get(PLUGIN, "k0") is None  # the oldest went
    within(growth, cache.max_owner_bytes)


async def test_a_value_over_the_plugin_bound_is_refused() -> None:
    cache = MemoryCache(max_bytes=4 * MiB, max_owner_bytes=MiB)
    with pytest.raises(ValueError, match="per plugin"):
        await cache.set("p", "k", bytes(2 * MiB), None, owner="p")
    assert len(cache) == 0 and cache.size_bytes == 0
    await cache.set("p", "k", bytes(1000), None, owner="p")
    await cache.delete("p", "k")
    assert cache.size_bytes == 0 and cache.owner_bytes("p") == 0


# -- ctx.events ---------------------------------------------------------------------------


async def test_event_subscribers_share_one_payload_within_byte_bounds(
    backend: ExecutionBackend,
) -> None:
    """The issue's 64 subscriptions x 8 publishes of 4 MB, scaled to 512 KiB events: one
    copy per subscriber was 256 MiB. Now the payload is shared, and the plugin's unread
    subscriptions hold at most its 4 MiB."""
    bus = backend.platform.events
    size = 512 * 1024
    attack = {"topic": "flood.x", "subscriptions": 64, "publishes": 8, "size": size}
    with host_memory() as growth:
        reached = (await backend.execute(run("flood_subscribers", attack))).output
    assert sum(reached) * size <= bus.owner_bytes  # the rest was dropped, not queued
    assert sum(reached) > 0
    assert bus.held_bytes == 0 and bus.subscribers("flood.x") == 0  # gone with the execution
    within(growth, bus.max_bytes)


async def test_host_subscribers_get_copies_of_one_shared_payload() -> None:
    bus = EventBus(subscriber_bytes=1000, max_bytes=1500)
    with bus.subscribe("t") as one, bus.subscribe("t") as two:
        assert bus.publish("t", {"blob": b"x" * 600}) == 2
        assert bus.held_bytes < 700  # one payload, not two
        assert bus.publish("t", {"blob": b"y" * 600}) == 0  # over each subscriber's bound
        assert (one.dropped, two.dropped) == (1, 1)
        first, second = await one.receive(), await two.receive()
        assert first["data"] == second["data"] and first["data"] is not second["data"]
        assert bus.held_bytes == 0
        with pytest.raises(Exception, match="over the event bus's limit"):
            bus.publish("t", b"z" * 2000)


# -- open_execution -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", [*PROCESS_BACKENDS, "in-process"])
async def test_unread_execution_events_are_bounded_in_bytes(
    kind: str, plugins: PluginRegistry, workspaces: WorkspaceManager, platform: Platform
) -> None:
    """The issue's consumer that never reads while the handler emits 200 x 10 MB, scaled to
    200 x 1 MiB against a 4 MiB stream buffer (8 MiB for all streams): events past the bound
    are dropped and counted; the execution still ends well."""
    handler = "emit_blobs_nowait" if kind == "in-process" else "emit_blobs"
    async with _open(kind, plugins, workspaces, platform, max_event_bytes=8 * MiB) as backend:
        request = run(handler, {"count": 200, "size": MiB})
        with host_memory() as growth:
            async with backend.open_execution(request, buffer_bytes=4 * MiB) as execution:
                result = await execution.result()  # never reading execution.events
                assert result.output == 200
                assert backend.event_bytes.used <= 4 * MiB
                assert 196 <= result.metadata["events_dropped"] < 200
            assert backend.event_bytes.used == 0  # the unread ones went with the block
        within(growth, 4 * MiB)


async def test_awaited_in_process_emits_wait_for_room_in_bytes(
    plugins: PluginRegistry, workspaces: WorkspaceManager, platform: Platform
) -> None:
    """In-process, ``await ctx.emit`` waits for the consumer instead (backpressure): every
    event arrives, and the buffer never held more than its bound."""
    async with _open("in-process", plugins, workspaces, platform) as backend:
        request = run("emit_blobs", {"count": 20, "size": MiB})
        most = 0
        async with backend.open_execution(request, buffer_bytes=3 * MiB) as execution:
            got = 0
            async for _event in execution.events:
                most = max(most, backend.event_bytes.used)
                got += 1
                await trio.lowlevel.checkpoint()
            result = await execution.result()
        assert got == 20 and "events_dropped" not in result.metadata
        assert most <= 3 * MiB


# -- forged platform calls ----------------------------------------------------------------


def _procs(backend: ExecutionBackend) -> list[WorkerProcess]:
    return [w.proc for w in backend._workers.values() if w.proc is not None]  # type: ignore[attr-defined]


async def test_platform_calls_for_unknown_executions_leave_nothing(
    plugins: PluginRegistry, workspaces: WorkspaceManager, platform: Platform
) -> None:
    """A pool worker's handler writes 3,000 ``pcall`` frames for executions that do not
    exist to its own protocol socket: each is refused, and the host keeps nothing of them."""
    async with _open("worker-pool", plugins, workspaces, platform) as backend:
        forged = {"count": 3000, "id_length": MAX_ID_LENGTH, "linger": 0.2}
        with host_memory() as growth:
            result = await backend.execute(run("forge_pcalls", forged))
            assert result.output == 3000
            await trio.testing.wait_all_tasks_blocked(0.05)
        (proc,) = _procs(backend)
        assert proc.alive and proc.calls._calls == {} and list(proc.calls._jobs) == []
        within(growth, 0, slack=8 * MiB)


@pytest.mark.parametrize("kind", PROCESS_BACKENDS)
async def test_huge_execution_ids_are_a_protocol_error(
    kind: str, plugins: PluginRegistry, workspaces: WorkspaceManager, platform: Platform
) -> None:
    """The issue's 40 forged ``pcall`` frames with 30 MB execution ids, scaled to 8 x 4 MiB:
    the first is a protocol error, so the worker is dropped and nothing of it is kept."""
    async with _open(kind, plugins, workspaces, platform) as backend:
        forged = {"count": 8, "id_length": 4 * MiB, "linger": 5}
        with host_memory() as growth:
            with pytest.raises(WorkerCrashedError, match="protocol error") as info:
                await backend.execute(run("forge_pcalls", forged))
            assert f"at most {MAX_ID_LENGTH} characters" in info.value.message
        within(growth, 0)
        if kind == "worker-pool":  # the pool replaced the worker; no call was kept
            with trio.fail_after(30):
                while not _procs(backend):
                    await trio.sleep(0.05)
            assert all(proc.calls._calls == {} for proc in _procs(backend))


@pytest.mark.parametrize("kind", ["worker-pool", "subprocess"])
async def test_platform_calls_in_flight_are_bounded_in_bytes(
    kind: str, plugins: PluginRegistry, workspaces: WorkspaceManager, platform: Platform
) -> None:
    """40 ``ctx.invoke`` at once, each with a 4 MiB input: the host would hold all 160 MiB of
    their calls. Past 64 MiB of calls in flight for the execution, a call is refused at once.

    The first invocation holds the slot until 10 calls were refused, so none ends while the
    calls arrive, however slowly a loaded machine sends them: at most 16 fit (64 MiB), the
    rest are refused."""
    async with _open(kind, plugins, workspaces, platform) as backend:
        held = {"until": "refused", "pad": bytes(4 * MiB)}
        many = {
            **{"plugin": PLUGIN, "handler": "hold", "count": 40, "input": held},
            "release": ["refused", 10],
        }
        with host_memory() as growth:
            outcomes = (await backend.execute(run("invoke_many", many))).output
            # A result comes back before its child is reaped: wait for the invoked children.
            with trio.fail_after(30):
                while backend.stats().details.get("active_subprocesses"):
                    await trio.sleep(0.01)
        assert 1 <= outcomes.count("held") <= 16
        assert outcomes.count("INVALID_REQUEST") == 40 - outcomes.count("held")
        # Finished executions keep nothing big: not even in the worker's deadline heap,
        # which holds them until their deadline passes (or it is compacted).
        assert growth.current <= 16 * MiB, f"{growth.current / MiB:.1f} MiB still held"
        within(growth, 64 * MiB)
