"""The CLI says only what it promises: ``run`` keeps stdout for JSON, shows events when asked,
``plugins`` shows what each handler may do, ``doctor`` explains its columns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PLUGINS = Path(__file__).parent / "plugins"

CHATTY = f"""
id = "tests.chatty"
version = "1"
root = "{PLUGINS}"

[handlers.shout]
entry = "chatty:shout"

[handlers.shout_async]
entry = "chatty:shout_async"

[handlers.escapes]
entry = "chatty:escapes"

[handlers.limited]
entry = "chatty:shout"
permissions = {{ platform = ["cache"], quotas = {{ timeout = 5 }} }}
"""


def spawn(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "plugin_execution", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def chatty(tmp_path: Path) -> str:
    manifest = tmp_path / "plugin.toml"
    manifest.write_text(CHATTY)
    return str(manifest)


@pytest.mark.parametrize("backend", ["in-process", "worker-pool", "subprocess"])
@pytest.mark.parametrize("handler", ["shout", "shout_async"])
def test_run_keeps_stdout_for_json(chatty: str, backend: str, handler: str) -> None:
    for events in ([], ["--events"]):
        proc = spawn(
            "run", "tests.chatty", handler, "--plugin-path", chatty, "--backend", backend, *events
        )
        assert proc.returncode == 0, proc.stderr
        answer = json.loads(proc.stdout)  # the whole of stdout is one JSON document
        assert answer["ok"] is True
        assert answer["output"] == ("done" if handler == "shout" else {})  # --input: {}
        if events or backend == "in-process":
            # In this process a print goes to stderr; a worker's prints are log events.
            assert "a print from" in proc.stderr


def test_run_events_shows_progress_and_custom_events_on_stderr() -> None:
    proc = spawn("run", "examples.hello", "countdown", "--input", '{"from": 2}', "--events")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["output"] == "liftoff"
    lines = proc.stderr.splitlines()
    assert lines == [
        "[progress] 1/2",
        '[tick] {"remaining": 1}',
        "[progress] 2/2",
        '[tick] {"remaining": 0}',
    ]


def test_run_failure_is_still_pure_json(chatty: str) -> None:
    proc = spawn("run", "tests.chatty", "missing", "--plugin-path", chatty)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"]["code"] == "HANDLER_NOT_FOUND"


def test_plugins_shows_effective_permissions_per_handler(chatty: str) -> None:
    proc = spawn("plugins", "--plugin-path", chatty, "--json")
    assert proc.returncode == 0, proc.stderr
    plugin = next(p for p in json.loads(proc.stdout)["plugins"] if p["id"] == "tests.chatty")
    handlers = {h["id"]: h for h in plugin["handlers"]}
    assert handlers["shout"]["permissions_overridden"] is False
    assert handlers["shout"]["permissions"]["platform"] == []
    assert handlers["limited"]["permissions_overridden"] is True
    assert handlers["limited"]["permissions"]["platform"] == ["cache"]
    assert handlers["limited"]["permissions"]["quotas"]["timeout"] == 5

    text = spawn("plugins", "--plugin-path", chatty).stdout
    block = text[text.index("tests.chatty") :]
    assert "may: nothing beyond the defaults (the plugin's permissions)" in block
    assert "may: platform=cache; quotas.timeout=5.0 (its own permissions)" in block


def test_doctor_explains_its_columns() -> None:
    proc = spawn("doctor")
    assert "yes: the layer works on this machine; NO: it does not" in proc.stdout
    assert "[" not in proc.stdout.split("\n", 1)[1]  # no bare [7]: versions are named


@pytest.mark.parametrize("backend", ["worker-pool", "subprocess"])
def test_run_events_never_pass_a_plugins_control_characters_to_the_terminal(
    chatty: str, backend: str
) -> None:
    """A plugin's prints and log lines are shown on the operator's terminal by ``--events``:
    its escape sequences (title, screen, colours, clipboard) are shown as escapes, never
    sent to the terminal as they are."""
    proc = spawn(
        "run", "tests.chatty", "escapes", "--plugin-path", chatty, "--backend", backend, "--events"
    )
    assert proc.returncode == 0, proc.stderr
    assert "printed" in proc.stderr and "logged" in proc.stderr
    assert not any(c in proc.stderr for c in "\x1b\x07\u009b"), repr(proc.stderr)
    assert "\\x1b]0;pwned" in proc.stderr  # visible, as an escape
