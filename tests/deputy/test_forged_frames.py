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
#: An error a worker is served with (the forged one's frame, well formed): the next call.
SERVED = {"code": "HANDLER_ERROR", "message": "served"}


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
                {"id": "flood", "entry": "forger:flood"},
                {"id": "forge_result", "entry": "forger:forge_result"},
                {"id": "half_frame", "entry": "forger:half_frame"},
                {"id": "lose_socket", "entry": "forger:lose_socket"},
                {"id": "bomb", "entry": "forger:bomb"},
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
    registry.register(
        {
            "id": "forger.broker",
            "root": str(PLUGINS),
            "handlers": [{"id": "read_env", "entry": "forger:read_env"}],
            "permissions": {"env": {"read": ["FORGER_SECRET"]}},
        }
    )
    registry.register(
        {
            "id": "asker",
            "root": str(PLUGINS),
            "handlers": [{"id": "ask", "entry": "forger:ask"}],
            "permissions": {"invoke": {"allow": ["forger.broker"]}},
        }
    )
    registry.register(
        {
            "id": "victim",
            "root": str(PLUGINS),
            "handlers": [{"id": "genuine", "entry": "forger:genuine"}],
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


@pytest.mark.parametrize("backend", ["sandboxed-pool", "spawn"], indirect=True)
async def test_a_flood_of_frames_never_keeps_the_deadline_from_firing(
    backend: ExecutionBackend,
) -> None:
    """A worker that keeps its socket full (frames the host reads and drops, written faster
    than the host decodes them) must not keep the host reading forever: the host's other
    tasks, its deadlines among them, still run. The flood's own timeout fires (the worker is
    stopped), long before the flood would end by itself."""
    result = await backend.execute(
        ExecutionRequest(plugin_id="forger", handler_id="flood", input={"seconds": 8}),
        timeout=1,
        raise_errors=False,
    )
    assert result.error is not None and result.error.code == "TIMEOUT", result


@pytest.mark.parametrize("backend", ["sandboxed-pool", "spawn"], indirect=True)
async def test_a_forged_result_never_answers_another_plugins_execution(
    backend: ExecutionBackend,
) -> None:
    """The forger knows the id of ``victim``'s running execution and writes a result for it
    on its own worker's socket: the host takes answers on a worker's socket only for the
    executions it runs there, so the victim's caller gets the victim's own answer."""
    request = ExecutionRequest(plugin_id="victim", handler_id="genuine", input=None)
    async with backend.open_execution(request) as execution:
        async for event in execution.events:
            if event.kind == "started":
                break
        forger = await backend.execute(
            ExecutionRequest(
                plugin_id="forger",
                handler_id="forge_result",
                input={"for": request.execution_id},
            ),
            timeout=60,
        )
        assert forger.output == "sent"
        (Path(event.data["workspace"]) / "go").touch()
        result = await execution.result()
    assert result.output == "genuine", result


@pytest.mark.parametrize("backend", ["sandboxed-pool", "spawn"], indirect=True)
async def test_a_frame_begun_and_never_finished_still_times_out(
    backend: ExecutionBackend,
) -> None:
    """Slowloris on the pipe: a frame's length and one byte of it, then silence. The host
    waits for the rest no longer than the execution's deadline, and the next execution is
    served (by a new worker)."""
    result = await backend.execute(
        ExecutionRequest(plugin_id="forger", handler_id="half_frame", input={"size": 1 << 20}),
        timeout=0.5,
        raise_errors=False,
    )
    assert result.error is not None and result.error.code == "TIMEOUT", result
    assert (await forged_error(backend, SERVED)).code == "HANDLER_ERROR"


@pytest.mark.parametrize("backend", ["sandboxed-pool", "spawn"], indirect=True)
async def test_a_handler_that_puts_dev_null_over_its_socket_crashes_only_itself(
    backend: ExecutionBackend,
) -> None:
    """dup2 of /dev/null over the worker's socket: the host sees the connection end, the
    caller gets ``WORKER_CRASHED`` (never a result read from elsewhere), the next is served."""
    lost = await backend.execute(
        ExecutionRequest(plugin_id="forger", handler_id="lose_socket", input=None),
        timeout=60,
        raise_errors=False,
    )
    assert lost.error is not None and lost.error.code == "WORKER_CRASHED", lost
    assert (await forged_error(backend, SERVED)).code == "HANDLER_ERROR"


@pytest.mark.parametrize("backend", ["sandboxed-pool", "spawn"], indirect=True)
async def test_a_frame_of_tiny_values_never_decodes_to_many_times_its_size(
    backend: ExecutionBackend,
) -> None:
    """A msgpack bomb: a result of 3 Mi empty maps is a 3 MiB frame, well under the frame
    limit, but a dict of ~64 bytes each once decoded (a 64 MiB frame of them, ~4.6 GB of
    the host's memory and seconds of its event loop). The host decodes at most
    ``MAX_FRAME_VALUES`` values from one frame: past that, the frame is a protocol error
    and the worker is dropped."""
    result = await backend.execute(
        ExecutionRequest(plugin_id="forger", handler_id="bomb", input={"count": 3 << 20}),
        timeout=60,
        raise_errors=False,
    )
    assert result.error is not None and result.error.code == "WORKER_CRASHED", result
    assert "values" in result.error.message, result.error.message
    assert (await forged_error(backend, SERVED)).code == "HANDLER_ERROR"


@pytest.mark.parametrize("backend", ["sandboxed-pool", "spawn"], indirect=True)
async def test_an_invoked_plugin_runs_with_its_own_grants_never_its_callers(
    backend: ExecutionBackend,
) -> None:
    """The documented semantics of ``invoke.allow``: ``asker``, which may not read
    ``FORGER_SECRET`` but may invoke ``forger.broker``, which may, gets what the broker's
    handler returns (the grant to invoke is the operator's delegation), never the grant
    itself: its own read is still refused, and a plugin it may not invoke is refused. The
    other way round, an invoked plugin never gets its caller's grants:
    ``test_an_invoked_plugin_cannot_call_as_its_caller``."""
    result = await backend.execute(
        ExecutionRequest(
            plugin_id="asker",
            handler_id="ask",
            input={"plugin": "forger.broker", "name": "FORGER_SECRET"},
        ),
        timeout=60,
    )
    assert result.output == {"own": {"error": "PERMISSION_DENIED"}, "via": SECRET}, result
    thief = await backend.execute(
        ExecutionRequest(
            plugin_id="asker",
            handler_id="ask",
            input={"plugin": "forger.thief", "name": "FORGER_SECRET"},
        ),
        timeout=60,
    )
    assert thief.output["via"] == {"error": "PERMISSION_DENIED"}, thief  # not granted to asker
