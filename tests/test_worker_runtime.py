"""The worker runtime's reading thread, driven frame by frame over a socketpair.

A ``Worker`` of a child process reads on one thread and runs a short sync handler right there
(see ``Worker._lead``); these tests run that loop on a thread of the test process, with its
exit turned into an exception so that closing the socket ends the thread, not the process.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from plugin_execution import PluginRegistry
from plugin_execution.worker._wire import FrameDecoder, encode
from plugin_execution.worker.runtime import Worker

P = "tests.sample"


class _Ended(Exception):
    pass


class Driver:
    """The host's side: sends Execute frames, reads the answers."""

    def __init__(self, registry: PluginRegistry, sock: socket.socket) -> None:
        self.registry = registry
        self.sock = sock
        self.decoder = FrameDecoder()
        self.ids = 0

    def execute(
        self, handler: str, input: Any, *, linger: float = 0.0, entry: str | None = None
    ) -> dict[str, Any]:
        target = self.registry.resolve(P, handler)
        self.ids += 1
        fields = {
            "execution_id": f"e{self.ids}",
            "plugin_id": P,
            "handler_id": handler,
            "entry": target.entry if entry is None else entry,
            "root": target.root,
            "input": input,
            "context": {},
            "workspace": None,
            "timeout": 30.0,
            "warmup": False,
            "linger": linger,
        }
        self.sock.sendall(encode("execute", fields))
        while True:
            for tag, message in self.decoder:
                if tag in ("result", "error"):
                    return {"tag": tag, **message}
            self.sock.settimeout(10)
            self.decoder.feed(self.sock.recv(65536))


@contextmanager
def reading_worker(registry: PluginRegistry) -> Iterator[tuple[Worker, Driver]]:
    host, child = socket.socketpair()
    worker = Worker(child.fileno(), close=child.close)

    def end(_code: int) -> None:
        raise _Ended

    worker._exit = end  # type: ignore[method-assign]
    ended = threading.Event()

    def lead() -> None:
        try:
            worker._lead()
        except _Ended:
            pass
        finally:
            ended.set()

    threading.Thread(target=lead, daemon=True).start()
    try:
        yield worker, Driver(registry, host)
    finally:
        host.close()
        assert ended.wait(10), "the reading thread did not end at EOF"
        child.close()


def test_a_sync_handler_runs_on_the_reading_thread_and_lingers_when_asked(
    registry: PluginRegistry,
) -> None:
    with reading_worker(registry) as (worker, driver):
        result = driver.execute("whoami", None)
        assert result["tag"] == "result"
        reader = worker._leader
        assert reader is not None
        # Asked to linger, with no next request coming: it polls for the time asked, then
        # skips the next lingers (an idle worker soon just sleeps).
        assert driver.execute("whoami", None, linger=0.05)["tag"] == "result"
        deadline = time.monotonic() + 10
        while worker._linger_backoff != 16 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker._linger_backoff == 16
        assert driver.execute("whoami", None, linger=0.05)["tag"] == "result"
        deadline = time.monotonic() + 10
        while worker._linger_backoff != 15 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker._linger_backoff == 15
        # The same thread read every request: short handlers cost no hand-over.
        assert worker._leader == reader


def test_a_request_that_comes_while_the_worker_lingers_is_taken_at_once(
    registry: PluginRegistry,
) -> None:
    with reading_worker(registry) as (worker, driver):
        started = time.monotonic()
        for n in range(50):  # back to back, each asking to linger: no poll comes up empty
            assert driver.execute("add", {"a": n, "b": 1}, linger=1.0)["output"] == n + 1
        # Each request was taken as it came, not when the 1 s linger ran out (50 s).
        assert time.monotonic() - started < 10
        assert worker._linger_backoff == 0


def test_a_channel_session_whose_handler_cannot_be_loaded_leaves_no_channel_behind(
    registry: PluginRegistry,
) -> None:
    """``ch_open`` then an ``execute`` whose entry cannot be imported: the session is answered
    with an error and its channel leaves the worker's table (an open channel would keep the
    socket read on the trio loop for good); the next execution runs as before."""
    with reading_worker(registry) as (worker, driver):
        try:
            opened = {"execution_id": "e1", "path": "/ws", "headers": {}, "principal": None}
            driver.sock.sendall(encode("ch_open", {"channel_id": "c1", "window": 8, **opened}))
            answer = driver.execute("whoami", None, entry="tests.plugins.no_such_module:handler")
            assert answer["tag"] == "error", answer
            assert answer["execution_id"] == "e1"
            assert answer["error"]["code"] == "HANDLER_NOT_FOUND", answer
            assert worker._channels == {}
            assert worker._channel_of == {}
            assert driver.execute("add", {"a": 1, "b": 2})["output"] == 3
        finally:
            worker._threads.stop()  # the trio loop the channel started


async def test_an_abandoned_thread_handler_never_writes_to_a_reused_fd(
    registry: PluginRegistry,
) -> None:
    """A thread worker cannot be killed: at a timeout its socket is shut and the handler runs
    on, abandoned. When it finishes, its worker's fd is closed and its number may belong to
    another socket: the late result must go nowhere, not into that socket."""
    import trio

    from plugin_execution.backends.base import Job
    from plugin_execution.errors import ExecutionTimeoutError
    from plugin_execution.host.thread import open_worker_thread
    from plugin_execution.types import ExecutionRequest

    request = ExecutionRequest(plugin_id=P, handler_id="sleep_sync", input={"seconds": 0.5})
    job = Job(
        request,
        registry.resolve(P, "sleep_sync"),
        0.1,
        trio.current_time() + 0.1,
        None,  # type: ignore[arg-type]  # no events from this handler
        time.perf_counter(),
    )
    try:
        async with open_worker_thread(close_grace=0.1) as worker:
            await worker.execute(job, backend="test", cancel_grace=0.05)
    except ExecutionTimeoutError:
        pass
    # The worker's fds are closed now; new sockets take the lowest free numbers, theirs.
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        await trio.sleep(1.0)  # the handler ends meanwhile and tries to send its result
        for a, b in pairs:
            for end in (a, b):
                end.setblocking(False)
                try:
                    data = end.recv(65536)
                except BlockingIOError:
                    data = b""
                assert data == b"", f"a late frame landed in an unrelated socket: {data[:60]!r}"
    finally:
        for a, b in pairs:
            a.close()
            b.close()
