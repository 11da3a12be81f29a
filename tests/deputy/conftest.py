"""The deputy suite's backends: every backend where the host does file, storage and HTTP
work for a plugin, the subprocess one sandboxed with each start method."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from plugin_execution import (
    ExecutionBackend,
    ExecutionRequest,
    PluginRegistry,
    WorkspaceManager,
    create_execution_backend,
)
from plugin_execution.platform import Platform

PLUGINS = Path(__file__).parents[1] / "plugins"
DEPUTY_HANDLERS = (
    "swap_read",
    "swap_write",
    "read_fifo",
    "fs_call",
    "storage_call",
    "fetch_call",
    "link_then_write",
)
BACKENDS: dict[str, dict[str, Any]] = {
    "in-process": {"type": "in-process"},
    "worker-pool": {"type": "worker-pool", "min_workers": 1, "max_workers": 2},
    "sandboxed-pool": {"type": "worker-pool", "sandbox": True, "max_workers": 2},
    "spawn": {"type": "subprocess", "start_method": "spawn", "cancel_grace": 0.3},
    "zygote": {"type": "subprocess", "start_method": "zygote", "cancel_grace": 0.3},
}

#: The backends whose plugins run in a kernel sandbox (a test of what the sandbox stops).
SANDBOXED = ["sandboxed-pool", "spawn", "zygote"]


def register(registry: PluginRegistry, plugin_id: str, **permissions: Any) -> None:
    registry.register(
        {
            "id": plugin_id,
            "root": str(PLUGINS),
            "handlers": [
                {"id": name, "entry": f"confused_deputy:{name}"} for name in DEPUTY_HANDLERS
            ],
            "permissions": {"quotas": {"timeout": 60}, **permissions},
        },
        replace=True,
    )


@pytest.fixture
def deputies() -> PluginRegistry:
    registry = PluginRegistry()
    register(registry, "deputy")
    register(registry, "bystander", platform=["storage"])
    return registry


@pytest.fixture
async def platform(tmp_path: Path) -> AsyncIterator[Platform]:
    async with Platform(storage_root=tmp_path / "storage") as platform:
        yield platform


@pytest.fixture(params=list(BACKENDS))
async def backend(
    request: pytest.FixtureRequest,
    deputies: PluginRegistry,
    workspaces: WorkspaceManager,
    platform: Platform,
) -> AsyncIterator[ExecutionBackend]:
    async with create_execution_backend(
        registry=deputies, workspace=workspaces, platform=platform, **BACKENDS[request.param]
    ) as backend:
        yield backend


async def run(
    backend: ExecutionBackend,
    handler: str,
    input: Any,
    *,
    plugin: str = "deputy",
    timeout: float = 60,
) -> Any:
    """The handler's output (it reports its attempts; it must not fail itself)."""
    result = await backend.execute(
        ExecutionRequest(plugin_id=plugin, handler_id=handler, input=input), timeout=timeout
    )
    return result.output
