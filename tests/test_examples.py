"""The programs in examples/ run, as a user would run them, and say what their docs say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


def run(name: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("backend", ["in-process", "worker-pool", "subprocess"])
def test_trio_host(backend: str) -> None:
    out = run("trio_host.py", "--backend", backend)
    assert out.startswith("Hello, trio!")
    assert "error HANDLER_NOT_FOUND" in out
    assert out.count("event progress") == 3
    assert out.rstrip().endswith("result: liftoff")


def test_ws_server_refuses_without_the_token_and_echoes_with_it() -> None:
    out = run("ws_server.py", "--self-test")
    assert "without a token: refused with 401" in out
    assert "with the token: echoed 'hello'" in out


def test_harness_counts_every_outcome() -> None:
    out = run("harness.py", "--executions", "200", "--concurrency", "8")
    assert "200 executions on worker-pool" in out
    assert "outcomes: ok 200" in out


def test_fastapi_app_executes_per_request_and_cancels_for_a_client_that_left() -> None:
    out = run("fastapi_app.py", "--self-test")
    assert "greet: Hello, asyncio! (worker-pool, another process)" in out
    assert "error: 404 HANDLER_NOT_FOUND" in out
    assert "stream: 3 ticks, then liftoff" in out
    assert "client gave up on fib: 1 execution aborted" in out
    assert "client left the fib stream: 2 executions aborted" in out
    assert "websocket: echoed 'hello'" in out
