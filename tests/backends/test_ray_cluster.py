"""The Ray backend's own local instance, and a two-node cluster simulated on this machine.

First the embedded default (no ``address``): the backend starts Ray on loopback for its block
and nothing of it is left afterwards (the autouse leak check sees every child process).
Then ``ray.cluster_utils.Cluster`` with two nodes, which the backend joins by its address
(and leaves running): executions land on both, and removing a node mid-run fails its in-flight
caller with ``WORKER_CRASHED`` naming the node while the backend carries on with a
replacement on the other node. Last, a local instance whose memory monitor is set just above
the machine's current use: it kills the actor of a handler that allocates, whose caller gets
``WORKER_CRASHED`` saying so (``reason`` ``memory_limit``, Ray's words, the node).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: loopback
ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'plugin-execution[ray]'")

from ray.cluster_utils import Cluster  # noqa: E402
from tests.conftest import _settle, child_pids, open_fds  # noqa: E402

from plugin_execution import (  # noqa: E402
    ExecutionRequest,
    PluginRegistry,
    WorkerCrashedError,
    create_execution_backend,
)

R = "tests.ray"
PLUGINS = Path(__file__).parents[1] / "plugins"
LISTENER_PORTS: set[int] = set()  # where the backends of this module took actors' connections


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """The suite's leak check, but for what Ray's driver library keeps open in this process
    after ``ray.shutdown()`` (its log files, event loops and connections: ~11 fds the first
    time, ~1 per instance after). Child processes are checked as strictly as everywhere,
    and no connection of the backend's own listener may remain."""
    fds_before = open_fds()
    children_before = child_pids()
    yield
    assert _settle(lambda: child_pids() <= children_before), (
        f"child processes leaked: {sorted(child_pids() - children_before)}"
    )
    ours = _tcp_inodes(LISTENER_PORTS)
    leaked = {fd: _link(fd) for fd in open_fds() - fds_before}
    assert all(_rays(link) and link[8:-1] not in ours for link in leaked.values()), leaked


def _link(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _rays(link: str) -> bool:
    return link.startswith(("/tmp/ray/", "anon_inode:", "socket:[")) or not link


def _tcp_inodes(ports: set[int]) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, remote = (int(a.rsplit(":", 1)[1], 16) for a in fields[1:3])
                if local in ports or remote in ports:
                    found.add(fields[9])
    return found


@pytest.fixture
def plugins() -> PluginRegistry:
    return PluginRegistry(
        [
            {
                "id": R,
                "root": str(PLUGINS),
                "handlers": [
                    {"id": "where", "entry": "ray_handlers:where"},
                    {"id": "allocate", "entry": "ray_handlers:allocate"},
                ],
            }
        ]
    )


def where(sleep: float = 0.0) -> ExecutionRequest:
    return ExecutionRequest(plugin_id=R, handler_id="where", input={"sleep": sleep})


async def test_the_default_is_a_local_loopback_instance_for_the_block(plugins, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A plugin whose code is on the driver's disk only while the backend starts: it runs
    # from the copy Ray shipped to the node (ship_plugins).
    root = tmp_path / "driver_only_plugin"
    root.mkdir()
    (root / "driver_only.py").write_text("def run(ctx, input):\n    return __file__\n")
    plugins.register(
        {
            "id": "t.shipped",
            "root": str(root),
            "handlers": [{"id": "run", "entry": "driver_only:run"}],
        }
    )
    assert not ray.is_initialized()
    options = {"min_workers": 1, "max_workers": 1, "ship_plugins": True}
    backend = create_execution_backend(type="ray", registry=plugins, **options)
    async with backend:
        LISTENER_PORTS.add(backend._launcher._listener.port)
        result = await backend.execute(where())
        assert result.ok and result.metadata["node_id"]
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        assert _listening_addresses() == {"127.0.0.1"}
        root.rename(tmp_path / "gone")
        shipped = await backend.execute(ExecutionRequest(plugin_id="t.shipped", handler_id="run"))
        assert "runtime_resources" in shipped.output and str(tmp_path) not in shipped.output
    assert not ray.is_initialized()  # shut down; the leak check sees its processes gone


def _listening_addresses() -> set[str]:
    """The local addresses of TCP sockets listening in this process's children (Ray's)."""
    inodes: set[str] = set()
    for pid in _descendants(os.getpid()):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    found.add(_address(fields[1].split(":")[0], v6))
    return found


def _address(hex_ip: str, v6: bool) -> str:
    import ipaddress

    raw = bytes.fromhex(hex_ip)
    if not v6:
        return str(ipaddress.IPv4Address(raw[::-1]))
    address = ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
    return str(address.ipv4_mapped or address)


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            parents[int(entry)] = int(stat[stat.rfind(b")") + 2 :].split()[1])
    found: set[int] = set()
    todo = [root]
    while todo:
        parent = todo.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                todo.append(pid)
    return found


@pytest.fixture
def cluster() -> Iterator[Any]:
    """Two nodes of 2 CPUs on loopback; no driver connected (the backend connects)."""
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 2, "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


async def test_two_nodes_run_executions_and_survive_losing_one(plugins, cluster) -> None:  # type: ignore[no-untyped-def]
    head = cluster.head_node.node_id
    (other,) = [node for node in cluster.list_all_nodes() if node is not cluster.head_node]
    options = {"min_workers": 2, "max_workers": 2, "scheduling_strategy": "SPREAD"}
    options["address"] = cluster.address  # a cluster's address: connect, leave it running
    async with create_execution_backend(type="ray", registry=plugins, **options) as backend:
        LISTENER_PORTS.add(backend._launcher._listener.port)
        with trio.fail_after(60):
            while (await backend.health()).details["workers_idle"] < 2:
                await trio.sleep(0.05)
        results: list[Any] = []
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(lambda: _append(results, backend.execute(where(0.2))))
        assert {r.metadata["node_id"] for r in results} == {head, other.node_id}

        # Both workers busy, one on each node; the non-head node goes away mid-run.
        outcomes: dict[str, Any] = {}

        async def call(name: str) -> None:
            try:
                outcomes[name] = await backend.execute(where(4))
            except WorkerCrashedError as exc:
                outcomes[name] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "a")
            nursery.start_soon(call, "b")
            await trio.sleep(1.5)
            await trio.to_thread.run_sync(cluster.remove_node, other)
        crashed = [o for o in outcomes.values() if isinstance(o, WorkerCrashedError)]
        finished = [o for o in outcomes.values() if not isinstance(o, WorkerCrashedError)]
        assert len(crashed) == 1 and len(finished) == 1
        assert crashed[0].details["node_id"] == other.node_id
        assert "its node has died" in crashed[0].details["cause"]
        assert finished[0].metadata["node_id"] == head

        # The pool replaced the lost worker, on the node that is left.
        with trio.fail_after(60):
            while (await backend.health()).details["workers_idle"] < 2:
                await trio.sleep(0.05)
        again: list[Any] = []
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(lambda: _append(again, backend.execute(where(0.2))))
        assert {r.metadata["node_id"] for r in again} == {head}
        assert len({r.worker_id for r in again}) == 2
    # The driver disconnected; the cluster (what is left of it) runs on.
    assert not ray.is_initialized()
    assert set(cluster.global_state._live_node_ids()) == {head}


async def _append(results: list[Any], call: Any) -> None:
    results.append(await call)


def _memory_used_and_total() -> tuple[int, int]:
    """This machine's memory in use and in all, in bytes, as Ray's memory monitor reads them
    when no cgroup limits it: ``MemTotal - MemAvailable`` of ``/proc/meminfo``."""
    info: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"], info["MemTotal"]


async def test_rays_memory_monitor_kill_is_a_crash_for_memory(plugins) -> None:  # type: ignore[no-untyped-def]
    # The monitor acts once the node's use passes the threshold: set it 1 GiB above what the
    # machine uses now (other processes come and go, hence the margin), and let the handler
    # take up to what would reach it even if everything else freed its memory.
    used, total = _memory_used_and_total()
    margin = 1 << 30
    assert used + 2 * margin < total, "this machine has too little memory free for the test"
    monitor = {"memory_usage_threshold": (used + margin) / total, "memory_monitor_refresh_ms": 50}
    options = {"min_workers": 1, "max_workers": 1, "ray_init": {"_system_config": monitor}}
    greedy = ExecutionRequest(
        plugin_id=R,
        handler_id="allocate",
        input={"step_mb": 64, "limit_mb": (used + margin) // (1 << 20) + 512},
    )
    assert not ray.is_initialized()
    async with create_execution_backend(type="ray", registry=plugins, **options) as backend:
        LISTENER_PORTS.add(backend._launcher._listener.port)
        first = await backend.execute(where())
        assert first.ok
        with pytest.raises(WorkerCrashedError) as caught:
            await backend.execute(greedy)
        crash = caught.value
        assert crash.details["reason"] == "memory_limit"
        assert crash.details["signal"] == signal.SIGKILL  # killed from outside: no breaker charge
        assert crash.details["node_id"] == first.metadata["node_id"]
        assert crash.details["cause"].startswith("OutOfMemoryError: ")
        assert "running low on memory" in crash.details["cause"]
        assert first.metadata["node_id"] in str(crash)

        # The backend carries on: a replacement actor runs the next execution.
        after = await backend.execute(where())
        assert after.ok and after.worker_id != first.worker_id
        assert after.metadata["node_id"] == first.metadata["node_id"]
    assert not ray.is_initialized()  # shut down; the leak check sees its processes gone
