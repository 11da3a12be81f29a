"""Frames a plugin writes itself on its worker's socket: the host takes from them no more
than it would from its own worker runtime. Mounted by tests/plugins/forger.py on the process
backends (the subprocess one sandboxed, both start methods, and the worker pool)."""

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
from plugin_execution.errors import MAX_MESSAGE_CHARS, MAX_TEXT_CHARS
from plugin_execution.protocol import MAX_ID_LENGTH
from plugin_execution.stats import _MAX_CODES

from .conftest import BACKENDS, SANDBOXED

PLUGINS = Path(__file__).parents[1] / "plugins"
#: The deputy suite's backends where a plugin runs in a process of its own.
PROCESS_BACKENDS = {name: options for name, options in BACKENDS.items() if name != "in-process"}
MiB = 1024 * 1024


SECRET = "the caller's secret"


@pytest.fixture
def forgers(monkeypatch: pytest.MonkeyPatch) -> PluginRegistry:
    monkeypatch.setenv("FORGER_SECRET", SECRET)
    registry = PluginRegistry()
    registry.register(
        {
            "id": "forger",
            "root": str(PLUGINS),
            "handlers": [
                {"id": "error", "entry": "forger:forge_error"},
                {"id": "invoke", "entry": "forger:invoke_forger"},
            ],
            "permissions": {"env": {"read": ["FORGER_SECRET"]}, "invoke": {"allow": ["forger.*"]}},
        }
    )
    registry.register(
        {
            "id": "forger.thief",
            "root": str(PLUGINS),
            "handlers": [{"id": "forge_call", "entry": "forger:forge_call"}],
        }
    )
    return registry


@pytest.fixture(params=list(PROCESS_BACKENDS))
async def backend(
    request: pytest.FixtureRequest, forgers: PluginRegistry, workspaces: WorkspaceManager
) -> AsyncIterator[ExecutionBackend]:
    async with create_execution_backend(
        registry=forgers, workspace=workspaces, **PROCESS_BACKENDS[request.param]
    ) as backend:
        yield backend


async def forged_error(backend: ExecutionBackend, error: dict[str, Any]) -> Any:
    result = await backend.execute(
        ExecutionRequest(plugin_id="forger", handler_id="error", input={"error": error}),
        timeout=60,
        raise_errors=False,
    )
    assert not result.ok
    return result.error


async def test_a_forged_error_is_bounded_like_the_runtimes_own(backend: ExecutionBackend) -> None:
    """The runtime cuts what a handler's error carries (16 KiB message, 64 KiB texts, about
    1 MiB of details); a plugin that writes its own error frame must not get more through."""
    error = await forged_error(
        backend,
        {
            "code": "HANDLER_ERROR",
            "message": "m" * (2 * MiB),
            "plugin_id": "p" * MiB,
            "handler_id": "h" * MiB,
            "execution_id": "e" * MiB,
            "details": {
                "remote_traceback": "t" * (2 * MiB),
                **{f"k{i}": "v" * 60_000 for i in range(60)},
                "deep": _nested(200),
            },
        },
    )
    assert error.code == "HANDLER_ERROR"
    assert len(error.message) <= MAX_MESSAGE_CHARS
    for name in ("plugin_id", "handler_id", "execution_id"):
        assert len(getattr(error, name)) <= MAX_ID_LENGTH, name
    assert len(error.details["remote_traceback"]) <= MAX_TEXT_CHARS
    assert len(repr(error.details)) < 2 * MiB


async def test_forged_error_codes_never_grow_the_hosts_stats(backend: ExecutionBackend) -> None:
    """Each execution ending with a new huge code must not leave the host holding it: codes
    are cut, and the distinct codes ``stats().failed_by_code`` keeps, and observers (the
    Prometheus metrics' labels) are given, are bounded."""
    outcomes: set[str] = set()
    backend.add_observer(lambda plugin, handler, outcome, duration: outcomes.add(outcome))
    # The stats keep _MAX_CODES distinct codes, and count the rest as UNKNOWN_ERROR: a few
    # more new codes than that show the bound.
    kept = _MAX_CODES + 1
    for i in range(kept + 7):
        error = await forged_error(backend, {"code": f"X{i}_" + "C" * 100_000, "message": "m"})
        assert len(error.code) <= 64
    failed = backend.stats().failed_by_code
    assert sum(failed.values()) == kept + 7
    assert len(failed) <= kept and sum(map(len, failed)) <= kept * 64, failed
    assert outcomes == set(failed), outcomes


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"d": value}
    return value


@pytest.mark.parametrize("backend", SANDBOXED, indirect=True)
async def test_an_invoked_plugin_cannot_call_as_its_caller(backend: ExecutionBackend) -> None:
    """``forger`` may read ``FORGER_SECRET`` and invokes ``forger.thief``, which may not, with
    its own execution id. The thief's platform calls made in the caller's name are refused:
    the caller does not run in the thief's process (a child of its own on the subprocess
    backend, a worker of its own plugin on the sandboxed pool). On the unsandboxed pool an
    invocation may run on its caller's worker, one process: the host cannot tell their
    frames apart (docs/permissions.md, "Threat model"): not run there."""
    result = await backend.execute(
        ExecutionRequest(plugin_id="forger", handler_id="invoke", input={"name": "FORGER_SECRET"}),
        timeout=60,
    )
    out = result.output
    assert out.get("value") != SECRET, out
    assert out["error"] == "ABORTED" and "not running here" in out["message"], out
