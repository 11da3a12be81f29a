"""WorkspaceManager / WorkspaceLease: private per-execution directories, safely removed."""

from __future__ import annotations

import os
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from plugin_execution import InvalidRequestError, WorkspaceError, WorkspaceManager
from plugin_execution import workspace as workspace_module


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def host_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.startswith("host-"))


def listing(root: Path) -> list[Path]:
    return sorted(root.iterdir())


def gone(path: Path) -> bool:
    """Nothing at ``path``, not even a dangling symlink."""
    return not os.path.lexists(path)


async def test_acquire_creates_a_private_dir_and_release_removes_it(
    workspaces: WorkspaceManager,
) -> None:
    async with workspaces:
        lease = await workspaces.acquire("exec-1")
        assert lease.execution_id == "exec-1" and lease.dir == lease.path
        assert lease.dir.is_dir() and mode(lease.dir) == 0o700
        assert lease.dir.parent == workspaces.host_dir and mode(lease.dir.parent) == 0o700
        assert workspaces.active() == 1
        (lease.dir / "out.txt").write_text("result")
        await lease.release()
        assert not lease.dir.exists() and lease.released
        assert workspaces.active() == 0
        await lease.release()  # idempotent
        assert not lease.dir.exists()


async def test_lease_context_releases_on_exception(workspaces: WorkspaceManager) -> None:
    async with workspaces:
        with pytest.raises(ZeroDivisionError):
            async with workspaces.lease("exec-1") as lease:
                (lease.dir / "f").write_text("x")
                1 / 0  # noqa: B018
        assert not lease.dir.exists() and workspaces.active() == 0


async def test_lease_context_releases_on_cancellation(workspaces: WorkspaceManager) -> None:
    async with workspaces:
        with trio.CancelScope() as scope:
            async with workspaces.lease("exec-1") as lease:
                (lease.dir / "sub").mkdir()
                (lease.dir / "sub" / "f").write_text("x")  # not empty: removal needs a thread
                scope.cancel()
                await trio.sleep_forever()
        assert scope.cancelled_caught
        assert not lease.dir.exists() and lease.released


async def test_release_completes_in_an_already_cancelled_scope(
    workspaces: WorkspaceManager,
) -> None:
    async with workspaces:
        lease = await workspaces.acquire("exec-1")
        (lease.dir / "f").write_text("x")
        with trio.CancelScope() as scope:
            scope.cancel()
            await lease.release()
        assert not lease.dir.exists() and lease.released


async def test_acquire_when_cancelled_creates_nothing(workspaces: WorkspaceManager) -> None:
    async with workspaces:
        assert workspaces.host_dir is not None
        with trio.CancelScope() as scope:
            scope.cancel()
            await workspaces.acquire("exec-1")
        assert scope.cancelled_caught
        assert workspaces.active() == 0 and listing(workspaces.host_dir) == []


async def test_concurrent_releases_both_return_once_it_is_gone(
    workspaces: WorkspaceManager,
) -> None:
    async with workspaces:
        lease = await workspaces.acquire("exec-1")
        for i in range(50):
            (lease.dir / f"f{i}").write_text("x")
        seen = []

        async def release() -> None:
            await lease.release()
            seen.append(lease.dir.exists())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(release)
            nursery.start_soon(release)
        assert seen == [False, False]


@pytest.mark.parametrize(
    ("execution_id", "problem"),
    [
        ("", "empty"),
        ("a/b", "path separator"),
        ("../etc", "path separator"),
        ("a\\b", "path separator"),
        (".", "not a directory name"),
        ("..", "not a directory name"),
        ("a\0b", "NUL"),
        ("a\nb", "control or unprintable character"),
        ("x" * 129, "129 characters long"),
        ("é" * 65, "130 bytes long"),
        ("\ud800", "unprintable character"),
        (123, "must be a str, not int"),
        (None, "must be a str, not NoneType"),
        (b"abc", "must be a str, not bytes"),
    ],
)
async def test_invalid_execution_ids_are_rejected(
    workspaces: WorkspaceManager, execution_id: object, problem: str
) -> None:
    async with workspaces:
        with pytest.raises(InvalidRequestError, match=problem) as info:
            await workspaces.acquire(execution_id)  # type: ignore[arg-type]
        assert info.value.code == "INVALID_REQUEST"
        with pytest.raises(InvalidRequestError, match=problem):
            workspaces.reserve(execution_id)  # type: ignore[arg-type]
        assert workspaces.host_dir is not None
        assert listing(workspaces.host_dir) == [] and workspaces.active() == 0


def test_valid_execution_ids_pass() -> None:
    for ok in ("a", "0f" * 16, "exec_1-2.3", "x" * 128, "é" * 64, "with space"):
        assert workspace_module.validate_execution_id(ok) == ok


def make_outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "keep.txt").write_text("precious")
    (outside / "sub" / "keep.txt").write_text("precious")
    return outside


def assert_untouched(outside: Path) -> None:
    assert (outside / "keep.txt").read_text() == "precious"
    assert (outside / "sub" / "keep.txt").read_text() == "precious"


async def test_release_removes_symlinks_and_never_their_targets(
    workspaces: WorkspaceManager, tmp_path: Path
) -> None:
    outside = make_outside(tmp_path)
    async with workspaces:
        lease = await workspaces.acquire("exec-1")
        (lease.dir / "to-dir").symlink_to(outside)
        (lease.dir / "to-file").symlink_to(outside / "keep.txt")
        (lease.dir / "nested").mkdir()
        (lease.dir / "nested" / "to-sub").symlink_to(outside / "sub")
        await lease.release()
        assert gone(lease.dir)
    assert_untouched(outside)


async def test_release_of_a_workspace_replaced_by_a_symlink_removes_only_the_link(
    workspaces: WorkspaceManager, tmp_path: Path
) -> None:
    outside = make_outside(tmp_path)
    async with workspaces:
        lease = await workspaces.acquire("exec-1")
        lease.dir.rmdir()
        lease.dir.symlink_to(outside)
        await lease.release()
        assert gone(lease.dir)
    assert_untouched(outside)


async def test_release_removes_directories_a_handler_locked(
    workspaces: WorkspaceManager,
) -> None:
    async with workspaces:
        lease = await workspaces.acquire("exec-1")
        locked = lease.dir / "a" / "b"
        locked.mkdir(parents=True)
        (locked / "f").write_text("x")
        (lease.dir / "ro.txt").write_text("x")
        os.chmod(lease.dir / "ro.txt", 0)
        os.chmod(locked, 0)
        os.chmod(lease.dir / "a", 0o500)
        os.chmod(lease.dir, 0o500)
        await lease.release()
        assert gone(lease.dir)


def test_restore_access_fixes_modes_below_and_leaves_link_targets_alone(tmp_path: Path) -> None:
    # Root ignores permission bits, so check the repair itself, not only that removal works.
    outside = make_outside(tmp_path)
    os.chmod(outside, 0o555)
    top = tmp_path / "ws"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "link").symlink_to(outside)
    for path in (top / "a" / "b", top / "a", top):
        os.chmod(path, 0)
    workspace_module._restore_access(str(top))
    assert [mode(p) for p in (top, top / "a", top / "a" / "b")] == [0o700] * 3
    assert mode(outside) == 0o555


async def test_failed_removal_raises_and_keeps_the_lease_open(
    workspaces: WorkspaceManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with workspaces:
        lease = await workspaces.acquire("exec-1")
        (lease.dir / "f").write_text("x")
        monkeypatch.setattr(workspace_module, "_rmtree", lambda path: PermissionError(13, "no"))
        with pytest.raises(WorkspaceError, match="could not remove workspace") as info:
            await lease.release()
        assert info.value.execution_id == "exec-1"
        assert info.value.details["path"] == str(lease.dir)
        assert lease.dir.exists() and not lease.released and workspaces.active() == 1
        monkeypatch.undo()
        await lease.release()
        assert not lease.dir.exists() and workspaces.active() == 0


async def test_duplicate_live_execution_id_is_an_error(workspaces: WorkspaceManager) -> None:
    async with workspaces:
        lease = await workspaces.acquire("exec-1")
        with pytest.raises(WorkspaceError, match="already has a live workspace"):
            await workspaces.acquire("exec-1")
        with pytest.raises(WorkspaceError, match="already has a live workspace"):
            workspaces.reserve("exec-1")
        assert lease.dir.exists() and workspaces.active() == 1
        await lease.release()
        again = await workspaces.acquire("exec-1")
        assert again.dir.is_dir()
        await again.release()


async def test_reserve_creates_lazily(workspaces: WorkspaceManager) -> None:
    async with workspaces:
        lease = workspaces.reserve("exec-1")
        assert not lease.path.exists() and workspaces.active() == 1
        assert lease.ensure() == lease.path
        assert lease.path.is_dir() and mode(lease.path) == 0o700
        (lease.path / "f").write_text("x")
        assert lease.ensure() == lease.path and (lease.path / "f").exists()
        await lease.release()
        assert not lease.path.exists()
        with pytest.raises(WorkspaceError, match="was released"):
            lease.ensure()
        assert not lease.path.exists()


async def test_reserved_dir_made_by_a_worker_process_is_released(
    workspaces: WorkspaceManager,
) -> None:
    async with workspaces:
        lease = workspaces.reserve("exec-1")
        os.mkdir(lease.path, 0o700)  # what a worker child handed the path does
        (lease.path / "f").write_text("x")
        assert lease.ensure() == lease.path
        await lease.release()
        assert not lease.path.exists()


async def test_release_of_a_never_created_reservation(workspaces: WorkspaceManager) -> None:
    async with workspaces:
        lease = workspaces.reserve("exec-1")
        await lease.release()
        assert lease.released and not lease.path.exists() and workspaces.active() == 0
        await lease.release()


async def test_exit_releases_open_leases_and_removes_the_host_dir(
    workspace_root: Path,
) -> None:
    manager = WorkspaceManager(root=workspace_root)
    async with manager:
        host = manager.host_dir
        assert host is not None and host.parent == workspace_root
        acquired = await manager.acquire("exec-1")
        (acquired.dir / "deep" / "er").mkdir(parents=True)
        reserved = manager.reserve("exec-2")
        lazy = manager.reserve("exec-3")
        lazy.ensure()
        assert manager.active() == 3
    assert not host.exists() and manager.host_dir is None
    assert manager.active() == 0
    assert all(lease.released for lease in (acquired, reserved, lazy))
    await acquired.release()
    with pytest.raises(WorkspaceError, match="was released"):
        lazy.ensure()
    with pytest.raises(WorkspaceError, match="not open"):
        manager.reserve("exec-4")
    assert listing(workspace_root) == []


async def test_exit_releases_even_when_cancelled(workspace_root: Path) -> None:
    manager = WorkspaceManager(root=workspace_root)
    with trio.CancelScope() as scope:
        async with manager:
            lease = await manager.acquire("exec-1")
            (lease.dir / "f").write_text("x")
            scope.cancel()
            await trio.sleep_forever()
    assert listing(workspace_root) == []


async def test_enter_cancelled_leaves_nothing_behind(workspace_root: Path) -> None:
    manager = WorkspaceManager(root=workspace_root)
    with trio.CancelScope() as scope:
        scope.cancel()
        async with manager:
            pytest.fail("entered a cancelled scope")
    assert manager.host_dir is None and listing(workspace_root) == []
    async with manager:  # still usable afterwards
        assert manager.host_dir is not None and manager.host_dir.is_dir()


async def test_reserve_before_enter_is_an_error(workspaces: WorkspaceManager) -> None:
    with pytest.raises(WorkspaceError, match="not open"):
        workspaces.reserve("exec-1")
    with pytest.raises(WorkspaceError, match="not open"):
        await workspaces.acquire("exec-1")


async def test_entering_is_reentrant_and_reopening_claims_a_fresh_host(
    workspace_root: Path,
) -> None:
    manager = WorkspaceManager(root=workspace_root)
    async with manager:
        first = manager.host_dir
        async with manager:
            assert manager.host_dir == first
        assert manager.host_dir == first and first is not None and first.is_dir()
        lease = await manager.acquire("exec-1")
    assert not first.exists() and lease.released
    async with manager:
        assert manager.host_dir not in (None, first)


async def test_sweep_removes_dead_hosts_and_keeps_live_ones(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    live = WorkspaceManager(root=root)
    async with live:
        live_lease = await live.acquire("exec-1")
        (live_lease.dir / "f").write_text("x")
        # A crashed host: its directory exists, nobody holds its lock.
        dead = root / "host-999999-deadbeef"
        (dead / "exec-9" / "locked").mkdir(parents=True)
        (dead / "exec-9" / "f").write_text("x")
        os.chmod(dead / "exec-9" / "locked", 0)
        # A host that died while starting up, long ago, and one starting up right now.
        stale_claim = root / ".claim-999998-cafe"
        stale_claim.mkdir()
        old = time.time() - 3600
        os.utime(stale_claim, (old, old))
        young_claim = root / ".claim-999997-f00d"
        young_claim.mkdir()
        unrelated = root / "not-a-host"
        unrelated.mkdir()

        other = WorkspaceManager(root=root)
        async with other:
            assert not dead.exists() and not stale_claim.exists()
            assert young_claim.exists() and unrelated.exists()
            assert live.host_dir is not None and live.host_dir.is_dir()
            assert (live_lease.dir / "f").read_text() == "x"
            assert len(host_dirs(root)) == 2
        assert live_lease.dir.exists() and host_dirs(root) == [live.host_dir]
    assert host_dirs(root) == []
    young_claim.rmdir()
    unrelated.rmdir()


def test_default_root_is_private_per_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    manager = WorkspaceManager()
    assert manager.root == tmp_path / f"plugin-execution-{os.geteuid()}"


async def test_default_root_is_created_0700_and_tightened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    manager = WorkspaceManager()
    async with manager:
        assert mode(manager.root) == 0o700
    os.chmod(manager.root, 0o755)
    async with manager:
        assert mode(manager.root) == 0o700


async def test_default_root_that_is_a_symlink_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    manager = WorkspaceManager()
    manager.root.symlink_to(elsewhere)
    with pytest.raises(WorkspaceError, match="is a symlink"):
        async with manager:
            pytest.fail("used a symlinked root")
    assert listing(elsewhere) == [] and manager.host_dir is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory for another uid")
async def test_default_root_owned_by_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    manager = WorkspaceManager()
    manager.root.mkdir(mode=0o777)
    os.chown(manager.root, 65534, 65534)
    with pytest.raises(WorkspaceError, match="belongs to uid 65534"):
        async with manager:
            pytest.fail("used another user's root")
    assert listing(manager.root) == []


async def test_release_unused_closes_a_reservation_without_touching_the_filesystem(
    workspace_root: Path,
) -> None:
    manager = WorkspaceManager(root=workspace_root)
    async with manager:
        lease = manager.reserve("exec-1")
        assert manager.active() == 1 and manager._leases["exec-1"] is lease
        lease.release_unused()
        assert lease.released and manager.active() == 0 and "exec-1" not in manager._leases
        assert not lease.path.exists()
        lease.release_unused()  # idempotent
        assert lease.released and manager.active() == 0
        await lease.release()  # and a release after it has nothing to do
        assert lease.released and manager.active() == 0
        with pytest.raises(WorkspaceError, match="was released"):
            lease.ensure()
        assert not lease.path.exists()
        # What was made there regardless (the caller was told it was not) is left alone
        # here, and goes with the host directory when the manager exits.
        made = manager.reserve("exec-2")
        os.mkdir(made.path, 0o700)
        (made.path / "f").write_text("x")
        made.release_unused()
        assert made.released and manager.active() == 0
        assert (made.path / "f").read_text() == "x"
        host = manager.host_dir
        assert host is not None
    assert not host.exists() and listing(workspace_root) == []


async def test_release_unused_does_nothing_to_a_lease_already_released(
    workspaces: WorkspaceManager,
) -> None:
    async with workspaces:
        old = workspaces.reserve("exec-1")
        await old.release()
        again = workspaces.reserve("exec-1")  # the id is free again: a new lease holds it
        old.release_unused()
        assert old.released
        assert workspaces._leases["exec-1"] is again and not again.released
        assert workspaces.active() == 1
        again.ensure()
        (again.path / "f").write_text("x")
        again.release_unused()  # on an open lease: closed, its directory left for the exit
        assert again.released and workspaces.active() == 0
        assert (again.path / "f").exists()
    again.release_unused()  # after the manager's exit: nothing to do
    assert again.released and workspaces.active() == 0 and workspaces.host_dir is None


async def test_release_unused_leaves_a_release_in_progress_alone(
    workspaces: WorkspaceManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    proceed = threading.Event()
    rmtree = workspace_module._rmtree

    def held_rmtree(path: str) -> OSError | None:
        proceed.wait(30)
        return rmtree(path)

    monkeypatch.setattr(workspace_module, "_rmtree", held_rmtree)
    async with workspaces:
        lease = await workspaces.acquire("exec-1")
        (lease.dir / "f").write_text("x")  # not empty: removed in a worker thread
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lease.release)
            try:
                await trio.testing.wait_all_tasks_blocked()  # it waits on the thread now
                assert not lease.released  # releasing, not released
                lease.release_unused()
                assert not lease.released and workspaces.active() == 1
                assert workspaces._leases["exec-1"] is lease
            finally:
                proceed.set()
        assert lease.released and workspaces.active() == 0
        assert gone(lease.dir)
