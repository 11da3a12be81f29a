"""WorkerProcess: one long-lived worker child driven over the protocol, below any backend."""

from __future__ import annotations

import os
import signal

import trio

from plugin_execution.errors import WorkerCrashedError
from plugin_execution.process import open_worker_process


async def test_handshake_and_ping_report_real_figures() -> None:
    async with open_worker_process() as worker:
        pong = await worker.ping()
        assert pong.rss_bytes > 5 * 1024 * 1024  # a real interpreter, measured in the child
        assert pong.uptime_s >= 0 and pong.in_flight == 0
        assert worker.pid != os.getpid()
    assert worker.process.returncode == 0  # asked to shut down, it exited cleanly


async def test_a_bad_frame_kills_the_worker_with_a_clear_reason() -> None:
    async with open_worker_process() as worker:
        await worker._stream.send_all(b"\x00\x00\x00\x03\xc1\xc1\xc1")  # msgpack's unused byte
        with trio.fail_after(30):
            await worker.lost.wait()
        crash = worker.crash_error()
    assert isinstance(crash, WorkerCrashedError)
    assert crash.details["exit_code"] == 76
    assert "bad frame from the host" in crash.details["stderr_tail"]


async def test_killed_from_outside_is_a_crash_with_the_signal() -> None:
    async with open_worker_process() as worker:
        os.kill(worker.pid, signal.SIGKILL)
        with trio.fail_after(30):
            await worker.lost.wait()
        crash = worker.crash_error()
    assert isinstance(crash, WorkerCrashedError)
    assert crash.details["signal"] == signal.SIGKILL


async def test_the_worker_exits_when_the_host_goes_away() -> None:
    async with open_worker_process() as worker:
        await worker._stream.send_eof()  # the worker reads EOF, as when its host has died
        with trio.fail_after(30):
            await worker.process.wait()
    assert worker.process.returncode == 0
