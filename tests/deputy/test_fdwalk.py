"""The fd walk the host opens plugin paths with (platform/_fdwalk.py), with openat2 and with
the component-by-component fallback: it opens what is at the checked path, or refuses."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugin_execution.platform import _fdwalk


@pytest.fixture(params=["openat2", "components"])
def walk(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test with openat2, then with the fallback walk."""
    saved = _fdwalk._openat2.usable
    if request.param == "openat2" and not saved:
        pytest.skip("this kernel has no openat2 (Linux >= 5.6)")
    _fdwalk._openat2.usable = request.param == "openat2"
    try:
        yield request.param
    finally:
        _fdwalk._openat2.usable = saved


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """anchor/a/b/file.txt, and a secret outside the anchor."""
    anchor = tmp_path.resolve() / "anchor"
    (anchor / "a" / "b").mkdir(parents=True)
    (anchor / "a" / "b" / "file.txt").write_text("inside")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "file.txt").write_text("secret")
    return anchor


def read(anchor: Path, parts: list[str], name: str) -> bytes:
    parent = _fdwalk.open_dir(str(anchor), parts)
    try:
        fd = _fdwalk.open_file(parent, name, os.O_RDONLY)
    finally:
        os.close(parent)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def test_openat2_is_called_for_real(tmp_path: Path) -> None:
    if not _fdwalk._openat2.usable:
        pytest.skip("openat2 is not usable here: the fallback walk is tested alone")
    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "d")
    base = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        fd = _fdwalk._openat2(base, "d", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        assert fd is not None and os.path.samestat(os.fstat(fd), os.stat(tmp_path / "d"))
        os.close(fd)
        with pytest.raises(_fdwalk.PathChanged):  # RESOLVE_NO_SYMLINKS
            _fdwalk._openat2(base, "link", os.O_PATH | os.O_DIRECTORY)
        with pytest.raises(_fdwalk.PathChanged):  # RESOLVE_BENEATH
            _fdwalk._openat2(base, "d/../..", os.O_PATH | os.O_DIRECTORY)
    finally:
        os.close(base)
    assert _fdwalk._openat2.usable


def test_a_plain_path_opens(walk: str, tree: Path) -> None:
    assert read(tree, ["a", "b"], "file.txt") == b"inside"


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_symlinked_directory_anywhere_on_the_walk_is_refused(
    walk: str, tree: Path, where: str
) -> None:
    outside = tree.parent / "outside"
    if where == "first":
        (tree / "a").rename(tree / "a-real")
        (tree / "a").symlink_to(outside)
        parts = ["a"]
    elif where == "middle":
        (tree / "a" / "b").rename(tree / "b-real")
        (tree / "a" / "b").symlink_to(outside)
        parts = ["a", "b"]
    else:
        (tree / "a" / "b" / "link").symlink_to(outside)
        parts = ["a", "b", "link"]
    with pytest.raises(_fdwalk.PathChanged):
        read(tree, parts, "file.txt")


def test_a_symlink_in_the_anchor_itself_is_refused(walk: str, tree: Path) -> None:
    link = tree.parent / "anchor-link"
    link.symlink_to(tree)
    with pytest.raises(_fdwalk.PathChanged):
        _fdwalk.open_dir(str(link), ["a"])


def test_the_last_component_is_never_followed(walk: str, tree: Path) -> None:
    (tree / "a" / "b" / "late").symlink_to(tree.parent / "outside" / "file.txt")
    with pytest.raises(_fdwalk.PathChanged):
        read(tree, ["a", "b"], "late")
    parent = _fdwalk.open_dir(str(tree), ["a", "b"])
    try:
        with pytest.raises(_fdwalk.PathChanged):
            _fdwalk.open_file(parent, "late", os.O_WRONLY | os.O_CREAT)
    finally:
        os.close(parent)
    assert (tree.parent / "outside" / "file.txt").read_text() == "secret"


def test_fifos_and_devices_are_refused_unopened(walk: str, tree: Path) -> None:
    os.mkfifo(tree / "fifo")
    kinds = {"fifo": "a FIFO"}
    try:
        os.mknod(tree / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        kinds["null"] = "a character device"
    except PermissionError:
        pass  # not root: the FIFO alone
    parent = _fdwalk.open_dir(str(tree), [])
    try:
        for name, kind in kinds.items():
            for flags in (os.O_RDONLY, os.O_WRONLY | os.O_CREAT):
                with pytest.raises(_fdwalk.NotRegularFile) as info:
                    _fdwalk.open_file(parent, name, flags)
                assert info.value.kind == kind
        with pytest.raises(IsADirectoryError):
            _fdwalk.open_file(parent, "a", os.O_RDONLY)
    finally:
        os.close(parent)


def test_missing_directories_are_created_only_where_allowed(walk: str, tree: Path) -> None:
    asked: list[str] = []

    def allow_shallow(path: str) -> bool:
        asked.append(path)
        return path.count("/") <= str(tree).count("/") + 3

    fd = _fdwalk.open_dir(str(tree), ["a", "new", "deeper"], create=allow_shallow)
    os.close(fd)
    assert (tree / "a" / "new" / "deeper").is_dir()
    assert asked == [f"{tree}/a/new", f"{tree}/a/new/deeper"]
    with pytest.raises(_fdwalk.CreateRefused) as info:
        _fdwalk.open_dir(str(tree), ["x", "y", "z", "w"], create=allow_shallow)
    assert info.value.path == f"{tree}/x/y/z/w" and (tree / "x" / "y" / "z").is_dir()
    with pytest.raises(FileNotFoundError):
        _fdwalk.open_dir(str(tree), ["nope"])
    # a missing anchor (a granted directory not made yet) is created the same way
    fd = _fdwalk.open_dir(str(tree / "later"), ["sub"], create=lambda path: "later" in path)
    os.close(fd)
    assert (tree / "later" / "sub").is_dir()
    with pytest.raises(_fdwalk.CreateRefused) as info:
        only = str(tree / "no" / "anchor")  # a grant whose parent is missing and not granted
        _fdwalk.open_dir(only, [], create=lambda path: path == only)
    assert info.value.path == f"{tree}/no" and not (tree / "no").exists()


def test_creating_refuses_a_symlink_too(walk: str, tree: Path) -> None:
    (tree / "w").symlink_to(tree.parent / "outside")
    with pytest.raises(_fdwalk.PathChanged):
        _fdwalk.open_dir(str(tree), ["w", "sub"], create=lambda path: True)
    assert not (tree.parent / "outside" / "sub").exists()


def test_paths_are_split_below_their_anchor() -> None:
    assert _fdwalk.components("/ws", "/ws") == []
    assert _fdwalk.components("/ws", "/ws/a/b") == ["a", "b"]
    assert _fdwalk.components("/", "/etc/passwd") == ["etc", "passwd"]
    assert _fdwalk.parent_of("/ws", "/ws/a/b") == ("/ws", ["a"], "b")
    assert _fdwalk.parent_of("/srv/out", "/srv/out") == ("/srv", [], "out")
    assert _fdwalk.parent_of("/", "/") == ("/", [], ".")
    for bad in ("/wsx/a", "/etc", "/ws/../etc", "/ws//a", "/ws/./a"):
        with pytest.raises(ValueError):
            _fdwalk.components("/ws", bad)
