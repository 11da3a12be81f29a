"""The worker runtime's reading thread, driven frame by frame over a socketpair.

A ``Worker`` of a child process reads on one thread and runs a short sync handler right there
(see ``Worker._lead``); these tests run that loop on a thread of the test process, with its
exit turned into an exception so that closing the socket ends the thread, not the process.
The worker's leftovers check is turned off here: in a worker it kills every descendant of
its process, which here would be the test process's (its other tests' children).
test_worker_leftovers.py tests it in real children.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

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

    def fields(
        self, handler: str, input: Any, *, linger: float = 0.0, entry: str | None = None
    ) -> dict[str, Any]:
        """An ``execute``'s fields, with an execution id of its own."""
        target = self.registry.resolve(P, handler)
        self.ids += 1
        return {
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

    def execute(
        self, handler: str, input: Any, *, linger: float = 0.0, entry: str | None = None
    ) -> dict[str, Any]:
        self.sock.sendall(
            encode("execute", self.fields(handler, input, linger=linger, entry=entry))
        )
        return self.frames(1)[-1]

    def ping(self, seq: int) -> dict[str, Any]:
        """Send a ``ping`` and return its ``pong`` (frames read meanwhile are dropped)."""
        self.sock.sendall(encode("ping", {"seq": seq}))
        while True:
            for tag, message in self.decoder:
                if tag == "pong":
                    return message
            self.sock.settimeout(10)
            self.decoder.feed(self.sock.recv(65536))

    def frames(self, answers: int) -> list[dict[str, Any]]:
        """Every frame read until ``answers`` results or errors came, each with its tag
        and the time it was read."""
        frames: list[dict[str, Any]] = []
        while True:
            for tag, message in self.decoder:
                frames.append({"tag": tag, "read_at": time.monotonic(), **message})
                answers -= tag in ("result", "error")
                if not answers:
                    return frames
            self.sock.settimeout(10)
            self.decoder.feed(self.sock.recv(65536))


def wait_for_reader(worker: Worker) -> None:
    """Until a thread of ``worker`` reads its socket (10 s at most)."""
    deadline = time.monotonic() + 10
    while worker._leader is None and time.monotonic() < deadline:
        time.sleep(0.001)


@contextmanager
def reading_worker(
    registry: PluginRegistry, *, loop_here: bool = False
) -> Iterator[tuple[Worker, Driver]]:
    host, child = socket.socketpair()
    worker = Worker(child.fileno(), close=child.close, loop_here=loop_here)

    def end(_code: int) -> None:
        raise _Ended

    worker._exit = end  # type: ignore[method-assign]
    ended = threading.Event()
    read = worker._lead

    def lead() -> None:
        # Whichever thread reads when the host goes: this one, or an executor thread that
        # took over reading from a handler that ran long (see Worker._stop_leading).
        # A one-shot child's loop reads too (see Worker._run_loop_here): _Ended comes out of
        # trio.run in the loop's nursery's group.
        try:
            read()
        except* _Ended:
            ended.set()

    worker._lead = lead  # type: ignore[method-assign]
    no_children = mock.patch("plugin_execution.worker.execution.has_children", return_value=False)
    with no_children as checked:
        threading.Thread(target=lead, daemon=True).start()
        try:
            yield worker, Driver(registry, host)
        finally:
            host.close()
            assert ended.wait(10), "no reading thread ended at EOF"
            worker._threads.stop()  # the trio loop too, if an async handler started it
            child.close()
    assert checked.called, "the worker no longer checks for leftovers after an execution"


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


def test_a_batch_answers_each_member_in_turn_whatever_its_handler(
    registry: PluginRegistry,
) -> None:
    with reading_worker(registry) as (_worker, driver):
        for handler in ("events_sync", "fail_sync", "whoami"):  # loaded before the batch
            driver.execute(handler, {"count": 0})
        members = [
            driver.fields("add", {"a": 1, "b": 1}),  # loads the handler: the general path
            driver.fields("add", {"a": 2, "b": 2}),  # loaded and sync: the short path
            driver.fields("events_sync", {"count": 2}),
            driver.fields("fail_sync", None),
            driver.fields("echo", "async"),  # async: run on the loop, waited for
            driver.fields("sleep_sync", {"seconds": 0.5}),
            driver.fields("whoami", None),
            driver.fields("add", {"a": 3, "b": 3}),  # cancelled before its turn
            driver.fields("add", {"a": 4, "b": 4}),
        ]
        ids = [member["execution_id"] for member in members]
        driver.sock.sendall(encode("batch", {"executes": members, "linger": 0.0}))
        driver.sock.sendall(encode("cancel", {"execution_id": ids[7], "reason": "test"}))
        frames = driver.frames(len(members))
    answers = [f for f in frames if f["tag"] in ("result", "error")]
    # The cancelled member is answered when the cancel is read: while the sleeping member
    # runs, by the thread that took over reading from it. Every other member in order.
    order = [*ids[:5], ids[7], ids[5], ids[6], ids[8]]
    assert [a["execution_id"] for a in answers] == order
    by_id = {a["execution_id"]: a for a in answers}
    assert [by_id[i].get("output") for i in (ids[0], ids[1], ids[2], ids[4], ids[8])] == [
        2,
        4,
        2,
        "async",
        8,
    ]
    assert by_id[ids[3]]["error"]["code"] == "HANDLER_ERROR"
    assert by_id[ids[7]]["error"]["code"] == "ABORTED"
    assert by_id[ids[6]]["output"]["execution_id"] == ids[6]  # each member its own context
    assert by_id[ids[1]]["metadata"]["warm"] is True
    # A member's events come before its answer, after the answer of the one before.
    events = [f for f in frames if f["tag"] == "event"]
    assert [e["execution_id"] for e in events] == [ids[2], ids[2]]
    assert frames.index(events[0]) > frames.index(by_id[ids[1]])
    assert frames.index(events[-1]) < frames.index(by_id[ids[2]])
    # Each answer is written when its member ends, not when the batch does: the one before
    # the sleeping member was read half a second before the sleeping member's.
    assert by_id[ids[5]]["read_at"] - by_id[ids[4]]["read_at"] >= 0.4


def test_a_context_made_by_position_is_the_one_made_by_keyword() -> None:
    from plugin_execution.context import NULL_SINK, ExecutionContext

    def provide() -> Any:
        return None

    args = ("e1", "p", "h", {"trace": "t"}, NULL_SINK, provide, None, True)
    by_keyword = ExecutionContext(
        execution_id="e1",
        plugin_id="p",
        handler_id="h",
        context={"trace": "t"},
        sink=NULL_SINK,
        workspace=provide,
        platform=None,
        blocking=True,
    )
    by_position = ExecutionContext._positional(*args)
    for name in ExecutionContext.__slots__:  # every slot set, to the same value
        assert getattr(by_position, name) == getattr(by_keyword, name), name


def start_sleeping(driver: Driver) -> dict[str, Any]:
    """Start a 30 s async ``sleep``; a ``ping`` is answered while it runs. Its fields."""
    sleeping = driver.fields("sleep", {"seconds": 30.0})
    driver.sock.sendall(encode("execute", sleeping))
    pong = driver.ping(7)
    assert pong["seq"] == 7 and pong["in_flight"] == 1
    return sleeping


def serve_beside_then_cancel(driver: Driver, sleeping: dict[str, Any]) -> None:
    """While ``sleeping`` runs an async handler is served beside it; a ``cancel`` ends it
    ABORTED; then a sync handler is served."""
    assert driver.execute("echo", "async")["output"] == "async"
    cancel = {"execution_id": sleeping["execution_id"], "reason": "test"}
    driver.sock.sendall(encode("cancel", cancel))
    answer = driver.frames(1)[-1]
    assert answer["execution_id"] == sleeping["execution_id"]
    assert answer["error"]["code"] == "ABORTED"
    assert driver.execute("add", {"a": 2, "b": 3})["output"] == 5


def test_async_handlers_run_on_a_loop_of_their_own_while_the_reader_reads(
    registry: PluginRegistry,
) -> None:
    """Async handlers run on the worker's trio loop, a thread of its own (not the reading
    thread, but in a one-shot child: see the next test); the reader stays the reader: a
    ``ping`` is answered and a ``cancel`` read while they run, and sync handlers still run
    on it."""
    import sys
    import traceback

    with reading_worker(registry) as (worker, driver):
        wait_for_reader(worker)
        reader = worker._leader
        assert reader is not None
        sleeping = start_sleeping(driver)
        assert worker._leader == reader
        stack = traceback.extract_stack(sys._current_frames()[reader])
        assert not any(frame.filename.endswith("_core/_run.py") for frame in stack)  # no loop
        serve_beside_then_cancel(driver, sleeping)
        assert worker._leader == reader


def test_a_one_shot_childs_first_async_handler_runs_its_loop_on_the_reading_thread(
    registry: PluginRegistry,
) -> None:
    """``loop_here`` (a child forked ahead by the subprocess backend): the reader that
    dispatches the first async execution runs the trio loop itself (the handler waits for no
    new thread) and the loop reads the socket from then on (no thread starts for it): a
    ``ping`` is answered and a ``cancel`` read while async handlers run on that loop, and
    sync handlers still run (on an executor thread)."""
    import sys
    import traceback

    with reading_worker(registry, loop_here=True) as (worker, driver):
        wait_for_reader(worker)
        first_reader = worker._leader
        assert first_reader is not None
        sleeping = start_sleeping(driver)
        assert worker._leader is None  # no thread reads now: the loop does
        stack = traceback.extract_stack(sys._current_frames()[first_reader])
        assert "run_here" in [frame.name for frame in stack]  # the loop runs on the first
        serve_beside_then_cancel(driver, sleeping)
