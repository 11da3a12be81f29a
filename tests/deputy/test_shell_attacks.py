"""The deputy suite, ``ctx.shell`` part: a hostile plugin with a granted command tries to get
the host to run, read, write or send what its own sandbox forbids it; and a plugin child
tries to send UDP to the loopback without ``network.connect``, in both start methods.

Each attack runs for real on every backend where the host does the work (``ctx.shell`` is host
work on all of them: in-process, worker pool, subprocess spawned and forked by the zygote).
A test that needs a kernel layer skips, with the reason, only where this machine lacks it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from plugin_execution import (
    ExecutionBackend,
    ExecutionRequest,
    ExecutionTimeoutError,
    PermissionDeniedError,
    PluginRegistry,
    WorkspaceManager,
    create_execution_backend,
)
from plugin_execution.manifest import Permissions, ShellPermissions
from plugin_execution.platform import Platform
from plugin_execution.platform.shell import ShellService
from plugin_execution.sandbox import detect, launcher
from plugin_execution.sandbox.capabilities import has_any as host_has_capabilities

from .conftest import SANDBOXED

PLUGINS = Path(__file__).parents[1] / "plugins"
#: The output limit of these tests' platform (``max_transfer_bytes``).
CAP = 4 * 1024 * 1024
MiB = 1024 * 1024
SECRET = "correct horse battery staple"
BACKENDS = {
    "in-process": ("in-process", {}),
    "worker-pool": ("worker-pool", {"min_workers": 1, "max_workers": 2}),
    "sandboxed-pool": ("worker-pool", {"sandbox": True, "max_workers": 2}),
    "spawn": ("subprocess", {"start_method": "spawn", "cancel_grace": 0.3}),
    "zygote": ("subprocess", {"start_method": "zygote", "cancel_grace": 0.3}),
}
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
SUPPORT = detect()


def needs(layer: str) -> pytest.MarkDecorator:
    """Skip unless this machine has the sandbox ``layer``, saying why not."""
    status = SUPPORT[layer]
    return pytest.mark.skipif(not status.available, reason=f"no {layer}: {status.detail}")


def register(registry: PluginRegistry, plugin_id: str, **permissions: Any) -> None:
    registry.register(
        {
            "id": plugin_id,
            "root": str(PLUGINS),
            "handlers": [
                {"id": "shell", "entry": "deputy_shell:shell"},
                {"id": "udp", "entry": "deputy_shell:udp"},
            ],
            "permissions": permissions,
        },
        replace=True,
    )


@pytest.fixture
def deputies() -> PluginRegistry:
    registry = PluginRegistry()
    for command in ("git", "cat", "head"):
        register(registry, f"deputy.{command}", shell={"allow": [command]})
    register(registry, "deputy.python", shell={"allow": [sys.executable]})
    register(registry, "deputy.nothing")
    register(registry, "deputy.network", network={"connect": ["127.0.0.1:*"]})
    return registry


@pytest.fixture(params=list(BACKENDS))
async def backend(
    request: pytest.FixtureRequest,
    deputies: PluginRegistry,
    workspaces: WorkspaceManager,
    tmp_path: Path,
) -> AsyncIterator[ExecutionBackend]:
    kind, options = BACKENDS[request.param]
    platform = Platform(
        storage_root=tmp_path / "storage",
        environ={"PATH": os.environ.get("PATH", os.defpath)},
        max_transfer_bytes=CAP,
    )
    async with create_execution_backend(
        type=kind, registry=deputies, workspace=workspaces, platform=platform, **options
    ) as backend:
        yield backend


async def shell(backend: ExecutionBackend, plugin: str, argv: list[str], **input: Any) -> Any:
    """Run ``argv`` through ``ctx.shell`` in plugin ``deputy.<plugin>``; the handler's result."""
    result = await backend.execute(
        ExecutionRequest(
            plugin_id=f"deputy.{plugin}", handler_id="shell", input={"argv": argv, **input}
        ),
        timeout=60,
    )
    return result.output


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text(SECRET)
    path.chmod(0o600)
    return path


@pytest.fixture
def shadow() -> str | None:
    """The start of /etc/shadow when the host can read it (as root), else None."""
    try:
        with open("/etc/shadow") as f:
            return f.read(40) or None
    except OSError:
        return None


def leaked(output: dict[str, Any], *secrets: str | None) -> list[str]:
    text = output["stdout"] + output["stderr"]
    return [s for s in secrets if s and s in text]


# -- a granted command is confined like the plugin ----------------------------------------------


@needs_git
@needs("landlock")
async def test_git_alias_runs_nothing_the_plugin_may_not(
    backend: ExecutionBackend, shadow: str | None, tmp_path: Path
) -> None:
    outside = tmp_path / "pwned.txt"
    alias = f"alias.x=!id; head -c 40 /etc/shadow; echo pwned > {outside}"
    out = await shell(backend, "git", ["git", "-c", alias, "x"])
    assert out["returncode"] != 0
    assert "uid=" not in out["stdout"] and not leaked(out, shadow)
    assert "Permission denied" in out["stderr"]  # git may not execute a shell: Landlock
    assert not outside.exists()


@needs("landlock")
async def test_cat_reads_only_what_the_plugin_may(
    backend: ExecutionBackend, secret: Path, shadow: str | None
) -> None:
    targets = [str(secret)] + (["/etc/shadow"] if shadow else [])
    for target in targets:
        out = await shell(backend, "cat", ["cat", target])
        assert out["returncode"] != 0, target
        assert not leaked(out, SECRET, shadow), target


async def test_control_without_the_sandbox_the_attack_works(
    deputies: PluginRegistry, workspaces: WorkspaceManager, secret: Path, tmp_path: Path
) -> None:
    # the suite tests the sandbox, not the attempts: with shell_sandbox=False they succeed
    platform = Platform(storage_root=tmp_path / "storage", shell_sandbox=False)
    async with create_execution_backend(
        type="in-process", registry=deputies, workspace=workspaces, platform=platform
    ) as backend:
        out = await shell(backend, "cat", ["cat", str(secret)])
    assert out["returncode"] == 0 and out["stdout"] == SECRET


@needs("landlock")
async def test_a_command_writes_its_workspace_and_nothing_else(
    backend: ExecutionBackend, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.txt"
    code = (
        "import sys; open('made-by-command.txt', 'w').write('inside');"
        f"open({str(outside)!r}, 'w').write('escaped')"
    )
    out = await shell(
        backend, "python", [sys.executable, "-c", code], read_back="made-by-command.txt"
    )
    assert out["read_back"] == "inside"  # the plugin sees (and may use) what its command made
    assert out["returncode"] == 1 and "Error" in out["stderr"]
    assert not outside.exists()


@pytest.mark.parametrize("backend", SANDBOXED, indirect=True)
async def test_a_workspace_swapped_for_a_symlink_lends_its_command_nothing(
    backend: ExecutionBackend, tmp_path: Path
) -> None:
    """A sandboxed pool worker may write its workspace's parent (its own directory): it
    moves its workspace aside, puts a symlink to a directory it may not write in its place,
    and asks for a command, which runs in the workspace and may write there. Neither the
    command's working directory nor its write rights follow the symlink. Where the parent is
    not the plugin's to write (a subprocess child), the swap itself is refused. The
    sandboxed backends only: without a sandbox the plugin writes anywhere itself."""
    victim = tmp_path / "victim"
    victim.mkdir()
    code = "open('made-by-command.txt', 'w').write('escaped')"
    result = await backend.execute(
        ExecutionRequest(
            plugin_id="deputy.python",
            handler_id="shell",
            input={"argv": [sys.executable, "-c", code], "swap_workspace_to": str(victim)},
        ),
        timeout=60,
        raise_errors=False,
    )
    assert not (victim / "made-by-command.txt").exists(), result
    if result.ok:  # the swap was refused, or the command was
        assert "swap_refused" in result.output or result.output["returncode"] != 0, result
    else:
        assert result.error is not None and result.error.code in ("PERMISSION_DENIED",), result


def test_the_launcher_runs_no_command_outside_the_workspace_the_host_found(
    tmp_path: Path,
) -> None:
    """The race the host's check leaves: the workspace swapped after the host found it and
    before the command started there. The launcher compares where it starts with the
    directory the host found, and runs nothing elsewhere; where they agree, the command runs
    and may write there (its Landlock rule names that directory)."""
    found, elsewhere = tmp_path / "workspace", tmp_path / "elsewhere"
    found.mkdir()
    elsewhere.mkdir()
    status = found.stat()
    code = "open('made.txt', 'w').write('x')"
    spec = {
        "executable": sys.executable,
        "env": {},
        "limits": "",
        "sandbox": {},
        "workspace": [str(found), status.st_dev, status.st_ino],
    }
    argv = launcher.argv(spec, [sys.executable, "-I", "-c", code])
    moved = subprocess.run(argv, cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert moved.returncode == launcher.SANDBOX_FAILED, moved
    assert "not the plugin's workspace" in moved.stderr
    assert not (elsewhere / "made.txt").exists()
    ran = subprocess.run(argv, cwd=found, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran
    assert (found / "made.txt").read_text() == "x"


@needs_git
async def test_a_gitconfig_planted_in_the_workspace_is_not_read(
    backend: ExecutionBackend, tmp_path: Path
) -> None:
    marker = tmp_path / "planted-alias-ran"
    config = f'[alias]\n    pwn = "!touch {marker}; echo PWNED"\n'
    plant = {".gitconfig": config, ".config/git/config": config}
    out = await shell(backend, "git", ["git", "pwn"], plant=plant)
    assert out["returncode"] != 0 and "is not a git command" in out["stderr"]
    assert "PWNED" not in out["stdout"] and not marker.exists()


@pytest.mark.parametrize("layers", ["default", "no layers"])
async def test_a_relative_command_is_the_workspace_file_it_names_and_is_refused(
    deputies: PluginRegistry,
    workspaces: WorkspaceManager,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    layers: str,
) -> None:
    """Granted ``/usr/bin/true`` by absolute path, a plugin asks for ``usr/bin/true``: from
    the host's cwd (``/``) that is the granted file, but the command runs in the workspace,
    where the plugin planted its own ``usr/bin/true``. The host must check what it runs: a
    relative argv[0] names a file of the workspace, not granted, so it is refused (and the
    planted script never runs, with or without the kernel layers)."""
    true = os.path.realpath(shutil.which("true") or "/bin/true")
    register(deputies, "deputy.true", shell={"allow": [true]})
    monkeypatch.chdir("/")
    marker = tmp_path / "planted-true-ran"
    planted = true.lstrip("/")
    platform = Platform(storage_root=tmp_path / "storage", shell_sandbox=layers == "default")
    async with create_execution_backend(
        type="subprocess", registry=deputies, workspace=workspaces, platform=platform
    ) as backend:
        with pytest.raises(PermissionDeniedError) as caught:
            await shell(
                backend,
                "true",
                [planted],
                plant={planted: f"#!/bin/sh\ntouch {marker}\necho PWNED\n"},
                executable=[planted],
            )
        assert caught.value.details["permission"] == "shell.allow"
        assert not marker.exists()
        # the granted command by its absolute path still runs: the granted file
        out = await shell(backend, "true", [true], plant={planted: "#!/bin/sh\necho PWNED\n"})
        assert out["returncode"] == 0 and "PWNED" not in out["stdout"]


async def test_home_is_fresh_and_empty_not_the_workspace(backend: ExecutionBackend) -> None:
    code = "import os, json; print(json.dumps([os.getcwd(), os.environ['HOME'], os.listdir()]))"
    out = await shell(
        backend, "python", [sys.executable, "-c", code], plant={".bashrc": "echo planted"}
    )
    cwd, home, listing = json.loads(out["stdout"])
    assert listing == [".bashrc"] and home != cwd
    assert not os.path.exists(home)  # removed after the command


@needs("landlock")
async def test_a_command_cannot_signal_the_host(backend: ExecutionBackend) -> None:
    """A granted command tries to signal the host, which started it: Landlock's signal
    scope (or bubblewrap's pid namespace, where the host's pids do not exist) refuses, and
    the host is unharmed (it answers next)."""
    code = (
        "import os, sys, json\n"
        "out = {}\n"
        "for pid in map(int, sys.argv[1:]):\n"
        "    try:\n"
        "        os.kill(pid, 0); out[pid] = 'sent'\n"
        "    except OSError as e:\n"
        "        out[pid] = type(e).__name__\n"
        "print(json.dumps(out))"
    )
    out = await shell(backend, "python", [sys.executable, "-c", code, str(os.getpid())])
    outcomes = json.loads(out["stdout"])
    assert set(outcomes.values()) <= {"PermissionError", "ProcessLookupError"}, outcomes
    assert (await shell(backend, "python", [sys.executable, "-c", "print(1)"]))["stdout"] == "1\n"


async def test_a_command_holds_no_fd_of_the_hosts(backend: ExecutionBackend) -> None:
    """The host's listening sockets and open files (a server's, a secret's) never reach a
    command: it holds its stdin, stdout and stderr, nothing else."""
    code = (
        "import os, json; print(json.dumps({n: os.readlink('/proc/self/fd/' + n) "
        "for n in os.listdir('/proc/self/fd') if os.path.exists('/proc/self/fd/' + n)}))"
    )
    secret = os.open(__file__, os.O_RDONLY)
    try:
        with socket.socket() as listening:
            listening.bind(("127.0.0.1", 0))
            listening.listen()
            out = await shell(backend, "python", [sys.executable, "-c", code])
    finally:
        os.close(secret)
    held = json.loads(out["stdout"])
    assert sorted(held) == ["0", "1", "2"], held


@needs("capabilities")
async def test_a_command_holds_no_capability(backend: ExecutionBackend) -> None:
    if not host_has_capabilities():
        pytest.skip("the host holds no capabilities: nothing to drop")
    code = "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])"
    out = await shell(backend, "python", [sys.executable, "-c", code])
    assert int(out["stdout"], 16) == 0


def processes_running(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


async def test_what_a_command_leaves_running_ends_with_it(
    backend: ExecutionBackend, tmp_path: Path
) -> None:
    # the leftover holds the output pipe: without the group kill the call would hang
    marker = f"left-behind-{tmp_path.name}"
    code = (
        "import subprocess, sys;"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}]);"
        "print('started')"
    )
    out = await shell(backend, "python", [sys.executable, "-c", code], timeout=20)
    assert out["returncode"] == 0 and out["stdout"] == "started\n"
    with trio.move_on_after(5):  # SIGKILL is sent at once; dying takes a moment
        while processes_running(marker):
            await trio.sleep(0.05)
    assert processes_running(marker) == []


# -- output is bounded while it streams ----------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


async def test_huge_output_is_cut_while_streaming_and_the_command_killed(
    backend: ExecutionBackend,
) -> None:
    await shell(backend, "head", ["head", "-c", "1000", "/dev/zero"])  # warm every code path
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS (VmHWM) := the current RSS
    before = _status_kib("VmRSS")
    out = await shell(backend, "head", ["head", "-c", "1500000000", "/dev/zero"])
    growth = (_status_kib("VmHWM") - before) * 1024
    assert out["truncated"] is True
    assert out["returncode"] == -9  # killed (its whole group) once over the limit
    assert out["stdout_bytes"] == CAP
    # the host holds the capped output, a copy or two on the way to the plugin; never 1.5 GB
    assert growth < 4 * CAP + 64 * MiB, f"host RSS grew by {growth / MiB:.0f} MiB"


# -- no network without network.connect: UDP to the loopback ------------------------------------


@pytest.fixture
def udp_server() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        yield sock


def received(sock: socket.socket) -> list[bytes]:
    """Datagrams waiting (loopback delivery is done by the time sendto returns)."""
    got = []
    while True:
        try:
            got.append(sock.recv(100))
        except BlockingIOError:
            return got


@pytest.mark.skipif(
    not (SUPPORT["seccomp"].available or SUPPORT["bubblewrap"].available),
    reason="this machine has neither seccomp nor bubblewrap",
)
async def test_a_command_sends_no_udp_without_network_connect(
    backend: ExecutionBackend, udp_server: socket.socket
) -> None:
    port = udp_server.getsockname()[1]
    code = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
        f"s.sendto(b'leak', ('127.0.0.1', {port}))"
    )
    out = await shell(backend, "python", [sys.executable, "-c", code])
    assert out["returncode"] == 1 and "Error" in out["stderr"]
    assert received(udp_server) == []


@needs("seccomp")
@pytest.mark.parametrize("start_method", ["spawn", "zygote"])
async def test_plugin_children_send_udp_only_with_network_connect(
    deputies: PluginRegistry,
    workspaces: WorkspaceManager,
    udp_server: socket.socket,
    start_method: str,
) -> None:
    port = udp_server.getsockname()[1]
    async with create_execution_backend(
        type="subprocess", registry=deputies, workspace=workspaces, start_method=start_method
    ) as backend:
        result = await backend.execute(
            ExecutionRequest(plugin_id="deputy.nothing", handler_id="udp", input={"port": port}),
            raise_errors=False,
        )
        assert result.error is not None and result.error.code == "PERMISSION_DENIED"
        assert received(udp_server) == []
        # the same for both start methods with the grant: the datagram arrives
        result = await backend.execute(
            ExecutionRequest(plugin_id="deputy.network", handler_id="udp", input={"port": port})
        )
        assert result.output == "sent" and received(udp_server) == [b"leak"]


async def test_commands_of_one_plugin_run_a_few_at_a_time(tmp_path: Path) -> None:
    # output is bounded per command; slots bound how many commands (so buffers) one plugin
    # and the whole host hold at once. A command past its plugin's slots waits, then times out.
    service = ShellService(environ=dict(os.environ), max_bytes=CAP, max_per_plugin=1)
    async with Platform(storage_root=tmp_path / "storage") as platform:

        def session(execution_id: str, plugin_id: str) -> Any:
            (tmp_path / execution_id).mkdir()
            return platform.session(
                execution_id=execution_id,
                plugin_id=plugin_id,
                handler_id="h",
                permissions=Permissions(shell=ShellPermissions(allow=(sys.executable,))),
                workspace=str(tmp_path / execution_id),
            )

        first, second, other = session("e1", "p"), session("e2", "p"), session("e3", "q")
        sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.run, first, sleeper)
            while service._slots.borrowed_tokens < 1:
                await trio.sleep(0.01)
            with pytest.raises(ExecutionTimeoutError, match="free command slot"):
                await service.run(second, [sys.executable, "-c", "pass"], timeout=0.5)
            done = await service.run(other, [sys.executable, "-c", "pass"], timeout=30)
            assert done["returncode"] == 0  # another plugin is not held up
            nursery.cancel_scope.cancel()  # kills and reaps the sleeper
    assert service._per_plugin == {}  # no entry is kept for a plugin with no command
