"""Shared fixtures: the test plugin registry, a private workspace root, and leak checks.

Every test runs under ``no_leaks``: after it, this process has the same open fds and no child
processes (zombies included) that it did not have before.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from plugin_execution import PluginRegistry, WorkspaceManager

PLUGINS = Path(__file__).parent / "plugins"
SRC = Path(__file__).parents[1] / "src"


def open_fds() -> set[int]:
    """This process's open fds, less the one used to list them."""
    listing = f"/proc/{os.getpid()}/fd"
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") != listing:
                fds.add(int(name))
        except OSError:
            continue
    return fds


def child_pids(parent: int | None = None) -> set[int]:
    """Pids whose parent is ``parent`` (default: this process), zombies included.

    The kernel's own lists of each of the parent's threads' children (a few µs), read twice:
    two equal reads are a true snapshot. (A read can skip a child only when another one is
    reaped during it, and then the reads differ: the reaped one is in the first only. A
    child started between them differs too.) Otherwise, or where the kernel has no such
    lists (``CONFIG_PROC_CHILDREN``), every process's ``stat`` is read (~10 ms).
    """
    parent = os.getpid() if parent is None else parent
    first = _children_lists(parent)
    if first is not None and first == _children_lists(parent):
        return first
    return _child_pids_from_stat(parent)


def _children_lists(parent: int) -> set[int] | None:
    """The pids in ``/proc/PARENT/task/*/children``, or None if one cannot be read."""
    found: set[int] = set()
    try:
        for task in os.listdir(f"/proc/{parent}/task"):
            with open(f"/proc/{parent}/task/{task}/children", "rb") as f:
                found.update(map(int, f.read().split()))
    except OSError:  # no such file in this kernel, or the parent or one of its threads ended
        return None
    return found


def _child_pids_from_stat(parent: int) -> set[int]:
    """Pids whose parent is ``parent``: from the ``stat`` of every process."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[1]) == parent:
            found.add(int(entry))
    return found


def _settle(check: callable, timeout: float = 5.0) -> bool:  # type: ignore[valid-type]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    fds_before = open_fds()
    children_before = child_pids()
    yield
    assert _settle(lambda: open_fds() <= fds_before), (
        f"fds leaked: {sorted(open_fds() - fds_before)} -> "
        + ", ".join(_describe_fd(fd) for fd in sorted(open_fds() - fds_before))
    )
    assert _settle(lambda: child_pids() <= children_before), (
        f"child processes leaked: {sorted(child_pids() - children_before)}"
    )


def _describe_fd(fd: int) -> str:
    try:
        return f"{fd}={os.readlink(f'/proc/self/fd/{fd}')}"
    except OSError:
        return f"{fd}=?"


@pytest.fixture
def registry() -> PluginRegistry:
    """The test plugin ``tests.sample`` (loaded from its plugin.toml) and the examples."""
    registry = PluginRegistry.from_entry_points()
    registry.load_path(PLUGINS)
    return registry


@pytest.fixture
def workspace_root(tmp_path: Path) -> Iterator[Path]:
    """A workspace root that must be empty of workspaces when the test ends."""
    root = tmp_path / "workspaces"
    yield root
    leftovers = (
        [p for p in root.rglob("*") if p.is_dir() and p.parent != root] if root.exists() else []
    )
    assert not leftovers, f"workspace dirs leaked: {leftovers}"


@pytest.fixture
def workspaces(workspace_root: Path) -> WorkspaceManager:
    return WorkspaceManager(root=workspace_root)


def pytest_configure(config: pytest.Config) -> None:
    sys.path.insert(0, str(PLUGINS))  # lets tests import the sample plugin directly


@asynccontextmanager
async def serve_process(*args: str) -> AsyncIterator[tuple[trio.Process, list[str]]]:
    """``plugin-execution serve --port 0 ARGS`` in a real child: yields it and the URLs its
    first line lists, once it listens. Afterwards SIGTERM, then SIGKILL if it lingers; its
    pipes are closed either way."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "plugin_execution", "serve", "--port", "0", *args],
        cwd=Path(__file__).parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        output = b""
        with trio.fail_after(60):
            while b"\n" not in output:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, "serve exited before listing its routes"
                output += chunk
        first = output.decode().splitlines()[0]
        yield process, [word.rstrip(",") for word in first.split()]
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(30):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                await pipe.aclose()


@pytest.fixture
def batch_frames(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The member count of every ``Batch`` frame the host makes during the test."""
    from plugin_execution.protocol import Connection

    sizes: list[int] = []
    real = Connection.send_batch

    def spy(self: Connection, members: list[bytes], linger: float = 0.0) -> bytes:
        sizes.append(len(members))
        return real(self, members, linger)

    monkeypatch.setattr(Connection, "send_batch", spy)
    return sizes
