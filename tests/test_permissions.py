"""Permission checks on their own: path resolution, path/URL/service grants, and manifests
that grant malformed things are rejected at load time, naming the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from plugin_execution import ManifestError, Permissions, load_manifest
from plugin_execution.manifest import FsPermissions, NetworkPermissions
from plugin_execution.permissions import (
    PathProblem,
    confined_grants,
    confined_root,
    grants_for,
    parse_connect_pattern,
    parse_service_grant,
    parse_url_pattern,
    resolve_path,
)

# -- resolve_path ---------------------------------------------------------------------------------


def test_relative_paths_are_relative_to_the_base(tmp_path: Path) -> None:
    base = str(tmp_path.resolve())
    assert resolve_path("a/b.txt", base) == f"{base}/a/b.txt"
    assert resolve_path("./a//b/../c", base) == f"{base}/a/c"
    assert resolve_path("../x", base) == f"{os.path.dirname(base)}/x"


def test_absolute_and_double_slash_paths() -> None:
    assert resolve_path("/etc/passwd", "/tmp") == "/etc/passwd"
    assert resolve_path("//etc/passwd", "/tmp") == "/etc/passwd"
    assert resolve_path("/tmp/../etc//passwd", "/tmp") == "/etc/passwd"


def test_symlinks_are_followed(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to("/etc")
    assert resolve_path("link/passwd", str(tmp_path)) == "/etc/passwd"


@pytest.mark.parametrize(
    "path",
    [
        "a\x00b",
        "\uff0e\uff0e/etc/passwd",  # fullwidth full stops: '..' after NFKC
        "x\uff0fy",  # fullwidth solidus: '/' after NFKC
        "\u2024\u2024/x",  # one dot leader: '.' after NFKC, twice
    ],
)
def test_nul_and_lookalikes_are_refused(path: str) -> None:
    with pytest.raises(PathProblem):
        resolve_path(path, "/tmp")


def test_other_unicode_is_just_a_name(tmp_path: Path) -> None:
    assert resolve_path("café/naïve.txt", str(tmp_path)).endswith("café/naïve.txt")


# -- path grants ----------------------------------------------------------------------------------


def test_workspace_and_root_by_default(tmp_path: Path) -> None:
    root = tmp_path / "plugin"
    root.mkdir()
    grants = grants_for(Permissions(), str(root))
    ws = str(tmp_path / "ws")
    assert grants.fs_read(f"{ws}/x", ws) and grants.fs_write(f"{ws}/deep/x", ws)
    assert grants.fs_read(f"{root.resolve()}/mod.py", ws)
    assert not grants.fs_write(f"{root.resolve()}/mod.py", ws)  # own files: read only
    assert not grants.fs_read(f"{ws}x/sibling", ws)  # a prefix is not a parent
    assert not grants.fs_read("/etc/passwd", ws)


def test_globs_and_directories(tmp_path: Path) -> None:
    data = tmp_path.resolve()
    perms = Permissions(
        fs=FsPermissions(read=(f"{data}/in/*.csv", f"{data}/all/**"), write=f"{data}/out")
    )
    grants = grants_for(perms, None)
    assert grants.fs_read(f"{data}/in/a.csv", None)
    assert not grants.fs_read(f"{data}/in/a.txt", None)
    assert not grants.fs_read(f"{data}/in/sub/a.csv", None)  # '*' stays in one directory
    assert grants.fs_read(f"{data}/all/x/y/z", None)
    assert grants.fs_write(f"{data}/out/x/y", None) and grants.fs_read(f"{data}/out", None)
    assert not grants.fs_write(f"{data}/outside", None)


def test_relative_grants_are_under_the_plugin_root(tmp_path: Path) -> None:
    perms = Permissions(fs=FsPermissions(write=("cache",)))
    assert grants_for(perms, str(tmp_path)).fs_write(f"{tmp_path.resolve()}/cache/x", None)
    assert not grants_for(perms, None).fs_write("/cache/x", None)


def test_fs_anchor_is_where_the_granting_rule_starts(tmp_path: Path) -> None:
    """The directory the host's fd walk to a path starts from: the workspace, the root, or
    the literal directory of the most specific grant matching the path, and None exactly
    where the check itself denies."""
    data, root, ws = tmp_path.resolve(), str(tmp_path.resolve() / "plugin"), "/ws"
    perms = Permissions(
        fs=FsPermissions(
            read=(f"{data}/in/*.csv", f"{data}/all/**"),
            write=(f"{data}/out", f"{data}/out/deep/er"),
        )
    )
    grants = grants_for(perms, root)
    anchor = grants.fs_anchor
    assert anchor("/ws/x/y", ws, write=True) == "/ws" == anchor("/ws", ws, write=False)
    assert anchor(f"{root}/m.py", ws, write=False) == root
    assert anchor(f"{root}/m.py", ws, write=True) is None  # own files: read only
    assert anchor(f"{data}/in/a.csv", ws, write=False) == f"{data}/in"
    assert anchor(f"{data}/in/a.txt", ws, write=False) is None
    assert anchor(f"{data}/all/x/y", ws, write=False) == f"{data}/all"
    # out/deep/er lies beneath out, which the plugin may write: the walk starts at out, and
    # never follows what the plugin could have put at deep or er (see confined_grants)
    assert anchor(f"{data}/out/deep/er/f", ws, write=True) == f"{data}/out"
    assert anchor(f"{data}/out/f", ws, write=False) == f"{data}/out"  # write grants read
    assert anchor(f"{data}/in/a.csv", ws, write=True) is None
    for path in ("/ws/a", f"{root}/m.py", f"{data}/in/a.csv", f"{data}/in/b.txt", "/etc"):
        for write in (False, True):
            allowed = (grants.fs_write if write else grants.fs_read)(path, ws)
            assert (anchor(path, ws, write=write) is not None) == allowed, (path, write)


# -- URLs, hosts, services --------------------------------------------------------------------


def test_url_patterns() -> None:
    pattern = parse_url_pattern("https://api.example.com/v1/*")
    assert pattern.matches("https", "api.example.com", 443, "/v1/items/3")
    assert not pattern.matches("http", "api.example.com", 80, "/v1/items")
    assert not pattern.matches("https", "api.example.com", 8443, "/v1/items")
    assert not pattern.matches("https", "api.example.com", 443, "/v2/items")
    sub = parse_url_pattern("http://*.example.com:*")
    assert sub.matches("http", "a.b.example.com", 8080, "/anything")
    assert not sub.matches("http", "example.com", 80, "/")
    assert not sub.matches("http", "evilexample.com", 80, "/")
    assert parse_url_pattern("HTTP://LocalHost:8000").host == "localhost"


@pytest.mark.parametrize(
    "bad", ["ftp://x", "api.example.com", "https://", "https://u@h", "http://h:99999", "http://a b"]
)
def test_bad_url_patterns(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_url_pattern(bad)


def test_connect_patterns() -> None:
    assert parse_connect_pattern("db.internal:5432") == ("db.internal", 5432)
    assert parse_connect_pattern("*:443") == ("*", 443)
    assert parse_connect_pattern("[::1]:*") == ("[::1]", None)
    # A port in other scripts' digits (Arabic-Indic, fullwidth) is not one: str.isdigit
    # says yes and int() reads them as 80 and 443.
    for bad in (
        "db.internal",
        "http://db:1",
        "db:port",
        "db:\u0668\u0660",
        "db:\uff14\uff14\uff13",
    ):
        with pytest.raises(ValueError):
            parse_connect_pattern(bad)
    with pytest.raises(ValueError):
        parse_url_pattern("https://example.com:\u0668\u0660/x")


def test_service_grants() -> None:
    assert parse_service_grant("cache") == ("cache", None)
    assert parse_service_grant("events:orders.*") == ("events", "orders.*")
    with pytest.raises(ValueError, match="unknown platform service 'cahce'"):
        parse_service_grant("cahce")
    with pytest.raises(ValueError, match=r"use fs\.read / fs\.write"):
        parse_service_grant("fs")
    with pytest.raises(ValueError, match="non-empty"):
        parse_service_grant("cache:")
    grants = grants_for(Permissions(platform=("cache", "events:orders.*")), None)
    assert grants.service("cache", "me", "me")
    assert not grants.service("cache", "other", "me")
    assert grants.service("events", "orders.new", "me")
    assert not grants.service("events", "payments", "me")
    assert not grants.service("storage", "me", "me")


def test_network_permissions_validate_in_python() -> None:
    with pytest.raises(ValueError, match="not a URL pattern"):
        NetworkPermissions(fetch=("example.com",))
    with pytest.raises(ValueError, match="host:port"):
        NetworkPermissions(connect=("example.com",))


@pytest.mark.parametrize(
    ("block", "key"),
    [
        (
            '[permissions]\nplatform = ["cahce"]\n',
            r"platform: 'cahce': unknown .* @ manifest\.permissions ",
        ),
        (
            '[permissions.network]\nfetch = ["example.com"]\n',
            r"fetch: 'example\.com' is not a URL.* @ manifest\.permissions\.network",
        ),
        (
            '[permissions.network]\nconnect = ["nohost"]\n',
            r"connect: 'nohost' .* @ manifest\.permissions\.network",
        ),
        ('[permissions.shell]\nallow = "git"\nextra = 1\n', r"extra.*manifest\.permissions\.shell"),
        ("[permissions.invoke]\nallow = [1]\n", r"manifest\.permissions\.invoke\.allow"),
        (
            '[handlers.h]\nentry = "m:f"\n[handlers.h.permissions]\nplatform = ["nope"]\n',
            r"platform: 'nope'.* @ manifest\.handlers\[0\]\.permissions",
        ),
    ],
)
def test_malformed_permission_blocks_fail_at_load_naming_the_key(
    tmp_path: Path, block: str, key: str
) -> None:
    path = tmp_path / "plugin.toml"
    path.write_text(f'id = "p"\n{block}', encoding="utf-8")
    with pytest.raises(ManifestError, match=key):
        load_manifest(path)


def test_a_full_permission_block_loads(tmp_path: Path) -> None:
    path = tmp_path / "plugin.toml"
    path.write_text(
        """
id = "p"
[handlers.h]
entry = "m:f"
[handlers.h.permissions]
platform = ["cache"]
[permissions]
platform = ["cache", "storage:shared-*", "events:orders.*"]
[permissions.fs]
read = ["/data/**"]
write = ["out"]
[permissions.network]
fetch = ["https://api.example.com/v1/*"]
connect = ["db:5432"]
[permissions.shell]
allow = ["git"]
[permissions.invoke]
allow = ["acme.*"]
""",
        encoding="utf-8",
    )
    manifest = load_manifest(path)
    assert manifest.permissions.network.fetch == ("https://api.example.com/v1/*",)
    spec = manifest.handler("h")
    assert spec is not None and manifest.permissions_for(spec).platform == ("cache",)


def test_grants_beneath_a_writable_directory_are_dropped(tmp_path: Path) -> None:
    """A grant beneath a directory the plugin may write (a write grant without globs) adds
    nothing but what the plugin can plant there; it is dropped, however it is spelled.
    Grants elsewhere, and beneath glob write grants (which give no directory), stay."""
    data = tmp_path.resolve()
    (data / "link").symlink_to(data / "out")  # the operator's: a way into out
    reads, writes = confined_grants(
        [
            f"{data}/out/data/**",
            f"{data}/out/x",
            f"{data}/out/../out/y",
            f"{data}/link/z",
            "out/rel/*",
            f"{data}/in",
            f"{data}/logs/a",
            f"{data}/output",
        ],
        [f"{data}/out", f"{data}/out/deep", f"{data}/logs/*.log", f"{data}/w"],
        f"{data}",
    )
    assert reads == [f"{data}/in", f"{data}/logs/a", f"{data}/output"]
    assert writes == [f"{data}/out", f"{data}/logs/*.log", f"{data}/w"]
    assert confined_grants(["in", "/abs"], [], None) == (["/abs"], [])  # nothing to drop
    # a grant reached through the operator's symlink into a writable directory is dropped too
    assert confined_grants([f"{data}/link/z"], [f"{data}/out"], None)[0] == []


def test_a_root_beneath_a_writable_directory_is_left_to_that_grant(tmp_path: Path) -> None:
    data = tmp_path.resolve()
    root = f"{data}/plugins/p"
    assert confined_root(root, [f"{data}/plugins"]) is None
    assert confined_root(root, ["."]) == root  # its own files: the root itself, not above it
    assert confined_root(root, [f"{data}/other", f"{data}/plugins/*.log"]) == root
    assert confined_root(None, [f"{data}"]) is None
