"""The escape suite: real plugin handlers (tests/plugins/escape.py) that try to get out of the
kernel sandbox, each of which must fail with a clear error, the host unharmed.

Run against the default sandbox (every layer this machine has) on the subprocess backend with
both start methods and on the sandboxed worker pool (``"pool"``: warm workers, one plugin
each), then layer by layer, to show what each layer stops on its own; then the attempts that
only a warm worker invites (another plugin's workspace, a sibling worker, a thread left
behind). A test that needs a layer skips only
when the machine lacks it, with the reason. The control test first shows that the attempts do
succeed with the sandbox off: the suite tests the sandbox, not the attempts.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from plugin_execution import (
    ExecutionError,
    ExecutionRequest,
    PluginRegistry,
    WorkspaceManager,
    create_execution_backend,
)
from plugin_execution.backends.base import ExecutionBackend

from .conftest import SUPPORT, needs

PLUGINS = Path(__file__).parents[1] / "plugins"
HANDLERS = (
    "read_file",
    "fs_read",
    "write_file",
    "follow_symlink",
    "tcp_connect",
    "tcp_listen",
    "environment",
    "fork_bomb",
    "allocate",
    "burn_cpu",
    "run_shell",
    "kill_pid",
    "write_dev_shm",
    "raise_limit",
    "make_device",
    "workspace_roundtrip",
    "hold_secret",
    "linger",
    "remember",
    "peek_memory",
)
#: Where the attempts run: the subprocess backend's two start methods, and the sandboxed pool.
BACKENDS = ("spawn", "zygote", "pool")
ALL_LAYERS = ("capabilities", "landlock", "bubblewrap", "seccomp")
SECRET = "correct horse battery staple"


def escape_plugin(plugin_id: str = "escape", **permissions: Any) -> dict[str, Any]:
    return {
        "id": plugin_id,
        "root": str(PLUGINS),
        "handlers": [{"id": name, "entry": f"escape:{name}"} for name in HANDLERS],
        "permissions": permissions,
    }


@pytest.fixture
def escapes() -> PluginRegistry:
    registry = PluginRegistry()
    registry.register(escape_plugin())
    registry.register(
        escape_plugin("escape.quotas", quotas={"memory_mb": 256, "cpu_s": 1, "timeout": 30})
    )
    registry.register(escape_plugin("escape.shell", shell={"allow": ["sh"]}))
    return registry


async def open_backend(
    registry: PluginRegistry,
    workspaces: WorkspaceManager,
    start_method: str,
    sandbox: bool | Sequence[str] = True,
) -> Any:
    """A subprocess backend of ``start_method``, or (``"pool"``) a worker pool of 2 workers
    at most: the suite's plugins then share them, workers retired and started per plugin."""
    if start_method == "pool":
        return create_execution_backend(
            type="worker-pool",
            registry=registry,
            workspace=workspaces,
            sandbox=sandbox,
            max_workers=2,
            cancel_grace=0.3,
            acquire_timeout=20,
        )
    return create_execution_backend(
        type="subprocess",
        registry=registry,
        workspace=workspaces,
        start_method=start_method,
        sandbox=sandbox,
        cancel_grace=0.3,
    )


@pytest.fixture(params=BACKENDS)
async def sandboxed(
    request: pytest.FixtureRequest, escapes: PluginRegistry, workspaces: WorkspaceManager
) -> AsyncIterator[ExecutionBackend]:
    """The default sandbox: every layer this machine supports."""
    async with await open_backend(escapes, workspaces, request.param) as backend:
        yield backend


async def attempt(
    backend: ExecutionBackend, handler: str, input: Any = None, plugin: str = "escape"
) -> ExecutionError:
    """Run an escape attempt that must fail; return its error."""
    result = await backend.execute(
        ExecutionRequest(plugin_id=plugin, handler_id=handler, input=input),
        timeout=20,
        raise_errors=False,
    )
    assert not result.ok, f"{handler} escaped the sandbox: {result.output!r}"
    assert result.error is not None
    return result.error


def denied(error: ExecutionError, *, hidden: bool = False) -> None:
    """PERMISSION_DENIED; or, with ``hidden``, the target is not there at all (bubblewrap's
    private /tmp or pid namespace hides it) and the handler got "no such file / process"."""
    if hidden and error.code == "HANDLER_ERROR":
        assert error.details["remote_type"] in (
            "builtins.FileNotFoundError",
            "builtins.ProcessLookupError",
        ), error
        return
    assert error.code == "PERMISSION_DENIED", error
    assert "refused" in error.message and error.details["errno"] in ("EACCES", "EPERM", "EROFS")


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text(SECRET)
    path.chmod(0o600)
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A file inside the plugin's own root (readable, never writable) the test cleans up."""
    path = PLUGINS / f"escaped-{os.getpid()}-{tmp_path.name}.txt"
    yield path
    path.unlink(missing_ok=True)


async def start_victim() -> trio.Process:
    """A process of the host's that a plugin must not be able to signal."""
    return await trio.lowlevel.open_process(["sleep", "30"])


async def stop_victim(victim: trio.Process) -> None:
    victim.kill()
    await victim.wait()


# -- control: without the sandbox, the attempts work ----------------------------------------


@pytest.mark.parametrize("start_method", BACKENDS)
async def test_control_without_the_sandbox_the_attempts_succeed(
    escapes: PluginRegistry, workspaces: WorkspaceManager, secret: Path, start_method: str
) -> None:
    async with await open_backend(escapes, workspaces, start_method, sandbox=False) as backend:
        result = await backend.execute(
            ExecutionRequest(
                plugin_id="escape", handler_id="read_file", input={"path": str(secret)}
            )
        )
        assert result.output == SECRET
        if start_method == "pool":  # the unsandboxed pool: any worker, no sandbox to report
            assert "sandbox" not in result.metadata
            return
        assert result.metadata["sandbox"] == ["process", "rlimits"]
        health = await backend.health()
        assert health.details["sandbox"]["enabled"] is False


# -- the default sandbox: each attempt fails, whatever the start method ----------------------


async def test_a_plugin_that_behaves_works_under_the_sandbox(sandboxed: ExecutionBackend) -> None:
    result = await sandboxed.execute(
        ExecutionRequest(plugin_id="escape", handler_id="workspace_roundtrip")
    )
    assert result.output == "True"
    expected = ["process", "rlimits", *(n for n in ALL_LAYERS if SUPPORT[n].available)]
    if not has_capabilities():
        expected.remove("capabilities")  # nothing to drop
    assert result.metadata["sandbox"] == expected
    report = (await sandboxed.health()).details["sandbox"]
    assert report["enabled"] is True
    for name, status in SUPPORT.layers.items():
        assert report["layers"][name]["active"] is status.available, name
    assert report["missing"] == {n: SUPPORT[n].detail for n in ALL_LAYERS if n not in expected}


@needs("landlock")
async def test_read_a_secret_outside_fs_read(sandboxed: ExecutionBackend, secret: Path) -> None:
    denied(await attempt(sandboxed, "read_file", {"path": str(secret)}), hidden=True)


@needs("landlock")
async def test_read_etc_shadow(sandboxed: ExecutionBackend) -> None:
    if not os.access("/etc/shadow", os.R_OK):
        pytest.skip("/etc/shadow is not readable by the host here: nothing to protect")
    error = await attempt(sandboxed, "read_file", {"path": "/etc/shadow"})
    denied(error)
    assert error.details["resource"] == "/etc/shadow"


@needs("landlock")
async def test_write_outside_the_workspace(sandboxed: ExecutionBackend, outside: Path) -> None:
    denied(await attempt(sandboxed, "write_file", {"path": str(outside)}))
    assert not outside.exists()


@needs("landlock")
async def test_follow_a_symlink_planted_in_the_workspace(
    sandboxed: ExecutionBackend, secret: Path, outside: Path
) -> None:
    denied(await attempt(sandboxed, "follow_symlink", {"target": str(secret)}), hidden=True)
    denied(await attempt(sandboxed, "follow_symlink", {"target": str(outside), "write": "yes"}))
    assert not outside.exists()


@needs("landlock", abi=4)
async def test_tcp_connect_without_network_connect(sandboxed: ExecutionBackend) -> None:
    async with serve_greeting() as port:
        error = await attempt(sandboxed, "tcp_connect", {"host": "127.0.0.1", "port": port})
    denied(error)


@needs("landlock", abi=4)
async def test_tcp_bind_is_denied(sandboxed: ExecutionBackend) -> None:
    denied(await attempt(sandboxed, "tcp_listen"))


@needs("landlock", abi=4)
async def test_tcp_connect_to_a_granted_port_works(
    sandboxed: ExecutionBackend, escapes: PluginRegistry
) -> None:
    async with serve_greeting() as port:
        escapes.register(escape_plugin("escape.net", network={"connect": [f"127.0.0.1:{port}"]}))
        result = await sandboxed.execute(
            ExecutionRequest(
                plugin_id="escape.net",
                handler_id="tcp_connect",
                input={"host": "127.0.0.1", "port": port},
            )
        )
    assert result.output == "hello from the host"


async def test_read_a_host_secret_from_the_environment(
    sandboxed: ExecutionBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOST_SECRET_TOKEN", SECRET)
    result = await sandboxed.execute(
        ExecutionRequest(
            plugin_id="escape", handler_id="environment", input={"name": "HOST_SECRET_TOKEN"}
        )
    )
    assert result.output is None


@needs("landlock")
async def test_read_the_hosts_environ_from_proc(
    sandboxed: ExecutionBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOST_SECRET_TOKEN", SECRET)  # /proc/pid/environ: as of exec; still
    error = await attempt(sandboxed, "read_file", {"path": f"/proc/{os.getpid()}/environ"})
    denied(error, hidden=True)


@needs("seccomp")
async def test_fork_bomb(sandboxed: ExecutionBackend) -> None:
    denied(await attempt(sandboxed, "fork_bomb", {"limit": 50, "seconds": 30}))


async def test_memory_bomb_past_the_quota(sandboxed: ExecutionBackend) -> None:
    error = await attempt(sandboxed, "allocate", {"mb": 1024}, plugin="escape.quotas")
    assert error.code == "WORKER_CRASHED" and error.details["reason"] == "memory_limit", error


async def test_cpu_loop_past_the_quota(sandboxed: ExecutionBackend) -> None:
    error = await attempt(sandboxed, "burn_cpu", {"seconds": 30}, plugin="escape.quotas")
    assert error.code == "WORKER_CRASHED", error
    assert error.details["reason"] == "cpu_limit"
    if sandboxed.name == "worker-pool":  # a warm worker: watched from the host, no rlimit
        assert "CPU time quota" in error.message
        return
    assert error.details["signal"] == signal.SIGXCPU
    assert "CPU time limit" in error.message


@needs("landlock")
async def test_spawn_a_shell_without_shell_allow(sandboxed: ExecutionBackend) -> None:
    denied(await attempt(sandboxed, "run_shell"))


@needs("landlock", abi=6)
async def test_kill_a_host_process(sandboxed: ExecutionBackend) -> None:
    victim = await start_victim()
    try:
        error = await attempt(sandboxed, "kill_pid", {"pid": victim.pid})
        denied(error, hidden=True)
        await trio.sleep(0.1)
        assert victim.returncode is None  # still alive
        denied(await attempt(sandboxed, "kill_pid", {"pid": os.getpid(), "signal": 0}), hidden=True)
    finally:
        await stop_victim(victim)


async def peek_at_the_host(backend: ExecutionBackend) -> dict[str, str]:
    """What ``peek_memory`` got of a secret in this process's (the host's) memory."""
    import ctypes

    held = ctypes.create_string_buffer(SECRET.encode())
    result = await backend.execute(
        ExecutionRequest(
            plugin_id="escape",
            handler_id="peek_memory",
            input={"pid": os.getpid(), "address": ctypes.addressof(held), "size": len(SECRET)},
        ),
        timeout=20,
    )
    got: dict[str, str] = result.output
    return got


async def test_control_without_the_sandbox_the_hosts_memory_is_read(
    escapes: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    """The attempts work where nothing stops them (a root host's child with every
    capability): they are real."""
    if not has_capabilities():
        pytest.skip("the host holds no CAP_SYS_PTRACE to lend its children")
    async with await open_backend(escapes, workspaces, "spawn", sandbox=False) as backend:
        got = await peek_at_the_host(backend)
    assert got["proc_mem"] == got["process_vm_readv"] == SECRET, got
    assert got["ptrace"] == "attached" and got["pidfd_getfd"] == "took fd 0", got


async def test_read_the_hosts_memory_or_take_its_fds(sandboxed: ExecutionBackend) -> None:
    """``/proc/<host>/mem``, ``process_vm_readv``, ``ptrace``, ``pidfd_getfd``: each refused
    (no ``CAP_SYS_PTRACE``, Landlock's ptrace scope, seccomp) or the host not even there
    (bubblewrap's pid namespace: ``ESRCH``, ``ENOENT``)."""
    got = await peek_at_the_host(sandboxed)
    assert SECRET not in str(got), got
    refused = {"EPERM", "EACCES", "ESRCH", "ENOENT", "ENOSYS"}
    assert set(got.values()) <= refused, got


@needs("landlock")
async def test_write_to_dev_shm(sandboxed: ExecutionBackend) -> None:
    denied(await attempt(sandboxed, "write_dev_shm"))


@needs("capabilities")
async def test_raise_a_resource_limit_back(sandboxed: ExecutionBackend) -> None:
    if not has_capabilities():
        pytest.skip("the host holds no capabilities: no child could raise its hard limits")
    error = await attempt(sandboxed, "raise_limit", plugin="escape.quotas")
    assert error.code == "HANDLER_ERROR", error  # Python turns EPERM into this ValueError
    assert "not allowed to raise maximum limit" in error.message


@needs("landlock")
async def test_make_a_device_node_in_the_workspace(sandboxed: ExecutionBackend) -> None:
    denied(await attempt(sandboxed, "make_device"))


async def test_what_a_shell_plugin_starts_ends_with_its_execution(
    sandboxed: ExecutionBackend, workspace_root: Path
) -> None:
    # shell.allow: it may fork; its children try to leave the worker's process group and
    # sleep. None may outlive the execution.
    result = await sandboxed.execute(
        ExecutionRequest(
            plugin_id="escape.shell", handler_id="fork_bomb", input={"limit": 5, "seconds": 60}
        )
    )
    assert result.output == 5
    await assert_no_process_in(workspace_root, but=worker_processes(result.worker_id))


# -- each layer on its own ---------------------------------------------------------------------


@needs("landlock")
@pytest.mark.parametrize("start_method", BACKENDS)
async def test_landlock_alone(
    escapes: PluginRegistry,
    workspaces: WorkspaceManager,
    secret: Path,
    outside: Path,
    start_method: str,
) -> None:
    async with await open_backend(escapes, workspaces, start_method, ("landlock",)) as backend:
        error = await attempt(backend, "read_file", {"path": str(secret)})
        denied(error)
        assert error.details["resource"] == str(secret)
        denied(await attempt(backend, "write_file", {"path": str(outside)}))
        denied(await attempt(backend, "run_shell"))  # exec is not granted: EACCES
        denied(await attempt(backend, "write_dev_shm"))
        granted = escape_plugin("escape.fs", fs={"read": [str(secret)]})
        escapes.register(granted)
        result = await backend.execute(
            ExecutionRequest(
                plugin_id="escape.fs", handler_id="read_file", input={"path": str(secret)}
            )
        )
        assert result.output == SECRET
        assert result.metadata["sandbox"] == ["process", "rlimits", "landlock"]


@needs("landlock")
@pytest.mark.parametrize("start_method", ["spawn", "pool"])
async def test_landlock_fs_write_grant_with_a_glob(
    escapes: PluginRegistry, workspaces: WorkspaceManager, tmp_path: Path, start_method: str
) -> None:
    (tmp_path / "out-a").mkdir()
    (tmp_path / "other").mkdir()
    escapes.register(escape_plugin("escape.fs", fs={"write": [str(tmp_path / "out-*")]}))
    async with await open_backend(escapes, workspaces, start_method, ("landlock",)) as backend:

        async def write(path: Path) -> Any:
            return await backend.execute(
                ExecutionRequest(
                    plugin_id="escape.fs", handler_id="write_file", input={"path": str(path)}
                ),
                raise_errors=False,
            )

        assert (await write(tmp_path / "out-a" / "x.txt")).ok
        assert (tmp_path / "out-a" / "x.txt").read_text() == "escaped"
        failed = await write(tmp_path / "other" / "x.txt")
        assert failed.error is not None
        denied(failed.error)


@needs("landlock", abi=6)
@pytest.mark.parametrize("start_method", ["spawn", "pool"])
async def test_landlock_alone_scopes_signals(
    escapes: PluginRegistry, workspaces: WorkspaceManager, start_method: str
) -> None:
    victim = await start_victim()
    try:
        async with await open_backend(escapes, workspaces, start_method, ("landlock",)) as backend:
            denied(await attempt(backend, "kill_pid", {"pid": victim.pid}))
        assert victim.returncode is None
    finally:
        await stop_victim(victim)


@needs("bubblewrap")
@pytest.mark.parametrize("start_method", ["spawn", "pool"])
async def test_bubblewrap_alone(
    escapes: PluginRegistry,
    workspaces: WorkspaceManager,
    secret: Path,
    outside: Path,
    start_method: str,
) -> None:
    async with (
        await open_backend(escapes, workspaces, start_method, ("bubblewrap",)) as backend,
        serve_greeting() as port,
    ):
        denied(await attempt(backend, "read_file", {"path": str(secret)}), hidden=True)
        error = await attempt(backend, "write_file", {"path": str(outside)})
        denied(error)  # a read-only root
        assert error.details["errno"] == "EROFS"
        error = await attempt(backend, "tcp_connect", {"host": "127.0.0.1", "port": port})
        assert error.code == "HANDLER_ERROR", error  # a network namespace: nothing to reach
        denied(await attempt(backend, "kill_pid", {"pid": os.getpid()}), hidden=True)
        result = await backend.execute(
            ExecutionRequest(plugin_id="escape", handler_id="workspace_roundtrip")
        )
        assert result.output == "True"


@needs("bubblewrap")
@pytest.mark.parametrize("start_method", ["spawn", "pool"])
async def test_bubblewrap_pid_namespace_ends_what_left_the_process_group(
    escapes: PluginRegistry, workspaces: WorkspaceManager, workspace_root: Path, start_method: str
) -> None:
    # shell.allow: no seccomp for this plugin, so it may fork; its children leave the worker's
    # process group (setsid) and sleep. None may outlive the execution (on the subprocess
    # backend: the pid namespace ends with it; on the pool: the worker reaps its leftovers).
    async with await open_backend(escapes, workspaces, start_method, ("bubblewrap",)) as backend:
        result = await backend.execute(
            ExecutionRequest(
                plugin_id="escape.shell", handler_id="fork_bomb", input={"limit": 5, "seconds": 60}
            )
        )
        assert result.output == 5
        await assert_no_process_in(workspace_root, but=worker_processes(result.worker_id))


@needs("seccomp")
@pytest.mark.parametrize("start_method", BACKENDS)
async def test_seccomp_alone(
    escapes: PluginRegistry, workspaces: WorkspaceManager, start_method: str
) -> None:
    async with await open_backend(escapes, workspaces, start_method, ("seccomp",)) as backend:
        denied(await attempt(backend, "fork_bomb", {"limit": 50, "seconds": 30}))
        denied(await attempt(backend, "run_shell"))
        result = await backend.execute(  # threads still work: the worker runs on them
            ExecutionRequest(plugin_id="escape", handler_id="workspace_roundtrip")
        )
        assert result.output == "True"
        result = await backend.execute(
            ExecutionRequest(plugin_id="escape.shell", handler_id="run_shell")
        )
        assert result.output == "escaped\n"  # shell.allow: it may start processes
        assert "seccomp" in result.metadata["sandbox"]  # which stay in its process group


@needs("capabilities")
@pytest.mark.parametrize("start_method", ["spawn", "pool"])
async def test_capabilities_alone(
    escapes: PluginRegistry, workspaces: WorkspaceManager, start_method: str
) -> None:
    if not has_capabilities():
        pytest.skip("the host holds no capabilities: nothing to drop")
    async with await open_backend(escapes, workspaces, start_method, ("capabilities",)) as backend:
        error = await attempt(backend, "raise_limit", plugin="escape.quotas")
        assert "not allowed to raise maximum limit" in error.message
        denied(await attempt(backend, "make_device"))  # mknod needs CAP_MKNOD


# -- helpers -------------------------------------------------------------------------------------


def has_capabilities() -> bool:
    from plugin_execution.sandbox.capabilities import has_any

    return has_any()


async def assert_no_process_in(root: Path, but: Iterable[int] = ()) -> None:
    """No process runs under ``root`` (soon) but those in ``but`` (a pool's live worker)."""
    spared = set(but)

    def left() -> list[int]:
        return [pid for pid in processes_in(root) if pid not in spared]

    with trio.move_on_after(5):  # SIGKILL is delivered at once, but dying takes a moment
        while left():
            await trio.sleep(0.02)
    assert left() == [], "processes a plugin started outlived its execution"


def worker_processes(worker_id: str | None) -> list[int]:
    """The processes of a pool's worker that ran an execution (``w<n>-<pid>``): its pid and,
    when that is bubblewrap's, bwrap's descendants down to the worker (each bwrap has one
    child). A subprocess backend's child is gone once its execution returns: none."""
    assert worker_id is not None
    pid = int(worker_id.rpartition("-")[2])
    chain = [pid]
    while Path(f"/proc/{pid}/comm").exists() and Path(f"/proc/{pid}/comm").read_text() == "bwrap\n":
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if len(children) != 1:
            break
        pid = int(children[0])
        chain.append(pid)
    return chain


def processes_in(root: Path) -> list[int]:
    """Live processes whose working directory is under ``root`` (a test's workspaces)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue  # gone, or a zombie
        if cwd.startswith(str(root) + "/"):
            found.append(int(entry))
    return found


@asynccontextmanager
async def serve_greeting() -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 that says hello to whoever connects; yields its port."""

    async def greet(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"hello from the host")

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, greet, listeners)
        try:
            yield int(listeners[0].socket.getsockname()[1])
        finally:
            nursery.cancel_scope.cancel()


# -- the zygote under bubblewrap -------------------------------------------------------------


@needs("bubblewrap")
async def test_zygote_shows_what_plugins_registered_before_it_started_may_touch(
    escapes: PluginRegistry, workspaces: WorkspaceManager, secret: Path, tmp_path: Path
) -> None:
    (tmp_path / "out").mkdir()
    escapes.register(
        escape_plugin("escape.early", fs={"read": [str(secret)], "write": [str(tmp_path / "out")]})
    )
    async with await open_backend(escapes, workspaces, "zygote") as backend:
        result = await backend.execute(
            ExecutionRequest(
                plugin_id="escape.early", handler_id="read_file", input={"path": str(secret)}
            )
        )
        assert result.output == SECRET
        await backend.execute(
            ExecutionRequest(
                plugin_id="escape.early",
                handler_id="write_file",
                input={"path": str(tmp_path / "out" / "x.txt")},
            )
        )
        assert (tmp_path / "out" / "x.txt").read_text() == "escaped"
        assert (await backend.health()).details["spawned_instead_of_zygote"] == 0

        # registered later: the zygote cannot show its files, so its child is spawned
        other = tmp_path / "other.txt"
        other.write_text("other")
        escapes.register(escape_plugin("escape.late", fs={"read": [str(other)]}))
        result = await backend.execute(
            ExecutionRequest(
                plugin_id="escape.late", handler_id="read_file", input={"path": str(other)}
            )
        )
        assert result.output == "other"
        assert (await backend.health()).details["spawned_instead_of_zygote"] == 1


@pytest.mark.parametrize("start_method", BACKENDS)
async def test_read_the_hosts_environment_from_the_childs_own_proc(
    escapes: PluginRegistry,
    workspaces: WorkspaceManager,
    monkeypatch: pytest.MonkeyPatch,
    start_method: str,
) -> None:
    """/proc/self/environ is the environment as of exec: a zygote's child shows the zygote's,
    so the zygote must be started without the host's secrets (set before it starts here)."""
    monkeypatch.setenv("HOST_SECRET_TOKEN", SECRET)
    async with await open_backend(escapes, workspaces, start_method, sandbox=False) as backend:
        result = await backend.execute(
            ExecutionRequest(
                plugin_id="escape", handler_id="read_file", input={"path": "/proc/self/environ"}
            ),
            raise_errors=False,
        )
    assert result.ok, result.error  # no sandbox layer hides it: the environment itself is clean
    assert SECRET not in result.output and "HOST_SECRET_TOKEN" not in result.output


# -- the sandboxed pool's own: what a warm worker invites ----------------------------------


@pytest.fixture
async def pool(escapes: PluginRegistry, workspaces: WorkspaceManager) -> AsyncIterator[Any]:
    escapes.register(escape_plugin("escape.victim"))
    async with await open_backend(escapes, workspaces, "pool") as backend:
        yield backend


async def secret_held(backend: ExecutionBackend, root: Path, nursery: trio.Nursery) -> Path:
    """Start an execution of ``escape.victim`` that holds a secret in its workspace for a
    few seconds; return the file once it is there (found from the host)."""
    execution_id = f"victim-{os.urandom(4).hex()}"
    request = ExecutionRequest(
        plugin_id="escape.victim",
        handler_id="hold_secret",
        input={"secret": SECRET, "seconds": 3.0},
        execution_id=execution_id,
    )
    nursery.start_soon(partial(backend.execute, request, timeout=20))
    with trio.fail_after(15):
        while not (found := list(root.glob(f"**/{execution_id}/secret.txt"))):
            await trio.sleep(0.02)
    return found[0]


@needs("landlock")
async def test_read_the_workspace_of_another_plugins_execution(
    pool: ExecutionBackend, workspace_root: Path
) -> None:
    async with trio.open_nursery() as nursery:
        held = await secret_held(pool, workspace_root, nursery)
        denied(await attempt(pool, "read_file", {"path": str(held)}), hidden=True)
        listed = await attempt(pool, "read_file", {"path": str(held.parents[1])})
        assert listed.code in ("PERMISSION_DENIED", "HANDLER_ERROR"), listed  # no listing


@needs("landlock")
@pytest.mark.parametrize("start_method", ["spawn", "zygote"])
async def test_read_the_workspace_of_another_plugins_running_child(
    escapes: PluginRegistry, workspaces: WorkspaceManager, workspace_root: Path, start_method: str
) -> None:
    """On the subprocess backend too (the zygote's mount namespace shows every workspace,
    writable; Landlock keeps each child to its own): another plugin's running execution's
    secret is read neither directly nor through ``ctx.fs``, nor is its directory listed."""
    escapes.register(escape_plugin("escape.victim"))
    async with (
        await open_backend(escapes, workspaces, start_method) as backend,
        trio.open_nursery() as nursery,
    ):
        held = await secret_held(backend, workspace_root, nursery)
        denied(await attempt(backend, "read_file", {"path": str(held)}), hidden=True)
        asked = await attempt(backend, "fs_read", {"path": str(held)})
        assert asked.code == "PERMISSION_DENIED" and asked.details["permission"] == "fs.read"
        listed = await attempt(backend, "read_file", {"path": str(held.parent)})
        assert listed.code in ("PERMISSION_DENIED", "HANDLER_ERROR"), listed


@needs("landlock", abi=6)
async def test_signal_a_sibling_worker_or_the_host(pool: ExecutionBackend) -> None:
    sibling = await pool.execute(
        ExecutionRequest(plugin_id="escape.victim", handler_id="workspace_roundtrip")
    )
    for pid in worker_processes(sibling.worker_id):
        denied(await attempt(pool, "kill_pid", {"pid": pid}), hidden=True)
    denied(await attempt(pool, "kill_pid", {"pid": os.getpid(), "signal": 0}), hidden=True)
    again = await pool.execute(
        ExecutionRequest(plugin_id="escape.victim", handler_id="workspace_roundtrip")
    )
    assert again.worker_id == sibling.worker_id  # unharmed, still serving


@needs("landlock")
async def test_a_thread_left_behind_acts_only_inside_its_plugin(
    pool: ExecutionBackend, workspace_root: Path
) -> None:
    lingered = await pool.execute(
        ExecutionRequest(plugin_id="escape", handler_id="linger", input={"seconds": 10})
    )
    home = Path(lingered.output)
    log = home / "linger.log"
    async with trio.open_nursery() as nursery:
        held = await secret_held(pool, workspace_root, nursery)
        (home / "targets.txt").write_text(f"{held}\n")  # after its execution ended
        with trio.fail_after(10):
            while not (log.exists() and str(held) in log.read_text()):
                await trio.sleep(0.02)
    lines = log.read_text().splitlines()
    assert lines and all(line.startswith(f"{held} ") for line in lines)
    assert SECRET not in log.read_text()
    assert all(line.split(" ", 1)[1].split(":")[0] in _REFUSED for line in lines), lines


_REFUSED = ("PermissionError", "FileNotFoundError")


async def test_a_worker_serves_one_plugin_its_state_never_crosses(
    escapes: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    escapes.register(escape_plugin("escape.victim"))
    async with create_execution_backend(
        type="worker-pool",
        registry=escapes,
        workspace=workspaces,
        sandbox=True,
        max_workers=1,
        min_workers=0,
    ) as backend:

        async def remember(plugin: str, value: str) -> Any:
            return await backend.execute(
                ExecutionRequest(plugin_id=plugin, handler_id="remember", input=value)
            )

        first = await remember("escape", "a1")
        second = await remember("escape", "a2")
        assert second.output == ["a1", "a2"]  # one plugin's state persists on its worker
        assert second.worker_id == first.worker_id
        other = await remember("escape.victim", "b1")
        assert other.output == ["b1"]  # never another plugin's
        assert other.worker_id != first.worker_id
        back = await remember("escape", "a3")
        assert back.output == ["a3"]  # its worker was retired for the other: a fresh one
        assert back.worker_id not in (first.worker_id, other.worker_id)
        assert backend.stats().details["workers_peak"] == 1
