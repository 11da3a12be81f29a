"""The testing kit (plugin_execution.testing), used the way a plugin author would use it.

These tests are also the example plugin's own tests: they ask for the kit's fixtures, which
pytest finds through the package's ``pytest11`` entry point.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from plugin_execution import (
    ExecutionRequest,
    HandlerError,
    ManifestError,
    PermissionDeniedError,
    PluginRegistry,
)
from plugin_execution.testing import (
    DEFAULT_BACKENDS,
    RecordingPlatform,
    load_registry,
    run_handler,
)

PLUGINS = Path(__file__).parent / "plugins"

CALLER = {
    "id": "kit.caller",
    "version": "1",
    "root": str(PLUGINS),
    "permissions": {"platform": ["cache"]},
    "handlers": [{"id": "call", "entry": "platform_calls:call"}],
}


@pytest.mark.plugin_manifests("examples")
async def test_example_plugin_greets_on_every_backend(execution_backend) -> None:
    result = await execution_backend.execute(
        ExecutionRequest(plugin_id="examples.hello", handler_id="greet", input={"name": "kit"})
    )
    assert result.output["greeting"] == "Hello, kit!"
    assert result.backend == execution_backend.name


def test_execution_backend_runs_once_per_backend(request: pytest.FixtureRequest) -> None:
    """The fixture above was parametrised over the selected backends: by default all three,
    or those of ``--execution-backends``."""
    ids = {
        item.callspec.params["execution_backend"]
        for item in request.session.items
        if item.originalname == "test_example_plugin_greets_on_every_backend"
        and hasattr(item, "callspec")
    }
    if ids:  # absent when the run was filtered to this test alone
        option = request.config.getoption("--execution-backends")
        selected = set(option.split(",")) if option else set(DEFAULT_BACKENDS)
        assert ids == selected


@pytest.mark.plugin_manifests(CALLER)
@pytest.mark.execution_backends("in-process", "worker-pool")
async def test_recording_platform_sees_calls_from_any_backend(
    execution_backend, recording_platform: RecordingPlatform
) -> None:
    await execution_backend.execute(
        ExecutionRequest(
            plugin_id="kit.caller",
            handler_id="call",
            input={"service": "cache", "method": "set", "args": ["k", 1]},
        )
    )
    with pytest.raises(PermissionDeniedError):
        await execution_backend.execute(
            ExecutionRequest(
                plugin_id="kit.caller",
                handler_id="call",
                input={"service": "env", "method": "get", "args": ["HOME"]},
            )
        )
    assert recording_platform.names() == ["cache.set", "env.get"]
    first, denied = recording_platform.calls
    assert first.plugin_id == "kit.caller" and first.args == ("k", 1) and first.error is None
    assert isinstance(denied.error, PermissionDeniedError)


async def test_run_handler_in_one_line() -> None:
    result = await run_handler("examples", "examples.hello", "wordcount", {"text": "a b a"})
    assert result.output == {"a": 2, "b": 1}


async def test_run_handler_raises_or_reports_the_error() -> None:
    registry = load_registry(PLUGINS / "plugin.toml")
    with pytest.raises(HandlerError):
        await run_handler(registry, "tests.sample", "fail", {})
    result = await run_handler(
        registry, "tests.sample", "fail", {}, backend="worker-pool", raise_errors=False
    )
    assert not result.ok and result.error.code == "HANDLER_ERROR"


def test_load_registry_takes_paths_dicts_and_entry_points(tmp_path: Path) -> None:
    registry = load_registry(PLUGINS, CALLER, "examples-chat", base_dir=tmp_path)
    assert isinstance(registry, PluginRegistry)
    assert {m.id for m in registry} == {"tests.sample", "kit.caller", "examples.chat"}
    relative = load_registry("plugin.toml", base_dir=PLUGINS)
    assert [m.id for m in relative] == ["tests.sample"]


def test_load_registry_names_what_it_could_not_load(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no-such-plugin"):
        load_registry("no-such-plugin")
    with pytest.raises(ManifestError, match=r"no plugin\.toml"):
        load_registry(tmp_path / "missing.toml")
