"""ctx.fs as a confused deputy: a plugin swaps a directory of a path for a symlink between
the host's check and its open, or hands the host a FIFO to block on. Mounted for real by
tests/plugins/confused_deputy.py on every backend where the host does the file work, the subprocess
one sandboxed with both start methods; each attack is bounded in attempts and time."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from plugin_execution import (
    ExecutionBackend,
    PermissionDeniedError,
    Permissions,
    PluginRegistry,
    WorkspaceManager,
    create_execution_backend,
)
from plugin_execution.context import ExecutionContext
from plugin_execution.manifest import FsPermissions
from plugin_execution.platform import Platform
from plugin_execution.platform import fs as fs_module

from .conftest import BACKENDS, PLUGINS, SANDBOXED, register, run

SECRET = "root:$6$not-for-plugins"
ATTEMPTS = {"attempts": 400, "seconds": 10}


@pytest.fixture
def secret_dir(tmp_path: Path) -> Path:
    """A directory outside every grant holding ``shadow``, readable by the host only."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "shadow").write_text(SECRET)
    (etc / "shadow").chmod(0o600)
    return etc


async def test_a_swapped_directory_never_makes_the_host_read_outside(
    backend: ExecutionBackend, secret_dir: Path
) -> None:
    report = await run(backend, "swap_read", {"target": str(secret_dir), **ATTEMPTS})
    outcomes = report["outcomes"]
    assert "leaked" not in outcomes and report["leaks"] == [], report
    # the race was live: some reads saw the directory, some the symlink
    assert report["swaps"] > 0 and outcomes.get("decoy", 0) > 0, report
    assert outcomes.get("PERMISSION_DENIED", 0) > 0, report
    assert set(outcomes) <= {"decoy", "PERMISSION_DENIED", "FileNotFoundError"}, report


async def test_a_swapped_directory_never_makes_the_host_write_outside(
    backend: ExecutionBackend, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    report = await run(backend, "swap_write", {"target": str(outside), **ATTEMPTS})
    outcomes = report["outcomes"]
    assert list(outside.rglob("*")) == [], report
    assert report["swaps"] > 0 and outcomes.get("written", 0) > 0, report
    assert outcomes.get("PERMISSION_DENIED", 0) > 0, report
    assert set(outcomes) <= {"written", "PERMISSION_DENIED", "FileNotFoundError"}, report


async def test_fifos_are_refused_at_once_and_stall_nobody(backend: ExecutionBackend) -> None:
    """45 FIFOs read at once by one plugin: each read fails fast with INVALID_REQUEST, and
    another plugin's storage calls meanwhile go through."""
    fifo_report: dict[str, object] = {}
    bystander: list[float] = []

    async def fifos() -> None:
        fifo_report.update(await run(backend, "read_fifo", {"count": 45, "join": 30}))

    async def storage() -> None:
        for i in range(5):
            started = time.monotonic()
            await run(
                backend,
                "storage_call",
                {"method": "put", "args": [f"k{i}", "v"]},
                plugin="bystander",
            )
            bystander.append(time.monotonic() - started)

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fifos)
        nursery.start_soon(storage)
    assert fifo_report["outcomes"] == {"INVALID_REQUEST": 45}, fifo_report
    assert fifo_report["unfinished"] == 0
    # the execution's timeout is 60 s and a blocked FIFO open never returns: a few seconds
    # on a loaded machine is "at once"
    assert time.monotonic() - started < 30 and max(bystander) < 20, (fifo_report, bystander)


# -- the same attacks, deterministic: the swap lands exactly between check and open -----------


@pytest.fixture
async def platform_only(tmp_path: Path) -> Platform:
    return Platform(storage_root=tmp_path / "storage")


def _context(platform: Platform, workspace: Path, root: Path, **grants: str) -> ExecutionContext:
    session = platform.session(
        execution_id="e-1",
        plugin_id="deputy",
        handler_id="h",
        permissions=Permissions(fs=FsPermissions(**grants)),  # type: ignore[arg-type]
        root=str(root),
        workspace=str(workspace),
    )
    session.bind_loop()
    return ExecutionContext(
        execution_id="e-1", plugin_id="deputy", handler_id="h", platform=session
    )


@pytest.fixture
def swap_after_check(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> tuple[Path, list[tuple[Path, Path]]]:
    """``(workspace, swaps)``: each ``(directory, target)`` appended to ``swaps`` is replaced
    by a symlink to ``target`` right after the next path check: the worst timing a racing
    plugin can hope for, every time."""
    workspace = (tmp_path / "ws").resolve()
    workspace.mkdir()
    swaps: list[tuple[Path, Path]] = []
    real = fs_module.resolve_path

    def resolve_then_swap(path: str, base: str) -> str:
        resolved = real(path, base)
        while swaps:
            directory, target = swaps.pop()
            directory.rename(directory.with_name(directory.name + ".real"))
            directory.symlink_to(target)
        return resolved

    monkeypatch.setattr(fs_module, "resolve_path", resolve_then_swap)
    return workspace, swaps


@pytest.mark.parametrize("method", ["read", "write", "list", "exists", "remove"])
async def test_a_swap_right_after_the_check_is_denied(
    swap_after_check: tuple[Path, list[tuple[Path, Path]]],
    platform_only: Platform,
    secret_dir: Path,
    tmp_path: Path,
    method: str,
) -> None:
    workspace, swaps = swap_after_check
    (workspace / "d").mkdir()
    (workspace / "d" / "shadow").write_text("decoy")
    root = tmp_path / "plugin"
    root.mkdir()
    async with platform_only:
        fs = _context(platform_only, workspace, root).fs
        swaps.append((workspace / "d", secret_dir))
        args = {"write": ("d/shadow", "pwned"), "list": ("d",)}.get(method, ("d/shadow",))
        with pytest.raises(PermissionDeniedError) as info:
            await getattr(fs, method)(*args)
    assert "changed after it was checked" in info.value.message
    assert (secret_dir / "shadow").read_text() == SECRET
    assert sorted(os.listdir(secret_dir)) == ["shadow"]


async def test_a_swap_in_a_granted_directory_outside_the_workspace_is_denied(
    swap_after_check: tuple[Path, list[tuple[Path, Path]]],
    platform_only: Platform,
    secret_dir: Path,
    tmp_path: Path,
) -> None:
    workspace, swaps = swap_after_check
    out = (tmp_path / "out").resolve()
    (out / "deep").mkdir(parents=True)
    async with platform_only:
        fs = _context(platform_only, workspace, tmp_path, write=str(out)).fs
        await fs.write(str(out / "deep" / "ok.txt"), "fine")  # the grant works
        swaps.append((out / "deep", secret_dir))
        with pytest.raises(PermissionDeniedError):
            await fs.write(str(out / "deep" / "new" / "pwned.txt"), "pwned")
    assert sorted(os.listdir(secret_dir)) == ["shadow"]


async def test_fifos_and_devices_in_grants_are_refused(
    platform_only: Platform, tmp_path: Path
) -> None:
    workspace = (tmp_path / "ws").resolve()
    workspace.mkdir()
    os.mkfifo(workspace / "fifo")
    async with platform_only:
        fs = _context(platform_only, workspace, tmp_path, read="/dev/zero").fs
        with trio.fail_after(10):  # a blocked open would hang here, not fail
            for call in (fs.read("fifo"), fs.write("fifo", "x"), fs.read("/dev/zero")):
                with pytest.raises(Exception) as info:
                    await call
                assert getattr(info.value, "code", None) == "INVALID_REQUEST", info.value
                assert "regular files only" in str(info.value)
            with pytest.raises(NotADirectoryError):
                await fs.list("fifo")
            assert await fs.exists("fifo")
            await fs.remove("fifo")
            assert not (workspace / "fifo").exists()


async def test_symlinks_that_stay_inside_the_grants_still_work(
    platform_only: Platform, tmp_path: Path
) -> None:
    """The walk refuses symlinks that appear after the check; ones already there are
    resolved by the check, and followed when their target is granted (as before)."""
    workspace = (tmp_path / "ws").resolve()
    (workspace / "real").mkdir(parents=True)
    (workspace / "real" / "f.txt").write_text("via link")
    (workspace / "alias").symlink_to(workspace / "real")
    (workspace / "f-link").symlink_to("real/f.txt")
    async with platform_only:
        fs = _context(platform_only, workspace, tmp_path).fs
        assert await fs.read("alias/f.txt") == b"via link"
        assert await fs.read("f-link") == b"via link"
        assert await fs.list("alias") == ["f.txt"]
        assert await fs.write("alias/new/g.txt", "g") == 1
        assert (workspace / "real" / "new" / "g.txt").read_text() == "g"


async def test_paths_longer_than_the_kernel_takes_are_refused_before_resolution(
    backend: ExecutionBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """Resolving a path costs the host time quadratic in its parts, on its event loop (a
    320 KB path took ~7 s): a path the kernel would refuse anyway (over PATH_MAX) is refused
    as it arrives, and nothing of its size reaches the host's log."""
    for path in ("a/" * 3000, "/" + "x/" * 3000, "é" * 4097):
        out = await run(backend, "fs_call", {"method": "read", "args": [path]})
        assert out["error"] == "INVALID_REQUEST", out["error"]
        assert len(out["message"]) < 1000
    assert all(len(record.getMessage()) < 10_000 for record in caplog.records)
    # at the limit, a path is still taken (the kernel's answer comes back)
    out = await run(backend, "fs_call", {"method": "read", "args": ["a/" * 2047 + "b"]})
    assert out["error"] in ("FileNotFoundError:ENOENT", "OSError:ENAMETOOLONG"), out


async def test_a_long_symlink_chain_is_refused_like_the_kernel_refuses_it(
    backend: ExecutionBackend,
) -> None:
    """The kernel follows at most 40 symlinks in a path (ELOOP); the host's resolution of a
    chain of 1200 planted in the workspace must end as clearly, not with an internal error."""
    links = [[f"l{i}", f"l{i + 1}"] for i in range(1200)]
    out = await run(backend, "fs_call", {"method": "read", "args": ["l0"], "links": links})
    assert out["error"] == "PERMISSION_DENIED", out
    assert "symbolic links" in out["message"]


@pytest.mark.parametrize("backend", SANDBOXED, indirect=True)
async def test_a_hard_link_never_turns_a_read_grant_into_a_write(
    backend: ExecutionBackend, deputies: PluginRegistry, tmp_path: Path
) -> None:
    """A hard link is not a symlink: the host's walk cannot tell one apart from the file. A
    plugin granted to read ``data/ro.txt`` links it into its workspace and asks the host to
    write there. The kernel sandbox refuses the link (another mount under bubblewrap, no
    ``REFER`` right under Landlock), so the host writes a new file of the workspace. Without
    a sandbox (in-process, the unsandboxed pool) the plugin could write the file itself
    anyway: the sandboxed backends only."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "ro.txt").write_text("read only")
    register(deputies, "deputy", fs={"read": [str(data)]})
    report = await run(backend, "link_then_write", {"target": str(data / "ro.txt")})
    assert report["link"] != "made", report
    assert (data / "ro.txt").read_text() == "read only"


async def test_the_hosts_proc_magic_links_lead_nowhere(backend: ExecutionBackend) -> None:
    """``/proc/self`` is the host's own, when the host resolves a path: its environment, its
    fds, its root and cwd are magic links a plugin may name. Each resolves to what it points
    at, which no grant covers: denied, never read."""
    for path in (
        "/proc/self/environ",
        "/proc/thread-self/environ",
        "/proc/self/root/etc/hostname",
        "/proc/self/cwd/pyproject.toml",
        "/proc/self/fd/0",
        "/dev/fd/1",
        "/dev/stdin",
        f"/proc/{os.getpid()}/cmdline",
    ):
        out = await run(backend, "fs_call", {"method": "read", "args": [path]})
        assert isinstance(out, dict) and out["error"] == "PERMISSION_DENIED", (path, out)


@pytest.mark.parametrize("kind", list(BACKENDS))
async def test_a_listing_is_bounded_like_a_transfer(
    kind: str, deputies: PluginRegistry, workspaces: WorkspaceManager, tmp_path: Path
) -> None:
    """``ctx.fs.list`` returns every name of a directory the plugin filled itself: with
    enough entries, more than any transfer may carry (``max_transfer_bytes``), all held by the
    host at once. Past the limit the listing is refused (``INVALID_REQUEST``)."""
    limit = 64 * 1024
    links = [[f"{i:05d}" + "n" * 195, "nowhere"] for i in range(400)]  # ~80 KB of names
    async with (
        Platform(storage_root=tmp_path / "storage", max_transfer_bytes=limit) as platform,
        create_execution_backend(
            registry=deputies, workspace=workspaces, platform=platform, **BACKENDS[kind]
        ) as backend,
    ):
        out = await run(backend, "fs_call", {"method": "list", "args": ["."], "links": links})
        assert isinstance(out, dict) and out["error"] == "INVALID_REQUEST", str(out)[:200]
        few = await run(backend, "fs_call", {"method": "list", "args": ["."], "links": links[:50]})
        assert len(few) == 50


async def test_a_denial_never_tells_where_the_hosts_links_lead(
    backend: ExecutionBackend, tmp_path: Path
) -> None:
    """The host resolves a path with its own view of the system: ``/proc/self`` is the
    host's, ``/proc/PID`` any process's, ``/tmp`` the host's (a sandboxed child has its own).
    A denial that said where such a link leads would tell the plugin what its sandbox hides:
    the host's working directory, the files it has open, another execution's workspace. It
    names the path as asked, and its ``..`` collapsed, never a link's target."""
    hidden = tmp_path / "hidden-target-directory"
    hidden.mkdir()
    elsewhere = tmp_path / "link-somewhere"
    elsewhere.symlink_to(hidden)
    secret_file = os.open(hidden, os.O_RDONLY)  # the host holds it open: /proc/self/fd/N
    try:
        for path in ("/proc/self/cwd", f"/proc/self/fd/{secret_file}", str(elsewhere)):
            out = await run(backend, "fs_call", {"method": "read", "args": [path]})
            assert out["error"] == "PERMISSION_DENIED", (path, out)
            assert os.getcwd() not in out["message"], out["message"]
            assert "hidden-target" not in out["message"], out["message"]
        out = await run(backend, "fs_call", {"method": "read", "args": ["../../../etc/hostname"]})
        assert "(resolves to /" in out["message"], out["message"]  # no link: said as before
    finally:
        os.close(secret_file)


async def test_paths_are_resolved_on_the_plugins_file_threads_not_the_event_loop(
    platform_only: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resolving a path is file work (an lstat and a readlink per part, ~1000 symlinks
    followed at most): ~12 ms for a chain a plugin planted, ~3 ms for a 4 KB path, on the
    host's event loop for every call, 64 calls in flight per execution. It runs where the
    rest of ctx.fs's file work runs: on the plugin's bounded host threads, never the loop."""
    on_loop: list[bool] = []
    real = fs_module.resolve_path

    def spy(path: str, base: str) -> str:
        on_loop.append(trio.lowlevel.in_trio_run())
        return real(path, base)

    monkeypatch.setattr(fs_module, "resolve_path", spy)
    workspace = (tmp_path / "ws").resolve()
    workspace.mkdir()
    async with platform_only:
        fs = _context(platform_only, workspace, tmp_path).fs
        await fs.write("d/f.txt", "x")
        assert await fs.read("d/f.txt") == b"x"
        assert await fs.list("d") == ["f.txt"]
        assert await fs.exists("d/f.txt")
        await fs.remove("d/f.txt")
        with pytest.raises(PermissionDeniedError):
            await fs.read("/etc/hostname")
    assert len(on_loop) == 6 and not any(on_loop), on_loop


async def test_a_workspace_swapped_for_a_symlink_is_not_followed_by_the_host(
    platform_only: Platform, tmp_path: Path
) -> None:
    """Where a plugin can write its workspace's parent (a sandboxed pool worker's own
    directory is the parent of its workspaces), it can replace the workspace with a symlink
    to any directory. The host must keep treating the path it made as the workspace, not
    what it now points at: reading and writing "in the workspace" then reaches nothing."""
    secret_dir = tmp_path / "elsewhere"
    secret_dir.mkdir()
    (secret_dir / "secret.txt").write_text(SECRET)
    workspace = (tmp_path / "ws").resolve()
    workspace.mkdir()
    async with platform_only:
        fs = _context(platform_only, workspace, tmp_path / "root").fs
        workspace.rename(tmp_path / "ws.moved")
        workspace.symlink_to(secret_dir)
        calls = (
            lambda: fs.read("secret.txt"),
            lambda: fs.write("pwned.txt", "x"),
            lambda: fs.list("."),
        )
        for call in calls:
            with pytest.raises(PermissionDeniedError):
                await call()
    assert sorted(os.listdir(secret_dir)) == ["secret.txt"]


@pytest.fixture
def planter(deputies: PluginRegistry, tmp_path: Path) -> Iterator[dict[str, Path]]:
    """``planter`` may write ``shared`` and read ``shared/data/**``; ``secret`` is outside
    both. Outside /tmp (which bubblewrap hides), for the kernel to have a say too."""
    base = PLUGINS.parent / f".planted-{os.getpid()}-{tmp_path.name}"
    dirs = {"shared": base / "shared", "secret": base / "secret"}
    (dirs["shared"] / "data").mkdir(parents=True)
    dirs["secret"].mkdir()
    (dirs["secret"] / "shadow").write_text(SECRET)
    (dirs["secret"] / "shadow").chmod(0o600)
    deputies.register(
        {
            "id": "planter",
            "root": str(PLUGINS),
            "handlers": [
                {"id": name, "entry": f"confused_deputy:{name}"}
                for name in ("plant_link", "read_planted")
            ],
            "permissions": {
                "fs": {"write": [str(dirs["shared"])], "read": [f"{dirs['shared']}/data/**"]}
            },
        }
    )
    yield dirs
    shutil.rmtree(base)


async def test_a_grant_beneath_a_writable_directory_cannot_be_pointed_elsewhere(
    planter: dict[str, Path], backend: ExecutionBackend, request: pytest.FixtureRequest
) -> None:
    """A plugin may write ``shared`` and read ``shared/data/**``: it swaps ``shared/data``
    (its to change) for a symlink to a directory it may not read, then reads through it.
    Grants are resolved when they are used (the host's checks, the kernel's rules at the
    next execution): followed, the symlink would carry the read grant to its target. A grant
    beneath a directory the plugin may write grants nothing that directory does not, so it
    is not followed out of it: the host never reads the secret for it, nor lets the kernel
    (where there is a kernel sandbox)."""
    granted = planter["shared"] / "data"
    await run(
        backend,
        "plant_link",
        {"granted": str(granted), "target": str(planter["secret"])},
        plugin="planter",
    )
    got = await run(backend, "read_planted", {"path": str(granted / "shadow")}, plugin="planter")
    assert got["ctx.fs"] == "PERMISSION_DENIED", got
    if request.node.callspec.params["backend"] in SANDBOXED:  # the others are trusted code
        assert got["direct"] != SECRET, got


ROOTER = '''
import os


def swap_root(ctx, input):
    """Swap this plugin's own root (its directory may be written) for a symlink to
    ``input["target"]``, then read ``shadow`` there: through ``ctx.fs`` and directly."""
    root = input["root"]
    os.rename(root, root + ".moved")
    os.symlink(input["target"], root)
    got = {}
    try:
        got["ctx.fs"] = ctx.fs.read_text(os.path.join(root, "shadow"))
    except Exception as exc:
        got["ctx.fs"] = getattr(exc, "code", type(exc).__name__)
    try:
        with open(os.path.join(root, "shadow")) as f:
            got["direct"] = f.read()
    except OSError as exc:
        got["direct"] = type(exc).__name__
    return got
'''


@pytest.fixture
def rooter(deputies: PluginRegistry, tmp_path: Path) -> Iterator[dict[str, Path]]:
    """``rooter``'s root lies in ``plugins``, which it may write; ``secret`` is outside."""
    base = PLUGINS.parent / f".rooter-{os.getpid()}-{tmp_path.name}"
    dirs = {
        "plugins": base / "plugins",
        "root": base / "plugins" / "rooter",
        "secret": base / "secret",
    }
    dirs["root"].mkdir(parents=True)
    (dirs["root"] / f"rooter_{tmp_path.name.replace('-', '_')}.py").write_text(ROOTER)
    dirs["secret"].mkdir()
    (dirs["secret"] / "shadow").write_text(SECRET)
    (dirs["secret"] / "shadow").chmod(0o600)
    module = f"rooter_{tmp_path.name.replace('-', '_')}"
    deputies.register(
        {
            "id": "rooter",
            "root": str(dirs["root"]),
            "handlers": [{"id": "swap_root", "entry": f"{module}:swap_root"}],
            "permissions": {"fs": {"write": [str(dirs["plugins"])]}},
        }
    )
    yield dirs
    shutil.rmtree(base)


async def test_a_root_beneath_a_writable_directory_cannot_be_pointed_elsewhere(
    rooter: dict[str, Path], backend: ExecutionBackend, request: pytest.FixtureRequest
) -> None:
    """A plugin's own root is readable by it; a plugin that may write the root's directory
    swaps the root for a symlink to a directory it may not read. The host takes the root as
    it resolves when its grants are first compiled: it must not take the symlink's target
    for the plugin's own files (the write grant covers the real root anyway)."""
    got = await run(
        backend,
        "swap_root",
        {"root": str(rooter["root"]), "target": str(rooter["secret"])},
        plugin="rooter",
    )
    assert got["ctx.fs"] == "PERMISSION_DENIED", got
    if request.node.callspec.params["backend"] in SANDBOXED:  # the others are trusted code
        assert got["direct"] != SECRET, got
