"""The bubblewrap command line, the probe, and bwrap's exit status seen as the child's."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio

from plugin_execution.sandbox import bubblewrap

from .conftest import SUPPORT, needs


def pairs(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


def test_command_for_a_spawned_child() -> None:
    argv = bubblewrap.command(
        ["python", "-c", "pass"],
        bwrap="/usr/bin/bwrap",
        workspace="/tmp/ws/abc",
        read=["/tmp/venv", "/usr/lib/python3", "/tmp/venv/lib"],
        write=["/srv/out"],
    )
    assert argv[0] == "/usr/bin/bwrap"
    assert "--die-with-parent" not in argv  # see test_a_sandbox_outlives_the_thread_...
    assert argv[-4:] == ["--", "python", "-c", "pass"]
    for flag in ("--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"):
        assert flag in argv
    assert pairs(argv, "--cap-drop") == ["ALL"]
    assert "/tmp" in pairs(argv, "--tmpfs") and "/run" in pairs(argv, "--tmpfs")
    assert pairs(argv, "--ro-bind-try") == ["/tmp/venv", "/tmp/venv/lib"]  # only what /tmp hides
    assert pairs(argv, "--bind-try") == ["/srv/out", "/tmp/ws/abc"]
    binds = [argv[i + 1] for i, arg in enumerate(argv) if arg.endswith("bind-try")]
    assert binds == sorted(binds, key=lambda p: p.count("/"))  # parents first
    assert pairs(argv, "--chdir") == ["/tmp/ws/abc"]
    assert argv.index("--ro-bind") < argv.index("--tmpfs") < argv.index("--ro-bind-try")


def test_command_with_network_and_without_a_pid_namespace() -> None:
    argv = bubblewrap.command([], bwrap="bwrap", workspace="/w", network=True, pid_namespace=False)
    assert "--unshare-net" not in argv and "--unshare-pid" not in argv
    assert "--proc" not in argv  # the host's /proc, under the read-only root
    assert "/run" not in pairs(argv, "--tmpfs")  # the resolver may live there
    assert argv[-1] == "--"


@needs("bubblewrap")
def test_probe_and_version() -> None:
    path = SUPPORT.bwrap
    assert path is not None
    assert bubblewrap.probe(path) is None
    assert bubblewrap.version(path).startswith("bubblewrap")


def test_probe_reports_a_broken_bwrap(tmp_path: Path) -> None:
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: Creating new namespace failed' >&2\nexit 1\n")
    fake.chmod(0o755)
    problem = bubblewrap.probe(str(fake))
    assert problem is not None and "Creating new namespace failed" in problem
    assert "could not run" in (bubblewrap.probe(str(tmp_path / "missing")) or "")


@pytest.mark.parametrize(
    ("script", "expected"),
    [("exit 3", 3), ("exit 0", 0), ("kill -SEGV $$", -11), ("exit 137", -9)],
)
async def test_wrapped_status_is_the_childs(script: str, expected: int) -> None:
    # bwrap reports "killed by signal N" as 128 + N; a shell does the same, which stands in
    process = await trio.lowlevel.open_process(
        ["/bin/sh", "-c", f"sh -c '{script}'; exit $?"], start_new_session=True
    )
    wrapped = bubblewrap.WrappedProcess(process)
    assert wrapped.returncode is None
    assert await wrapped.wait() == expected
    assert wrapped.returncode == expected


@needs("bubblewrap")
async def test_a_spawned_child_keeps_its_fds_and_environment(tmp_path: Path) -> None:
    read, write = os.pipe()
    argv = bubblewrap.command(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            f"import os; os.write({write}, os.environ['X'].encode())",
        ],
        bwrap=SUPPORT.bwrap or "bwrap",
        workspace=str(tmp_path),
        read=[sys.prefix, sys.base_prefix, os.path.dirname(sys.executable)],
    )
    try:
        process = await trio.lowlevel.open_process(
            argv, pass_fds=(write,), env={"X": "passed"}, start_new_session=True
        )
        os.close(write)
        assert await bubblewrap.WrappedProcess(process).wait() == 0
        assert os.read(read, 100) == b"passed"
    finally:
        os.close(read)


async def test_concurrent_waiters() -> None:
    # WorkerProcess waits on its process from several tasks at once (the exit watcher, aclose);
    # only one may watch the pidfd and sweep, and none may see the others close it

    async def wait(wrapped: bubblewrap.WrappedProcess, codes: list[int]) -> None:
        codes.append(await wrapped.wait())

    for _ in range(20):
        process = await trio.lowlevel.open_process(["/bin/sh", "-c", "exit 7"])
        wrapped = bubblewrap.WrappedProcess(process)
        codes: list[int] = []
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(wait, wrapped, codes)
        assert codes == [7, 7, 7]


@needs("bubblewrap")
async def test_a_sandbox_outlives_the_thread_that_started_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # trio starts processes from worker threads that exit after IDLE_TIMEOUT (10 s) idle;
    # with --die-with-parent, bwrap's PR_SET_PDEATHSIG fired then and killed every sandbox
    # (spawned executions, the zygote, ctx.shell commands) 10 s after it started.
    from trio._core import _thread_cache

    monkeypatch.setattr(_thread_cache, "IDLE_TIMEOUT", 0.2)
    assert SUPPORT.bwrap is not None
    argv = bubblewrap.command(
        ["/bin/sleep", "2"], bwrap=SUPPORT.bwrap, workspace=os.getcwd(), pid_namespace=True
    )
    process = bubblewrap.WrappedProcess(await trio.lowlevel.open_process(argv))
    with trio.fail_after(30):
        assert await process.wait() == 0  # not -9
