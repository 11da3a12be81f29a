"""Mistakes a new user makes, each answered with an error that says what, why and how to fix.

Found by using the project from its README and docs alone; each test is one thing a user hit
that used to end in a bare exception from deep inside (or a message that did not help).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from plugin_execution import (
    ExecutionRequest,
    InvalidRequestError,
    ManifestError,
    PluginRegistry,
    WorkspaceError,
    WorkspaceManager,
    create_execution_backend,
)
from plugin_execution.manifest import manifest_from_dict

P = "tests.sample"


@pytest.mark.parametrize(
    "request_", [{"plugin_id": P, "handler_id": "echo"}, (P, "echo"), "tests.sample/echo"]
)
async def test_execute_of_something_else_than_a_request(
    registry: PluginRegistry, workspaces: WorkspaceManager, request_: object
) -> None:
    async with create_execution_backend(
        type="in-process", registry=registry, workspace=workspaces
    ) as backend:
        with pytest.raises(InvalidRequestError, match="ExecutionRequest") as info:
            await backend.execute(request_)  # type: ignore[arg-type]
        assert type(request_).__name__ in info.value.message
        with pytest.raises(InvalidRequestError, match="ExecutionRequest"):
            async with backend.open_execution(request_):  # type: ignore[arg-type]
                pass  # pragma: no cover
        # Not a result even with raise_errors=False: there is no execution to report on.
        with pytest.raises(InvalidRequestError):
            await backend.execute(request_, raise_errors=False)  # type: ignore[arg-type]


def test_the_trio_backend_entered_from_asyncio(registry: PluginRegistry) -> None:
    async def main() -> None:
        async with create_execution_backend(type="in-process", registry=registry):
            pass  # pragma: no cover

    with pytest.raises(RuntimeError, match=r"plugin_execution\.asyncio\.create_execution_backend"):
        asyncio.run(main())


async def test_the_asyncio_backend_entered_from_trio(registry: PluginRegistry) -> None:
    from plugin_execution import asyncio as pe_asyncio

    backend = pe_asyncio.create_execution_backend(type="in-process", registry=registry)
    with pytest.raises(RuntimeError, match=r"plugin_execution\.create_execution_backend"):
        async with backend:
            pass  # pragma: no cover


@pytest.mark.parametrize(
    ("backend_type", "options", "expected"),
    [
        # a typo: the close match is suggested, and the options are listed
        (
            "worker-pool",
            {"max_worker": 3},
            r"unknown option 'max_worker'.*did you mean 'max_workers'\?",
        ),
        ("subprocess", {"memory": 512}, "unknown option 'memory'.*did you mean 'memory_mb'"),
        # an option of another backend: the user is told which one has it
        ("in-process", {"max_workers": 3}, "'max_workers'.*an option of the worker-pool backend"),
        # a value of the wrong type names the option, not an operator of the comparison
        ("worker-pool", {"max_workers": "4"}, "max_workers must be a number, got the str '4'"),
    ],
)
def test_bad_backend_options(
    registry: PluginRegistry, backend_type: str, options: dict[str, object], expected: str
) -> None:
    with pytest.raises(InvalidRequestError, match=expected) as info:
        create_execution_backend(type=backend_type, registry=registry, **options)
    assert "unexpected keyword argument" not in info.value.message
    assert "not supported between" not in info.value.message


def test_a_backend_type_typo_suggests_the_type(registry: PluginRegistry) -> None:
    with pytest.raises(InvalidRequestError, match="did you mean 'worker-pool'"):
        create_execution_backend(type="worker_pool", registry=registry)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"id": "a.b", "handlers": {"h": {"entry": "m:f", "timout": 5}}},
            r"unknown key 'timout' \(did you mean 'timeout'.*@ manifest\.handlers\[0\]",
        ),
        (
            {"id": "a.b", "handler": {"h": {"entry": "m:f"}}},
            r"unknown key 'handler' \(did you mean 'handlers'.*@ manifest",
        ),
        (
            {"id": "a.b", "permissions": {"platfrom": ["cache"]}},
            r"unknown key 'platfrom' \(did you mean 'platform'.*@ manifest\.permissions",
        ),
    ],
)
def test_a_misspelt_manifest_key_suggests_the_right_one(
    data: dict[str, object], expected: str
) -> None:
    with pytest.raises(ManifestError, match=expected) as info:
        manifest_from_dict(data)
    assert "Extra fields in constructor" not in info.value.message


async def test_an_unserializable_output_reads_the_same_on_every_backend(
    registry: PluginRegistry, workspaces: WorkspaceManager
) -> None:
    # The worker's said "(plain data only): WireError: cannot encode 'result': ...", naming
    # an internal message instead of what a handler may return.
    messages = []
    for backend_type, options in [("in-process", {}), ("worker-pool", {"min_workers": 1})]:
        async with create_execution_backend(
            type=backend_type, registry=registry, workspace=workspaces, **options
        ) as backend:
            request = ExecutionRequest(plugin_id=P, handler_id="unserializable")
            result = await backend.execute(request, raise_errors=False)
            assert result.error is not None and result.error.code == "INVALID_REQUEST"
            messages.append(result.error.message)
    assert messages[0] == messages[1]
    assert "dict, list, str, bytes" in messages[1] and "WireError" not in messages[1]


async def test_a_workspace_root_that_is_a_file(registry: PluginRegistry, tmp_path: Path) -> None:
    # read "cannot use ... as the workspace root: File exists"
    (tmp_path / "ws").write_text("")
    backend = create_execution_backend(
        type="in-process", registry=registry, workspace=tmp_path / "ws"
    )
    with pytest.raises(WorkspaceError, match="is not a directory") as info:
        async with backend:
            pass  # pragma: no cover
    assert "File exists" not in info.value.message
