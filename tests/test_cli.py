"""The command line: ``run`` / ``plugins`` / ``demo``, their output and exit statuses.

The exit-status contract is checked in real interpreters (``python -m plugin_execution``);
finer details are checked by calling :func:`plugin_execution.cli.main` in this process.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import serve_process

from plugin_execution import cli
from plugin_execution.cli import _common
from plugin_execution.factory import BACKEND_TYPES
from plugin_execution.registry import PluginRegistry

ROOT = Path(__file__).parents[1]
PLUGINS = Path(__file__).parent / "plugins"
SAMPLE = ("--plugin-path", str(PLUGINS))


def spawn(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "plugin_execution", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def parse(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert "Traceback" not in proc.stderr, proc.stderr
    value: dict[str, Any] = json.loads(proc.stdout)
    return value


# -- in real interpreters ---------------------------------------------------------------------


def test_run_success() -> None:
    proc = spawn("run", "examples.hello", "greet", "--input", '{"name": "cli"}')
    assert proc.returncode == cli.EXIT_OK, proc.stderr
    result = parse(proc)
    assert result["ok"] is True
    assert result["output"]["greeting"] == "Hello, cli!"
    assert result["backend"] == "in-process"
    assert result["duration_s"] > 0
    assert len(result["execution_id"]) == 32
    assert set(result) == {
        "ok",
        "execution_id",
        "output",
        "duration_s",
        "backend",
        "worker_id",
        "metadata",
    }


def test_run_unknown_plugin() -> None:
    proc = spawn("run", "no.such.plugin", "run", "--input", "{}")
    assert proc.returncode == cli.EXIT_FAILED
    result = parse(proc)
    assert result["ok"] is False
    error = result["error"]
    assert error["code"] == "PLUGIN_NOT_FOUND"
    assert error["plugin_id"] == "no.such.plugin" and error["handler_id"] == "run"
    assert "no plugin 'no.such.plugin'" in error["message"]
    assert "examples.hello" in error["message"]  # what is known, to help the user
    assert error["execution_id"]


def test_run_handler_raising() -> None:
    proc = spawn("run", "tests.sample", "fail", "--input", '"oops"', *SAMPLE)
    assert proc.returncode == cli.EXIT_FAILED
    error = parse(proc)["error"]
    assert error["code"] == "HANDLER_ERROR"
    assert error["details"]["remote_type"] == "builtins.ValueError"
    assert "bad input: 'oops'" in error["message"]
    assert "raise ValueError" in error["details"]["remote_traceback"]


def test_run_timeout() -> None:
    started = time.monotonic()
    proc = spawn(
        "run", "tests.sample", "sleep", "--input", '{"seconds": 30}', "--timeout", "0.2", *SAMPLE
    )
    assert time.monotonic() - started < 20
    assert proc.returncode == cli.EXIT_FAILED
    error = parse(proc)["error"]
    assert error["code"] == "TIMEOUT"
    assert error["details"]["timeout_s"] == 0.2


@pytest.mark.parametrize("seconds", [2, 60])
def test_run_sync_timeout_says_the_thread_is_abandoned_and_waited_for(seconds: int) -> None:
    # A sync handler in-process cannot be stopped: the error says so, and so does the CLI
    # while it waits thread_grace (5 s) for the thread, which returns after 2 s, or not.
    started = time.monotonic()
    proc = spawn(
        "run",
        "tests.sample",
        "sleep_sync",
        "--input",
        json.dumps({"seconds": seconds}),
        "--timeout",
        "0.2",
        *SAMPLE,
    )
    assert proc.returncode == cli.EXIT_FAILED
    error = parse(proc)["error"]
    assert error["code"] == "TIMEOUT" and error["details"]["abandoned"] is True
    assert "the thread was abandoned and runs on until the handler returns" in error["message"]
    assert "waiting up to 5 s (thread_grace) for it to return" in proc.stderr
    gave_up = "exiting with the handler's thread still running" in proc.stderr
    assert gave_up == (seconds == 60)
    assert time.monotonic() - started < 50  # the thread did not hold the process open


def test_run_async_timeout_says_nothing_of_threads() -> None:
    proc = spawn(
        "run", "tests.sample", "sleep", "--input", '{"seconds": 30}', "--timeout", "0.2", *SAMPLE
    )
    error = parse(proc)["error"]
    assert error["message"] == "execution exceeded its 0.2 s timeout and was stopped"
    assert "thread" not in proc.stderr


def test_run_malformed_input_is_a_usage_error() -> None:
    proc = spawn("run", "examples.hello", "greet", "--input", "{name: 1}")
    assert proc.returncode == cli.EXIT_USAGE
    assert proc.stdout == ""
    assert "--input" in proc.stderr and "not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ctrl_c_cancels_cleanly(tmp_path: Path) -> None:
    (tmp_path / "plugin.toml").write_text(
        'id = "t.wait"\n[handlers.wait]\nentry = "pe_wait:wait"\n'
    )
    (tmp_path / "pe_wait.py").write_text(
        textwrap.dedent(
            """\
            import pathlib
            import trio

            async def wait(ctx, input):
                pathlib.Path(input).write_text("started")
                await trio.sleep(60)
            """
        )
    )
    ready = tmp_path / "ready"
    command = [sys.executable, "-m", "plugin_execution", "run", "t.wait", "wait"]
    command += ["--input", json.dumps(str(ready)), "--plugin-path", str(tmp_path)]
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the handler never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == cli.EXIT_INTERRUPTED
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert stdout == ""


def test_plugins_lists_installed_and_path_plugins() -> None:
    proc = spawn("plugins", *SAMPLE)
    assert proc.returncode == cli.EXIT_OK, proc.stdout + proc.stderr
    out = proc.stdout
    assert "examples.hello 1.0.0" in out
    assert "tests.sample 1.0.0" in out
    assert "plugin_execution.examples.hello:greet" in out
    assert "sample:sleep (timeout 0.5 s)" in out
    assert f"root: {PLUGINS.resolve()}" in out
    assert "failed to load" not in out


def test_demo_runs_every_available_backend() -> None:
    proc = spawn("demo", timeout=120)
    assert proc.returncode == cli.EXIT_OK, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["backend", "handler", "ok", "output", "ms", "worker"]
    rows = [line.split() for line in lines[1:] if line and "not available yet" not in line]
    ran = {row[0] for row in rows}
    unavailable = {line.split(":")[0] for line in lines if "not available yet" in line}
    assert "in-process" in ran
    # every backend type but the "auto" alias either ran or was reported as unavailable
    assert ran | unavailable == set(BACKEND_TYPES) - {"auto"}
    assert not ran & unavailable
    for backend in ran:
        handlers = {row[1]: row for row in rows if row[0] == backend}
        assert set(handlers) == {"greet", "wordcount", "fib", "countdown"}
        assert all(row[2] == "yes" for row in handlers.values()), proc.stdout
    assert any('"liftoff"' in line and "[" in line for line in lines)  # streamed events counted


# -- in this process --------------------------------------------------------------------------


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = cli.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_run_passes_context_with_host_cli(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(
        capsys, "run", "tests.sample", "whoami", "--input", "null", "--context", '{"tenant": "t1"}',
        *SAMPLE,
    )  # fmt: skip
    assert status == 0
    output = json.loads(out)["output"]
    assert output["context"] == {"host": "cli", "tenant": "t1"}
    assert (output["plugin_id"], output["handler_id"]) == ("tests.sample", "whoami")


def test_run_input_from_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO('{"a": 40, "b": 2}'))
    status, out, _ = run_main(capsys, "run", "tests.sample", "add", "--input", "-", *SAMPLE)
    assert status == 0 and json.loads(out)["output"] == 42


def test_run_bad_ids_are_an_invalid_request(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(capsys, "run", "bad id!", "run", "--input", "{}")
    assert status == cli.EXIT_FAILED
    error = json.loads(out)["error"]
    assert error["code"] == "INVALID_REQUEST" and "plugin_id" in error["message"]


def test_run_handler_not_found(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(
        capsys, "run", "tests.sample", "missing_module", "--input", "1", *SAMPLE
    )
    assert status == cli.EXIT_FAILED
    error = json.loads(out)["error"]
    assert error["code"] == "HANDLER_NOT_FOUND"
    assert error["details"]["entry"] == "no_such_module_here:run"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--context", "[1]"], "--context: must be a JSON object, got list"),
        (["--timeout", "0"], "--timeout: must be a positive number of seconds"),
        (["--timeout", "soon"], "--timeout: not a number of seconds"),
        (["--backend", "cloud"], "--backend: invalid choice: 'cloud'"),
    ],
)
def test_usage_errors(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "examples.hello", "greet", "--input", "{}", *args])
    assert info.value.code == cli.EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == "" and message in err


def test_run_input_defaults_to_an_empty_object(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(capsys, "run", "examples.hello", "greet")
    assert status == cli.EXIT_OK
    assert json.loads(out)["output"]["greeting"] == "Hello, world!"


def test_run_bad_plugin_path_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, out, err = run_main(
        capsys, "run", "x", "y", "--input", "{}", "--plugin-path", str(tmp_path / "nowhere")
    )
    assert status == cli.EXIT_USAGE
    assert out == ""
    assert err.startswith("plugin-execution: error: --plugin-path: no plugin manifest at ")


def test_plugin_path_overrides_an_installed_plugin(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "plugin.toml").write_text(
        'id = "examples.hello"\nversion = "9"\n[handlers.greet]\nentry = "sample:echo"\n'
    )
    status, out, _ = run_main(
        capsys, "run", "examples.hello", "greet", "--input", '{"echoed": true}',
        "--plugin-path", str(tmp_path),
    )  # fmt: skip
    assert status == 0 and json.loads(out)["output"] == {"echoed": True}


def test_plugins_json_reports_load_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "plugin.toml").write_text('id = "broken"\n[handlers.h]\nentry = "nope"\n')
    status, out, _ = run_main(capsys, "plugins", "--json", *SAMPLE, "--plugin-path", str(tmp_path))
    assert status == cli.EXIT_FAILED  # something failed to load
    listing = json.loads(out)
    by_id = {p["id"]: p for p in listing["plugins"]}
    assert {"examples.hello", "tests.sample"} <= set(by_id)
    sample = by_id["tests.sample"]
    assert sample["root"] == str(PLUGINS.resolve())
    quick = next(h for h in sample["handlers"] if h["id"] == "quick")
    assert (quick["entry"], quick["timeout"], quick["warmup"]) == ("sample:sleep", 0.5, False)
    assert sample["permissions"]["quotas"]["timeout"] == 60
    assert sample["channels"] == []
    [error] = listing["errors"]
    assert error["code"] == "INVALID_MANIFEST" and "'nope' is not a valid entry" in error["message"]


def test_plugins_text_lists_channels_and_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    good = tmp_path / "good"
    good.mkdir()
    (good / "plugin.toml").write_text(
        'id = "chatty"\n[[channels]]\npath = "/chat"\nentry = "chat:session"\n'
    )
    status, out, _ = run_main(
        capsys, "plugins", "--plugin-path", str(good), "--plugin-path", str(tmp_path / "none")
    )
    assert status == cli.EXIT_FAILED
    assert "channel  /chat  chat:session (session)" in out
    assert "1 plugin(s) failed to load:" in out and "no plugin manifest at" in out


def test_demo_selected_backend_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(capsys, "demo", "--backends", "in-process")
    assert status == 0
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [row[:3] for row in rows] == [
        ["in-process", "greet", "yes"],
        ["in-process", "wordcount", "yes"],
        ["in-process", "fib", "yes"],
        ["in-process", "countdown", "yes"],
    ]
    assert "6765" in out  # fib(20)


def test_demo_backends_comma_separated_as_bench_takes_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # bench takes --backends a,b; a user who wrote the same for demo got "invalid choice"
    status, out, _ = run_main(capsys, "demo", "--backends", "in-process,in-process")
    assert status == 0
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["in-process"] * 4
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["demo", "--backends", "in-process,nope"])
    assert info.value.code == 2
    assert "'nope'" in capsys.readouterr().err


def test_output_bytes_are_base64() -> None:
    assert json.loads(_common.dumps({"b": b"\x00\xff"})) == {"b": {"$base64": "AP8="}}


def test_errors_are_unwrapped_from_groups_and_unknown_ones_wrapped() -> None:
    from plugin_execution import HandlerError

    inner = HandlerError("boom")
    assert _common.as_execution_error(ExceptionGroup("g", [ExceptionGroup("h", [inner])])) is inner
    unknown = _common.as_execution_error(ExceptionGroup("g", [inner, OSError("disk")]))
    assert unknown.code == "UNKNOWN_ERROR" and "internal error" in unknown.message
    assert "OSError: disk" in unknown.details["traceback"]


# -- serve -----------------------------------------------------------------------------------


async def test_serve_lists_its_routes_and_serves_the_example_channels() -> None:
    import signal

    import trio
    from trio_websocket import open_websocket_url

    async with serve_process("--backend", "in-process") as (process, words):
        assert process.stderr is not None
        first = " ".join(words)
        assert first.startswith("serving 2 channel route(s) with the in-process backend: ws://")
        echo = next(word for word in words if word.endswith("/echo"))
        assert echo.endswith("/v1/ws/plugins/examples.chat/echo")
        async with open_websocket_url(echo) as ws:
            await ws.send_message("from the cli test")
            assert await ws.get_message() == "from the cli test"
        process.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            status = await process.wait()
        errors = await process.stderr.receive_some(65536)
        assert status == cli.EXIT_INTERRUPTED, errors
        assert b"Traceback" not in errors


def test_serve_without_channels_is_an_error(
    capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(PluginRegistry, "from_entry_points", classmethod(lambda cls: cls()))
    assert cli.main(["serve", "--port", "0"]) == cli.EXIT_FAILED
    assert "no discovered plugin declares a channel" in capsys.readouterr().err


def test_every_option_of_every_command_has_help() -> None:
    # `bench --help` listed --input, --context and --executions with no word on them
    import argparse

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bare = [
        f"{name} {action.option_strings[-1]}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if action.option_strings and not action.help
    ]
    assert bare == []


def test_input_from_an_empty_stdin_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # "--input -" with nothing piped read "not valid JSON (Expecting value: ...): "
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "tests.sample", "echo", "--input", "-", *SAMPLE])
    assert info.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "stdin was empty" in err and "Expecting value" not in err
