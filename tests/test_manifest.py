"""Plugin manifests: validation, and loading ``plugin.toml`` files."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugin_execution import ManifestError, PluginManifest, load_manifest
from plugin_execution.manifest import (
    ChannelSpec,
    HandlerSpec,
    Permissions,
    Quotas,
    manifest_from_dict,
)

PLUGINS = Path(__file__).parent / "plugins"


def write(tmp_path: Path, text: str, name: str = "plugin.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- the test plugin's own manifest -------------------------------------------------------------


def test_load_the_sample_plugin() -> None:
    manifest = load_manifest(PLUGINS / "plugin.toml")
    assert manifest.id == "tests.sample"
    assert manifest.version == "1.0.0"
    assert manifest.description == "handlers for the test suite"
    assert manifest.root == str(PLUGINS.resolve())
    assert manifest.handler("echo") == HandlerSpec(id="echo", entry="sample:echo")
    assert manifest.handler("quick") == HandlerSpec(id="quick", entry="sample:sleep", timeout=0.5)
    counter = manifest.handler("counter")
    assert counter is not None and counter.warmup and counter.entry == "sample:Counter"
    assert manifest.handler("nope") is None
    assert manifest.permissions.quotas.timeout == 60
    # table order is kept
    assert [h.id for h in manifest.handlers][:3] == ["echo", "add", "sleep"]


def test_load_a_directory_means_its_plugin_toml() -> None:
    assert load_manifest(PLUGINS) == load_manifest(PLUGINS / "plugin.toml")
    assert load_manifest(str(PLUGINS)).id == "tests.sample"


# -- the two handler forms and the root ---------------------------------------------------------


def test_handlers_as_a_list_of_tables_with_channels_and_permissions(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        id = "org.listed"
        version = "2.1"
        root = "src"

        [[handlers]]
        id = "a"
        entry = "pkg.mod:run"
        timeout = 2.5

        [[handlers]]
        id = "b"
        entry = "pkg.mod:Runner.execute"
        description = "the second"

        [[channels]]
        path = "/chat"
        entry = "pkg.chat:session"

        [[channels]]
        path = "/events/v1"
        entry = "pkg.chat:on_event"
        style = "events"

        [permissions]
        platform = ["cache", "storage"]

        [permissions.fs]
        read = ["/data/*"]

        [permissions.env]
        read = ["HOME", "APP_*"]

        [permissions.quotas]
        timeout = 10
        memory_mb = 256
        cpu_s = 1.5
        """,
    )
    manifest = load_manifest(path)
    assert manifest.handlers == (
        HandlerSpec(id="a", entry="pkg.mod:run", timeout=2.5),
        HandlerSpec(id="b", entry="pkg.mod:Runner.execute", description="the second"),
    )
    assert manifest.channels == (
        ChannelSpec(path="/chat", entry="pkg.chat:session"),
        ChannelSpec(path="/events/v1", entry="pkg.chat:on_event", style="events"),
    )
    perms = manifest.permissions
    assert perms.platform == ("cache", "storage")
    assert perms.fs.read == ("/data/*",)
    assert perms.env.read == ("HOME", "APP_*")
    assert perms.quotas == Quotas(timeout=10, memory_mb=256, cpu_s=1.5)
    assert manifest.root == str((tmp_path / "src").resolve())


def test_a_single_string_permission_is_one_pattern(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'id = "p"\n[permissions]\nplatform = "cache"\n[permissions.fs]\nread = "/data/*"\n',
    )
    perms = load_manifest(path).permissions
    assert perms.fs.read == ("/data/*",)
    assert perms.platform == ("cache",)


def test_a_non_string_permission_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, 'id = "p"\n[permissions.env]\nread = ["HOME", 3]\n')
    with pytest.raises(
        ManifestError, match=r"expected strings, got 3 \(int\) @ manifest\.permissions\.env\.read"
    ):
        load_manifest(path)


def test_a_handler_table_cannot_rename_itself(tmp_path: Path) -> None:
    path = write(tmp_path, 'id = "p"\n[handlers.a]\nid = "b"\nentry = "m:f"\n')
    with pytest.raises(ManifestError, match=r"\[handlers\.a\] sets a different id 'b'"):
        load_manifest(path)


def test_a_single_string_permission_is_one_pattern_in_python() -> None:
    assert Permissions(platform="cache").platform == ("cache",)  # type: ignore[arg-type]


def test_root_defaults_to_the_manifest_directory(tmp_path: Path) -> None:
    plugin_dir = tmp_path / "deep" / "plugin"
    plugin_dir.mkdir(parents=True)
    write(plugin_dir, 'id = "p"\n[handlers.h]\nentry = "m:f"\n')
    assert load_manifest(plugin_dir).root == str(plugin_dir.resolve())


def test_relative_root_is_resolved_against_the_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, 'id = "p"\nroot = "../shared"\n[handlers.h]\nentry = "m:f"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    manifest = load_manifest(tmp_path / "plugin.toml")
    assert manifest.root == str((tmp_path.parent / "shared").resolve())


def test_handler_permissions_replace_the_plugins() -> None:
    own = Permissions(platform=("cache",))
    manifest = PluginManifest(
        id="p",
        handlers=[HandlerSpec("a", "m:a"), HandlerSpec("b", "m:b", permissions=own)],
        permissions=Permissions(platform=("events",)),
    )
    assert isinstance(manifest.handlers, tuple)
    a, b = manifest.handlers
    assert manifest.permissions_for(a).platform == ("events",)
    assert manifest.permissions_for(b) is own


def test_manifest_from_dict_accepts_the_keyed_form() -> None:
    manifest = manifest_from_dict(
        {"id": "p", "handlers": {"x": {"entry": "m:x"}, "y": {"entry": "m:y", "warmup": True}}}
    )
    assert [(h.id, h.entry, h.warmup) for h in manifest.handlers] == [
        ("x", "m:x", False),
        ("y", "m:y", True),
    ]
    assert manifest.root is None  # no file, no base directory: nothing to resolve


# -- malformed manifests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            'id = "p"\n[handlers.h]\nentry = "not an entry"\n',
            r"entry 'not an entry' is not a valid entry .*handlers\[0\]",
            id="bad-entry",
        ),
        pytest.param(
            'id = "p"\n[handlers.h]\nentry = "module.only"\n',
            r"'module\.only' is not a valid entry",
            id="entry-without-attribute",
        ),
        pytest.param(
            'id = "p"\ncolour = "red"\n[handlers.h]\nentry = "m:f"\n',
            r"colour",
            id="unknown-top-level-key",
        ),
        pytest.param(
            'id = "p"\n[handlers.h]\nentry = "m:f"\nretries = 3\n',
            r"unknown key 'retries' .*@ manifest\.handlers\[0\]",
            id="unknown-handler-key",
        ),
        pytest.param(
            'id = "p"\n[permissions.network]\nlisten = ["*"]\n',
            r"unknown key 'listen' .*@ manifest\.permissions\.network",
            id="unknown-permission-key",
        ),
        pytest.param(
            'id = "p"\n[[handlers]]\nid = "h"\nentry = "m:f"\n'
            '[[handlers]]\nid = "h"\nentry = "m:g"\n',
            r"duplicate handler id 'h'",
            id="duplicate-handler-id",
        ),
        pytest.param(
            'id = "p"\n[[channels]]\npath = "/c"\nentry = "m:f"\n'
            '[[channels]]\npath = "/c"\nentry = "m:g"\n',
            r"duplicate channel path '/c'",
            id="duplicate-channel-path",
        ),
        pytest.param(
            'id = "p"\n[permissions.quotas]\ntimeout = -1\n',
            r"timeout must be positive, got -1",
            id="negative-quota",
        ),
        pytest.param(
            'id = "p"\n[permissions.quotas]\nmemory_mb = "lots"\n',
            r"manifest\.permissions\.quotas\.memory_mb",
            id="quota-not-a-number",
        ),
        pytest.param(
            'id = "p"\n[handlers.h]\nentry = "m:f"\ntimeout = 0\n',
            r"timeout must be positive",
            id="zero-handler-timeout",
        ),
        pytest.param('version = "1"\n', r"required field missing @ manifest\.id", id="missing-id"),
        pytest.param('id = "bad id"\n', r"plugin id", id="bad-plugin-id"),
        pytest.param(
            'id = "p"\n[[channels]]\npath = "/c"\nentry = "m:f"\nstyle = "push"\n',
            r"style",
            id="bad-channel-style",
        ),
        pytest.param(
            'id = "p"\n[[channels]]\npath = "no-slash"\nentry = "m:f"\n',
            r"channel path",
            id="bad-channel-path",
        ),
    ],
)
def test_malformed_manifest_names_the_problem(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ManifestError, match=expected) as info:
        load_manifest(path)
    err = info.value
    assert err.code == "INVALID_MANIFEST"
    assert err.message.startswith(f"{path}: invalid plugin manifest: ")


def test_every_problem_is_listed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'id = "p"\nextra = 1\n[handlers.a]\nentry = "bad"\n[handlers.b]\nentry = "m:f"\nx = 2\n',
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = info.value.message
    assert "extra" in message
    assert "handlers[1]" in message and "unknown key 'x'" in message


def test_manifest_error_carries_the_plugin_id_when_known(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(write(tmp_path, 'id = "org.p"\n[handlers.h]\nentry = "bad"\n'))
    assert info.value.plugin_id == "org.p"


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, 'id = "unterminated\n')
    with pytest.raises(
        ManifestError, match=r"cannot read plugin manifest .*plugin\.toml: "
    ) as info:
        load_manifest(path)
    assert "line 1" in info.value.message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"no plugin manifest at .*missing\.toml"):
        load_manifest(tmp_path / "missing.toml")
    with pytest.raises(ManifestError, match=r"no plugin manifest at .*empty.plugin\.toml"):
        load_manifest((tmp_path / "empty").mkdir() or tmp_path / "empty")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "plugin.toml"
    path.write_bytes(b'id = "\xff"\n')
    with pytest.raises(ManifestError, match="cannot read plugin manifest"):
        load_manifest(path)


def test_manifest_must_be_a_mapping() -> None:
    with pytest.raises(ManifestError, match="must be a table/mapping, got list"):
        manifest_from_dict([("id", "p")])  # type: ignore[arg-type]


def test_specs_validate_in_python_too() -> None:
    with pytest.raises(ValueError, match="not a valid entry"):
        HandlerSpec(id="h", entry="pkg/mod.py")
    with pytest.raises(ValueError, match="not a valid handler id"):
        HandlerSpec(id="", entry="m:f")
    with pytest.raises(ValueError, match="duplicate handler id"):
        PluginManifest(id="p", handlers=[HandlerSpec("h", "m:f"), HandlerSpec("h", "m:g")])
    with pytest.raises(ValueError, match="must be positive"):
        Quotas(memory_mb=0)
