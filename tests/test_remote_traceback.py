"""A ``HANDLER_ERROR``'s ``remote_traceback`` starts at the plugin's own code (issue 18).

The frames of the runtime that called the handler (the backend, the worker runtime, the
handler wrapper) come first in a raw traceback and say nothing to a plugin author: they are
cut, and a first line counts them. What the plugin called into (the standard library, the
runtime's own helpers) stays, and a traceback with no plugin frame is kept whole. Checked on
every backend, and through the CLI.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from plugin_execution import (
    ExecutionRequest,
    PluginRegistry,
    WorkspaceManager,
    create_execution_backend,
)
from plugin_execution.backends.base import ExecutionBackend
from plugin_execution.errors import MAX_TEXT_CHARS, ExecutionError

P = "tests.tb"
PLUGINS = Path(__file__).parent / "plugins"
ROOT = Path(__file__).parents[1]
NOTE = re.compile(r"\((\d+) frames? of the plugin-execution runtime omitted\)\n")
FRAME = re.compile(r'^[ |]*File "([^"]+)", line (\d+), in (\S+)$', re.MULTILINE)
OPTIONS: dict[str, dict[str, Any]] = {
    "in-process": {"type": "in-process"},
    "worker-pool": {"type": "worker-pool", "min_workers": 1, "max_workers": 1},
    "thread-pool": {"type": "worker-pool", "min_workers": 1, "max_workers": 1, "kind": "thread"},
    "subprocess": {"type": "subprocess"},
}


@pytest.fixture
def tb_registry(registry: PluginRegistry) -> PluginRegistry:
    handlers = {h: {"entry": f"tb_plugin:{h}"} for h in ("nested", "nested_sync", "bad_json")}
    for handler in ("runtime_call", "chained", "in_nursery"):
        handlers[handler] = {"entry": f"tb_plugin:{handler}"}
    # called as len(ctx, input): a builtin, whose signature is not checked at load
    handlers["no_plugin_frame"] = {"entry": "builtins:len"}
    handlers["sourceless"] = {"entry": "bad_errors:raise_sync"}
    registry.register({"id": P, "root": str(PLUGINS), "handlers": handlers})
    return registry


@pytest.fixture(params=sorted(OPTIONS))
async def backend(
    request: pytest.FixtureRequest, tb_registry: PluginRegistry, workspaces: WorkspaceManager
) -> AsyncIterator[ExecutionBackend]:
    async with create_execution_backend(
        registry=tb_registry, workspace=workspaces, **OPTIONS[request.param]
    ) as backend:
        yield backend


async def remote_traceback(backend: ExecutionBackend, handler: str, input: Any = None) -> str:
    result = await backend.execute(
        ExecutionRequest(plugin_id=P, handler_id=handler, input=input), raise_errors=False
    )
    assert isinstance(result.error, ExecutionError), result
    assert result.error.code == "HANDLER_ERROR", result.error
    text = result.error.details["remote_traceback"]
    assert isinstance(text, str) and len(text) <= MAX_TEXT_CHARS
    return text


def frames(text: str) -> list[tuple[str, int, str]]:
    """(file name, line, function) of each frame the traceback text lists, in order."""
    return [(Path(f).name, int(line), name) for f, line, name in FRAME.findall(text)]


def omitted(text: str) -> int:
    """How many runtime frames the first line says were cut (0: no such line)."""
    match = NOTE.match(text)
    return int(match.group(1)) if match else 0


def raising_line(marker: str) -> int:
    """The number of the line of ``tests/plugins/tb_plugin.py`` that holds ``marker``."""
    lines = (PLUGINS / "tb_plugin.py").read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if marker in line)


@pytest.mark.parametrize(("handler", "runtime_frames"), [("nested", 1), ("nested_sync", 2)])
async def test_the_traceback_starts_at_the_plugins_handler(
    backend: ExecutionBackend, handler: str, runtime_frames: int
) -> None:
    text = await remote_traceback(backend, handler, "x")
    # One frame calls an async handler (the backend's); a sync one has the handler wrapper too.
    assert omitted(text) == runtime_frames, text
    assert NOTE.sub("", text, count=1).startswith("Traceback (most recent call last):\n")
    assert frames(text) == [
        ("tb_plugin.py", raising_line(f"# {handler} calls"), handler),
        ("tb_plugin.py", raising_line('raise ValueError(f"nested'), "_check"),
    ], text
    assert 'raise ValueError(f"nested failure: {value!r}")' in text
    assert text.endswith("ValueError: nested failure: 'x'\n")
    for runtime_file in (
        "in_process.py",
        "runtime.py",
        "execution.py",
        "handlers.py",
        "in_thread.py",
    ):
        assert runtime_file not in text, text


async def test_frames_below_the_plugins_own_stay(backend: ExecutionBackend) -> None:
    """What the plugin called into is where the error arose: the standard library's frames
    after the plugin's, and the runtime's own (a ``ctx`` service, a helper) likewise."""
    text = await remote_traceback(backend, "bad_json")
    assert omitted(text) == 1
    listed = frames(text)
    assert listed[0] == ("tb_plugin.py", raising_line('return json.loads("{not json")'), "bad_json")
    assert [name for _, _, name in listed[1:]] == ["loads", "decode", "raw_decode"], text
    json_dir = str(Path(json.__file__).parent)
    assert all(f.startswith(json_dir) for f, _, _ in FRAME.findall(text)[1:]), text
    assert "json.decoder.JSONDecodeError: Expecting property name" in text

    text = await remote_traceback(backend, "runtime_call")
    assert omitted(text) == 1
    listed = frames(text)
    assert listed[0][0] == "tb_plugin.py" and listed[0][2] == "runtime_call"
    assert listed[1:] == [("errors.py", listed[1][1], "clip_text")], text
    assert text.endswith("TypeError: object of type 'NoneType' has no len()\n")


async def test_every_traceback_of_a_chain_or_group_starts_at_the_plugin(
    backend: ExecutionBackend,
) -> None:
    text = await remote_traceback(backend, "chained")
    assert omitted(text) == 1, text
    cause, outer = text.split("The above exception was the direct cause")
    assert frames(cause) == [("tb_plugin.py", raising_line("# the cause"), "chained")], text
    assert frames(outer) == [("tb_plugin.py", raising_line("# the outer"), "chained")], text

    text = await remote_traceback(backend, "in_nursery")
    assert omitted(text) == 1, text
    listed = frames(text)
    assert listed[0] == ("tb_plugin.py", raising_line("# the group"), "in_nursery"), text
    assert ("_run.py", listed[1][1], "__aexit__") == listed[1]  # trio's, after the plugin's
    assert listed[-2:] == [
        ("tb_plugin.py", raising_line('_check("child")'), "child"),
        ("tb_plugin.py", raising_line('raise ValueError(f"nested'), "_check"),
    ], text


async def test_a_traceback_without_plugin_frames_is_kept_whole(backend: ExecutionBackend) -> None:
    """``builtins:len`` as the entry fails at its call, in the runtime: nothing is the plugin's,
    so nothing is cut (an empty traceback would hide where it failed)."""
    text = await remote_traceback(backend, "no_plugin_frame", "{}")
    assert omitted(text) == 0 and text.startswith("Traceback (most recent call last):\n")
    assert frames(text)[-1][:1] == ("handlers.py",) and len(frames(text)) >= 2, text
    assert "TypeError: len() takes exactly one argument (2 given)" in text


async def test_a_traceback_the_traceback_module_cannot_format_is_trimmed_too(
    backend: ExecutionBackend,
) -> None:
    """The fallback listing (a frame's source lookup raises) cuts the same frames."""
    text = await remote_traceback(backend, "sourceless", {"case": "sourceless_frame"})
    assert omitted(text) == 2, text
    listed = frames(text)
    assert listed[0] == ("bad_errors.py", listed[0][1], "raise_sync"), text
    assert listed[-1] == ("sourceless.py", 2, "fail")
    assert "the traceback module failed on this exception: RuntimeError" in text


ARGS = ("--input", '"oops"', "--plugin-path", str(PLUGINS), "--backend")


def test_the_cli_prints_the_trimmed_traceback() -> None:
    """``run`` (default backend, and a worker process) puts it in its JSON error."""
    for backend in ("in-process", "subprocess"):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "plugin_execution",
                "run",
                "tests.sample",
                "fail",
                *ARGS,
                backend,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 1, proc.stderr
        details = json.loads(proc.stdout)["error"]["details"]
        text = details["remote_traceback"]
        assert omitted(text) == 1, text
        assert frames(text) == [("sample.py", frames(text)[0][1], "fail")], text
        assert 'raise ValueError(f"bad input: {input!r}")' in text
