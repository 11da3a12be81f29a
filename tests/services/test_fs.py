"""ctx.fs, straight against a session: grants, defaults, and every path trick denied."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from plugin_execution import PermissionDeniedError, Permissions
from plugin_execution.manifest import FsPermissions

from .conftest import Harness


async def test_the_workspace_is_always_readable_and_writable(harness: Harness) -> None:
    fs = harness.ctx().fs
    assert await fs.write("notes/a.txt", "hello") == 5
    assert await fs.write("notes/a.txt", b" world", append=True) == 6
    assert await fs.read("notes/a.txt") == b"hello world"
    assert await fs.read_text(str(harness.workspace / "notes/a.txt")) == "hello world"
    assert await fs.list() == ["notes"] and await fs.list("notes") == ["a.txt"]
    assert await fs.exists("notes/a.txt") and not await fs.exists("nope")
    await fs.remove("notes/a.txt")
    await fs.remove("notes")
    assert await fs.list() == []
    assert harness.denials == 0


async def test_missing_files_raise_the_os_error(harness: Harness) -> None:
    with pytest.raises(FileNotFoundError):
        await harness.ctx().fs.read("missing.txt")


async def test_the_plugin_root_is_readable_not_writable(harness: Harness) -> None:
    (harness.root / "data.json").write_text("{}")
    fs = harness.ctx().fs
    assert await fs.read(str(harness.root / "data.json")) == b"{}"
    with pytest.raises(PermissionDeniedError) as info:
        await fs.write(str(harness.root / "data.json"), "x")
    assert info.value.permission == "fs.write"


async def test_granted_paths_and_globs(harness: Harness, tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    out.mkdir()
    (data / "a.csv").write_text("1,2")
    (data / "b.txt").write_text("no")
    fs = harness.ctx(Permissions(fs=FsPermissions(read=f"{data}/*.csv", write=str(out)))).fs
    assert await fs.read(str(data / "a.csv")) == b"1,2"
    with pytest.raises(PermissionDeniedError):
        await fs.read(str(data / "b.txt"))
    await fs.write(str(out / "deep/er/r.txt"), "ok")  # parents created, each checked
    assert (out / "deep/er/r.txt").read_text() == "ok"
    with pytest.raises(PermissionDeniedError):
        await fs.list(str(data))  # the directory itself is not granted, only *.csv in it


def _outside_paths(harness: Harness, tmp_path: Path) -> list[str]:
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    (harness.workspace / "escape").symlink_to(tmp_path)
    (harness.workspace / "secret-link").symlink_to(secret)
    rel = os.path.relpath(secret, harness.workspace)
    return [
        rel,  # ../secret.txt
        f"sub/../../{secret.name}",
        str(secret),  # absolute
        f"/{secret}",  # //tmp/...
        f"{harness.workspace}/../{secret.name}",
        "escape/secret.txt",  # a directory symlink out of the workspace
        "secret-link",  # a file symlink out of the workspace
        "/etc/passwd",
        "\uff0e\uff0e/secret.txt",  # fullwidth '..'
        "x\uff0f..\uff0f..\uff0fsecret.txt",
        "a\x00b",
    ]


async def test_path_tricks_are_denied(harness: Harness, tmp_path: Path) -> None:
    fs = harness.ctx().fs
    paths = _outside_paths(harness, tmp_path)
    for path in paths:
        for method, args in (("read", ()), ("exists", ()), ("write", ("x",)), ("remove", ())):
            with pytest.raises(PermissionDeniedError) as info:
                await getattr(fs, method)(path, *args)
            err = info.value
            assert err.permission in ("fs.read", "fs.write"), path
            assert err.resource.startswith(path), (path, err.resource)
            assert (err.plugin_id, err.handler_id, err.execution_id) == ("tests.p", "h", "e-1")
    assert (tmp_path / "secret.txt").read_text() == "s3cret"
    assert harness.denials == 4 * len(paths)


async def test_a_division_slash_is_just_a_name(harness: Harness) -> None:
    # NFKC leaves U+2215 alone: the kernel and every tool see one file name, in the workspace.
    await harness.ctx().fs.write("..\u2215x", "x")
    assert (harness.workspace / "..\u2215x").read_text() == "x"


async def test_a_symlink_swapped_in_at_the_last_step_is_not_followed(
    harness: Harness, tmp_path: Path
) -> None:
    (tmp_path / "target").write_text("outside")
    link = harness.workspace / "late"
    link.symlink_to(tmp_path / "target")
    # resolve_path follows the link and denies; O_NOFOLLOW is the second line of defence
    with pytest.raises(PermissionDeniedError):
        await harness.ctx().fs.write("late", "x")
    assert (tmp_path / "target").read_text() == "outside"


async def test_sync_convention(harness: Harness) -> None:
    import trio

    ctx = harness.ctx()
    ctx.blocking = True

    def work() -> bytes:
        ctx.fs.write("s.txt", "sync")
        data: bytes = ctx.fs.read("s.txt")
        return data

    assert await trio.to_thread.run_sync(work) == b"sync"


async def test_a_granted_directory_that_does_not_exist_yet_is_created(
    harness: Harness, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    fs = harness.ctx(Permissions(fs=FsPermissions(write=str(out)))).fs
    await fs.write(str(out / "sub" / "a.txt"), "made")
    assert (out / "sub" / "a.txt").read_text() == "made"
    # its missing parent is not granted: refused, naming the directory
    fs = harness.ctx(Permissions(fs=FsPermissions(write=str(tmp_path / "none" / "out")))).fs
    with pytest.raises(PermissionDeniedError) as info:
        await fs.write(str(tmp_path / "none" / "out" / "a.txt"), "x")
    assert info.value.resource == str(tmp_path.resolve() / "none")
    assert not (tmp_path / "none").exists()
