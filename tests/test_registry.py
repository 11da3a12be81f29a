"""PluginRegistry (registering, resolving, discovering) and importing handler entries."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugin_execution import (
    HandlerContractError,
    HandlerNotFoundError,
    HandlerSpec,
    ManifestError,
    PluginManifest,
    PluginNotFoundError,
    PluginRegistry,
    ValidationError,
)
from plugin_execution.handlers import Handler, import_entry, load_handler
from plugin_execution.registry import ENTRY_POINT_GROUP

PLUGINS = Path(__file__).parent / "plugins"


def manifest(plugin_id: str = "org.p", *handlers: str) -> PluginManifest:
    return PluginManifest(
        id=plugin_id, handlers=[HandlerSpec(h, f"mod:{h}") for h in handlers or ("run",)]
    )


# -- register / replace / unregister / resolve ------------------------------------------------


def test_register_and_resolve() -> None:
    registry = PluginRegistry()
    assert len(registry) == 0 and "org.p" not in registry
    registered = registry.register(manifest("org.p", "run", "other"))
    assert "org.p" in registry and len(registry) == 1
    assert registry.get("org.p") is registered
    assert [m.id for m in registry] == ["org.p"]
    resolved = registry.resolve("org.p", "other")
    assert resolved.entry == "mod:other"
    assert resolved.manifest is registered
    assert resolved.root is None
    assert resolved.permissions is registered.permissions


def test_resolve_uses_the_handlers_own_permissions() -> None:
    from plugin_execution import Permissions

    own = Permissions(platform=("cache",))
    registry = PluginRegistry(
        [PluginManifest(id="p", handlers=[HandlerSpec("h", "m:h", permissions=own)])]
    )
    assert registry.resolve("p", "h").permissions is own


def test_register_a_mapping_validates_it() -> None:
    registry = PluginRegistry()
    registered = registry.register({"id": "org.m", "handlers": {"go": {"entry": "m:go"}}})
    assert isinstance(registered, PluginManifest)
    assert registry.resolve("org.m", "go").entry == "m:go"
    with pytest.raises(ManifestError, match="entry"):
        registry.register({"id": "org.bad", "handlers": {"go": {"entry": "nope"}}})
    assert "org.bad" not in registry


def test_register_twice_needs_replace() -> None:
    registry = PluginRegistry([manifest("org.p", "old")])
    with pytest.raises(ManifestError, match=r"'org\.p' is already registered.*replace=True"):
        registry.register(manifest("org.p", "new"))
    assert registry.resolve("org.p", "old")  # unchanged
    registry.register(manifest("org.p", "new"), replace=True)
    assert registry.resolve("org.p", "new").entry == "mod:new"
    with pytest.raises(HandlerNotFoundError):
        registry.resolve("org.p", "old")
    assert len(registry) == 1


def test_unregister() -> None:
    registry = PluginRegistry([manifest("org.a"), manifest("org.b")])
    registry.unregister("org.a")
    assert "org.a" not in registry and [m.id for m in registry] == ["org.b"]
    with pytest.raises(PluginNotFoundError, match=r"org\.a"):
        registry.unregister("org.a")


def test_iteration_is_a_snapshot() -> None:
    registry = PluginRegistry([manifest("org.a"), manifest("org.b")])
    for m in registry:
        registry.unregister(m.id)  # does not break the loop
    assert len(registry) == 0


def test_plugin_not_found_names_what_was_tried_and_what_exists() -> None:
    registry = PluginRegistry([manifest("org.a"), manifest("org.b")])
    with pytest.raises(PluginNotFoundError) as info:
        registry.resolve("org.c", "run")
    err = info.value
    assert err.code == "PLUGIN_NOT_FOUND"
    assert err.plugin_id == "org.c"
    assert "'org.c'" in err.message and "known: org.a, org.b" in err.message
    with pytest.raises(PluginNotFoundError, match=r"known: none"):
        PluginRegistry().get("x")


def test_handler_not_found_names_what_was_tried_and_what_exists() -> None:
    registry = PluginRegistry([manifest("org.a", "one", "two")])
    with pytest.raises(HandlerNotFoundError) as info:
        registry.resolve("org.a", "three")
    err = info.value
    assert (err.code, err.plugin_id, err.handler_id) == ("HANDLER_NOT_FOUND", "org.a", "three")
    assert "'org.a' has no handler 'three'" in err.message
    assert "it has: one, two" in err.message


def test_load_path_and_from_paths(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "plugin.toml").write_text('id = "org.other"\n[handlers.h]\nentry = "m:h"\n')
    registry = PluginRegistry.from_paths(PLUGINS, other / "plugin.toml")
    assert sorted(m.id for m in registry) == ["org.other", "tests.sample"]
    assert registry.resolve("tests.sample", "echo").root == str(PLUGINS.resolve())
    assert registry.resolve("org.other", "h").root == str(other.resolve())
    with pytest.raises(ManifestError, match="already registered"):
        registry.load_path(PLUGINS)
    assert registry.load_path(PLUGINS, replace=True).id == "tests.sample"
    with pytest.raises(ManifestError, match="no plugin manifest"):
        PluginRegistry.from_paths(tmp_path / "missing")


# -- entry-point discovery --------------------------------------------------------------------

DIST = "pe_test_dist"


@pytest.fixture
def installed_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A real (tiny) distribution on sys.path declaring entry points in our group."""
    site = tmp_path / "site"
    info = site / f"{DIST}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent(
            f"""\
            [{ENTRY_POINT_GROUP}]
            as-manifest = {DIST}_good:manifest
            as-dict = {DIST}_good:as_dict
            as-path = {DIST}_good:toml_path
            as-factory = {DIST}_good:make
            broken-import = {DIST}_broken:manifest
            broken-manifest = {DIST}_good:bad_dict
            wrong-type = {DIST}_good:number
            missing-attr = {DIST}_good:nothing_here

            [console_scripts]
            unrelated = {DIST}_good:make
            """
        )
    )
    toml_dir = site / "toml_plugin"
    toml_dir.mkdir()
    (toml_dir / "plugin.toml").write_text('id = "ep.path"\n[handlers.h]\nentry = "m:h"\n')
    (site / f"{DIST}_good.py").write_text(
        textwrap.dedent(
            f"""\
            from plugin_execution import HandlerSpec, PluginManifest

            manifest = PluginManifest(id="ep.manifest", handlers=[HandlerSpec("h", "m:h")])
            as_dict = {{"id": "ep.dict", "handlers": {{"h": {{"entry": "m:h"}}}}}}
            toml_path = {str(toml_dir / "plugin.toml")!r}
            bad_dict = {{"id": "ep.bad", "handlers": {{"h": {{"entry": "not an entry"}}}}}}
            number = 42


            def make():
                return PluginManifest(id="ep.factory", handlers=[HandlerSpec("h", "m:h")])
            """
        )
    )
    (site / f"{DIST}_broken.py").write_text("raise RuntimeError('this plugin is broken')\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    for name in (f"{DIST}_good", f"{DIST}_broken"):
        sys.modules.pop(name, None)


def test_from_entry_points_finds_good_plugins_and_records_broken_ones(
    installed_dist: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = PluginRegistry.from_entry_points()
    ids = {m.id for m in registry}
    assert {"ep.manifest", "ep.dict", "ep.path", "ep.factory"} <= ids
    assert "examples.hello" in ids  # this project's own entry point is still found
    assert "ep.bad" not in ids
    assert registry.resolve("ep.path", "h").root == str((installed_dist / "toml_plugin").resolve())

    messages = [e.message for e in registry.load_errors]
    assert all(e.code == "INVALID_MANIFEST" for e in registry.load_errors)
    assert len(messages) == 4, messages

    def one(fragment: str) -> str:
        found = [m for m in messages if fragment in m]
        assert len(found) == 1, (fragment, messages)
        return found[0]

    assert "failed to load: RuntimeError: this plugin is broken" in one("'broken-import'")
    assert "failed to load: AttributeError" in one("'missing-attr'")
    assert "gave a int" in one("'wrong-type'")
    assert "not a valid entry" in one("'not an entry'")
    # each broken plugin is also logged, by entry-point name
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "'broken-import'" in logged and "'wrong-type'" in logged


def test_from_entry_points_other_group_is_empty(installed_dist: Path) -> None:
    registry = PluginRegistry.from_entry_points(group="pe_test_dist.no_such_group")
    assert len(registry) == 0 and registry.load_errors == []


def test_duplicate_ids_across_entry_points_are_load_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site2"
    info = site / "pe_dup_dist-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pe-dup-dist\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nclash = plugin_execution.examples.manifest:manifest\n"
    )
    monkeypatch.syspath_prepend(str(site))
    registry = PluginRegistry.from_entry_points()
    assert "examples.hello" in registry
    assert any("already registered" in e.message for e in registry.load_errors)


# -- importing handler entries ----------------------------------------------------------------


@pytest.fixture
def clean_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """import_entry puts a plugin root on sys.path; undo it after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_import_entry_with_root(clean_sys_path: None) -> None:
    fn = import_entry("sample:echo", str(PLUGINS))
    assert fn.__name__ == "echo"
    assert str(PLUGINS) in sys.path
    assert import_entry("sample:Counter.execute", str(PLUGINS)).__name__ == "execute"


def test_import_entry_missing_module() -> None:
    with pytest.raises(HandlerNotFoundError) as info:
        import_entry("pe_no_such_module_here:run")
    err = info.value
    assert err.entry == "pe_no_such_module_here:run"
    assert "module 'pe_no_such_module_here' failed to import" in err.message
    assert "ModuleNotFoundError" in err.message


def test_import_entry_missing_attribute() -> None:
    with pytest.raises(HandlerNotFoundError) as info:
        import_entry("sample:no_such_function")
    assert info.value.details == {"entry": "sample:no_such_function"}
    assert "'sample' has no attribute 'no_such_function'" in info.value.message
    with pytest.raises(HandlerNotFoundError, match=r"no attribute 'Counter\.nope'"):
        import_entry("sample:Counter.nope")


def test_import_entry_module_raising_at_import(tmp_path: Path, clean_sys_path: None) -> None:
    (tmp_path / "pe_explodes.py").write_text("raise ZeroDivisionError('kaboom at import')\n")
    try:
        with pytest.raises(HandlerNotFoundError) as info:
            import_entry("pe_explodes:run", str(tmp_path))
    finally:
        sys.modules.pop("pe_explodes", None)
    err = info.value
    assert err.entry == "pe_explodes:run"
    assert "ZeroDivisionError: kaboom at import" in err.message
    assert "kaboom at import" in err.details["traceback"]


def test_a_plugin_module_not_found_says_where_it_was_looked_for(
    tmp_path: Path, clean_sys_path: None
) -> None:
    # registry.register(PluginManifest(...)) without root= read only "No module named 'pe_x'"
    with pytest.raises(HandlerNotFoundError) as info:
        import_entry("pe_nowhere.handlers:run")
    assert "No module named 'pe_nowhere'" in info.value.message
    assert "the plugin has no root" in info.value.message
    with pytest.raises(HandlerNotFoundError) as info:
        import_entry("pe_nowhere.handlers:run", str(tmp_path))
    assert f"not under the plugin's root {tmp_path}" in info.value.message
    # a module the plugin imports that is missing is the plugin's business: no hint
    (tmp_path / "pe_needs_dep.py").write_text("import pe_not_installed_dep\n")
    try:
        with pytest.raises(HandlerNotFoundError) as info:
            import_entry("pe_needs_dep:run", str(tmp_path))
    finally:
        sys.modules.pop("pe_needs_dep", None)
    assert "root" not in info.value.message


@pytest.mark.parametrize("entry", ["nocolon", "mod:", ":attr"])
def test_import_entry_malformed(entry: str) -> None:
    with pytest.raises(HandlerNotFoundError, match="is not of the form") as info:
        import_entry(entry)
    assert info.value.entry == entry


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("sample:not_a_handler", "is an int, not a handler"),
        ("sample:NoExecute", "is a NoExecute, not a handler"),
        ("sample:Point", "could not be instantiated without arguments"),
    ],
)
def test_load_handler_contract_errors(entry: str, message: str) -> None:
    with pytest.raises(HandlerContractError, match=message) as info:
        load_handler(entry)
    assert info.value.code == "HANDLER_CONTRACT_ERROR"
    assert info.value.details["entry"] == entry


def _takes_ctx_only(ctx):  # type: ignore[no-untyped-def]
    return None


def _takes_three(ctx, input, extra):  # type: ignore[no-untyped-def]
    return None


async def _takes_required_keyword(ctx, input, *, mode):  # type: ignore[no-untyped-def]
    return None


class _ExecuteWithoutInput:
    def execute(self, ctx):  # type: ignore[no-untyped-def]
        return None


@pytest.mark.parametrize(
    ("target", "shown"),
    [
        (_takes_ctx_only, "(ctx)"),
        (_takes_three, "(ctx, input, extra)"),
        (_takes_required_keyword, "(ctx, input, *, mode)"),
        (_ExecuteWithoutInput, "(ctx)"),
        (lambda: None, "()"),
    ],
)
def test_a_handler_that_cannot_take_ctx_and_input_is_a_contract_error(
    target: object, shown: str
) -> None:
    # A user whose handler has the wrong signature gets told so when it is loaded, not a
    # TypeError from the runtime's frames as a HANDLER_ERROR.
    with pytest.raises(HandlerContractError) as info:
        Handler("mod:handler", target)
    message = info.value.message
    assert f"takes {shown}" in message and "(ctx, input)" in message, message
    assert info.value.details["entry"] == "mod:handler"


def _extra_defaulted(ctx, input, extra=None, *, mode="x"):  # type: ignore[no-untyped-def]
    return input


def _star_args(*args):  # type: ignore[no-untyped-def]
    return args[1]


class _Callable:
    def __call__(self, ctx, input):  # type: ignore[no-untyped-def]
        return input


class _CallableWithDefaults:
    def __call__(self, ctx, input, extra=None, *, mode="x"):  # type: ignore[no-untyped-def]
        return input


@pytest.mark.parametrize(
    "target",
    [
        _extra_defaulted,
        _star_args,
        _Callable(),
        _CallableWithDefaults(),
        lambda ctx, input, **kw: input,
    ],
)
def test_signatures_that_can_take_ctx_and_input_load(target: object) -> None:
    assert Handler("mod:handler", target).call(None, 7) == 7


@pytest.mark.parametrize("bad", [[3, 4], "3,4", 7, None])
def test_typed_input_that_is_not_a_mapping_says_so(bad: object) -> None:
    # [3, 4] for Point(x, y) read "invalid value for type, expected int @ input.x"
    with pytest.raises(ValidationError) as info:
        load_handler("sample:typed").call(None, bad)
    message = info.value.message
    assert "expected int" not in message, message
    assert f"a mapping of Point's fields, got {type(bad).__name__}" in message, message
    assert info.value.field == "input"


async def test_async_and_sync_functions() -> None:
    echo = load_handler("sample:echo")
    add = load_handler("sample:add")
    assert echo.is_async and not add.is_async
    assert await echo.call(None, {"x": 1}) == {"x": 1}
    assert add.call(None, {"a": 2, "b": 5}) == 7
    assert echo.warmup() is None and echo.describe() is None


async def test_class_with_execute_warmup_and_describe() -> None:
    handler = load_handler("sample:Counter")
    assert handler.is_async
    assert handler.describe() == {"summary": "counts calls"}
    assert await handler.call(None, None) == {"calls": 1, "warm": False}
    handler.warmup()
    assert await handler.call(None, None) == {"calls": 2, "warm": True}


def test_typed_input_is_structured_and_output_unstructured() -> None:
    handler = load_handler("sample:typed")
    output = handler.call(None, {"x": 3, "y": 4})
    assert type(output).__name__ == "Norm"
    assert handler.plain_output(output) == {"squared": 25}
    assert handler.plain_output({"already": "plain"}) == {"already": "plain"}


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"x": 3, "y": "four"}, "input.y"),
        ({"x": 3}, "input.y"),
        ({"x": [], "y": 1}, "input.x"),
    ],
)
def test_typed_input_mismatch_is_a_validation_error_naming_the_field(
    bad: object, field: str
) -> None:
    handler = load_handler("sample:typed")
    with pytest.raises(ValidationError) as info:
        handler.call(None, bad)
    err = info.value
    assert err.code == "VALIDATION_ERROR"
    assert err.field == field
    assert field in err.message and "Point" in err.message
