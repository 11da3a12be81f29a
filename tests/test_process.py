"""WorkerProcess: one long-lived worker child driven over the protocol, below any backend."""

from __future__ import annotations

import os
import select
import signal
import time
from pathlib import Path

import pytest
import trio

from plugin_execution import ExecutionRequest, PluginRegistry
from plugin_execution.backends.base import Job
from plugin_execution.errors import ExecutionTimeoutError, WorkerCrashedError
from plugin_execution.host.process import open_worker_process
from plugin_execution.types import ExecutionEvent


async def test_handshake_and_ping_report_real_figures() -> None:
    async with open_worker_process() as worker:
        pong = await worker.ping()
        assert pong.rss_bytes > 5 * 1024 * 1024  # a real interpreter, measured in the child
        assert pong.uptime_s >= 0 and pong.in_flight == 0
        assert worker.pid != os.getpid()
    assert worker.process.returncode == 0  # asked to shut down, it exited cleanly


async def test_a_bad_frame_kills_the_worker_with_a_clear_reason() -> None:
    async with open_worker_process() as worker:
        await worker.connection.stream.send_all(
            b"\x00\x00\x00\x03\xc1\xc1\xc1"
        )  # msgpack's unused byte
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
        await worker.connection.stream.send_eof()  # the worker reads EOF, as when its host has died
        with trio.fail_after(30):
            await worker.process.wait()
    assert worker.process.returncode == 0


# -- executions: deadlines on one timer per worker ----------------------------------------

P = "tests.sample"


class Sink:
    """Where a job's events go: kept, for a look afterwards."""

    def __init__(self) -> None:
        self.events: list[ExecutionEvent] = []

    def deliver_nowait(self, event: ExecutionEvent) -> None:
        self.events.append(event)


def job(
    registry: PluginRegistry,
    handler: str,
    input: object = None,
    *,
    timeout: float = 30.0,
    **fields: object,
) -> Job:
    """A job as a backend makes one: the deadline counts from now, on the trio clock.
    ``fields``: more of the request's (an ``execution_id``)."""
    request = ExecutionRequest(plugin_id=P, handler_id=handler, input=input, **fields)  # type: ignore[arg-type]
    return Job(
        request,
        registry.resolve(P, handler),
        timeout,
        trio.current_time() + timeout,
        Sink(),
        time.perf_counter(),
    )


async def test_a_later_short_deadline_fires_before_an_earlier_long_one(
    registry: PluginRegistry,
) -> None:
    # The host's timer sleeps until the earliest deadline; a new, earlier one must wake it
    # sooner. The short execution is a sync handler: the worker cannot time it out itself
    # (an async one would be, by the worker's own deadline), so only the host's timer can
    # make it a timeout. It finishes by itself after 1.5 s, well within the grace: without
    # the timer it would succeed.
    async with open_worker_process() as worker:
        long = job(registry, "sleep", {"seconds": 60}, timeout=60)
        outcome: list[object] = []

        async def run_long() -> None:
            try:
                outcome.append(await worker.execute(long, backend="test", cancel_grace=5))
            except trio.Cancelled:
                outcome.append("cancelled")
                raise

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_long)
            with trio.fail_after(30):
                while worker.in_flight < 1:
                    await trio.sleep(0.01)
            await trio.sleep(0.3)  # the timer is armed for the long deadline by now
            start = trio.current_time()
            with trio.fail_after(30), pytest.raises(ExecutionTimeoutError) as info:
                await worker.execute(
                    job(registry, "sleep_sync", {"seconds": 1.5}, timeout=0.3),
                    backend="test",
                    cancel_grace=20,
                )
            elapsed = trio.current_time() - start
            # The host's verdict (the worker would have said how much time it had left).
            assert info.value.code == "TIMEOUT" and info.value.details["timeout_s"] == 0.3
            assert elapsed < 10  # long before the first execution's deadline (60 s)
            # The long one is untouched: still running, not expired, its worker alive.
            assert outcome == [] and worker.in_flight == 1
            assert not worker.calls._pending[long.request.execution_id].expired
            assert worker.alive
            nursery.cancel_scope.cancel()
        assert outcome == ["cancelled"]
        # Both handlers ended on their own or on Cancel: the worker was never killed.
        assert worker.alive and not worker.killed
        result = await worker.execute(job(registry, "add", {"a": 1, "b": 2}), backend="t")
        assert result.output == 3


async def test_deadlines_of_finished_executions_do_not_pile_up(registry: PluginRegistry) -> None:
    async with open_worker_process() as worker:
        for i in range(200):
            result = await worker.execute(job(registry, "echo", i), backend="test")
            assert result.output == i
            assert len(worker.calls.deadlines) <= 2 * 1 + 33  # one in flight at a time

        lanes = 4

        async def lane(n: int) -> None:
            for i in range(50):
                assert (await worker.execute(job(registry, "echo", [n, i]), backend="t")).ok
                assert len(worker.calls.deadlines) <= 2 * lanes + 33

        async with trio.open_nursery() as nursery:
            for n in range(lanes):
                nursery.start_soon(lane, n)
        assert len(worker.calls.deadlines) <= 2 * lanes + 33
        assert worker.executions == 400 and worker.in_flight == 0
        # The heap survived all that compaction: the host's timer still fires (a sync
        # handler: the worker does not time those out itself).
        with trio.fail_after(30), pytest.raises(ExecutionTimeoutError) as info:
            await worker.execute(
                job(registry, "sleep_sync", {"seconds": 1}, timeout=0.2),
                backend="test",
                cancel_grace=20,
            )
        assert info.value.details["timeout_s"] == 0.2
        assert worker.alive


async def test_a_finished_executions_deadline_spares_a_later_one_with_the_same_id(
    registry: PluginRegistry,
) -> None:
    # Running one request twice (a retry) reuses its execution id. The first run's deadline
    # stays in the heap after it finished; when it passes, it must not stop the second run.
    async with open_worker_process() as worker:
        # Warm first: on a loaded machine a cold worker's first call (the handler's import)
        # can take longer than the short timeout below, which is not what is tested here.
        await worker.execute(job(registry, "echo", 0), backend="test")
        first = job(registry, "echo", 1, timeout=1.0, execution_id="again")
        assert (await worker.execute(first, backend="test")).output == 1
        second = job(registry, "sleep", {"seconds": 2.0}, timeout=30, execution_id="again")
        try:
            with trio.fail_after(30):
                outcome: object = (await worker.execute(second, backend="test")).output
        except ExecutionTimeoutError as exc:
            outcome = exc
    assert outcome == "slept"


async def test_a_handler_that_ignores_cancel_is_killed_after_the_grace(
    registry: PluginRegistry,
) -> None:
    async with open_worker_process() as worker:
        start = trio.current_time()
        with trio.fail_after(30), pytest.raises(ExecutionTimeoutError) as info:
            await worker.execute(
                job(registry, "spin", timeout=0.3), backend="test", cancel_grace=0.5
            )
        elapsed = trio.current_time() - start
        assert info.value.code == "TIMEOUT" and info.value.details["timeout_s"] == 0.3
        assert 0.3 + 0.5 - 0.05 <= elapsed < 15  # the deadline, then the whole grace
        assert worker.killed
        with trio.fail_after(30):
            await worker.lost.wait()
        assert worker.crash_error().details["signal"] == signal.SIGKILL
        with pytest.raises(WorkerCrashedError):  # nothing more runs on it
            await worker.execute(job(registry, "echo", 1), backend="test")


async def test_a_death_is_seen_by_the_reader_while_a_straggler_holds_the_socket(
    registry: PluginRegistry, tmp_path: Path
) -> None:
    # The worker exits, but a child it forked keeps the socket open: no EOF comes, so the
    # caller parked on the socket must be woken when the worker is declared lost.
    fifo = tmp_path / "release"
    os.mkfifo(fifo)
    try:
        async with open_worker_process() as worker:
            with trio.fail_after(30), pytest.raises(WorkerCrashedError) as info:
                await worker.execute(
                    job(registry, "fork_straggler", {"fifo": str(fifo)}), backend="test"
                )
            assert info.value.details["exit_code"] == 3
            assert worker.lost.is_set()
    finally:
        _release(fifo)  # the straggler's open() of the fifo returns; it reads EOF and exits


def _release(fifo: Path) -> None:
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # ENXIO: nobody has it open for reading (the straggler is gone already)
        pass


async def test_spinning_for_a_reply_gets_it_and_backs_off_after_a_miss(
    registry: PluginRegistry,
) -> None:
    async with open_worker_process() as worker:
        # A quick handler's reply is picked up by polling, with or without luck: either way
        # the result is the result.
        for n in range(20):
            result = await worker.execute(job(registry, "echo", n), backend="test", spin=0.002)
            assert result.output == n
        # A slow handler outlasts the poll: the caller parks as usual and gets its result,
        # and the next polls are skipped (no CPU burnt waiting on a slow handler).
        worker.connection._spin_backoff = 0
        result = await worker.execute(
            job(registry, "sleep_sync", {"seconds": 0.2}), backend="test", spin=0.001
        )
        assert result.output is not None
        assert worker.connection._spin_backoff == 16
        await worker.execute(job(registry, "echo", 1), backend="test", spin=0.001)
        assert worker.connection._spin_backoff == 15
        # Nothing is polled while another task of the run is ready to run.
        worker.connection._spin_backoff = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 0)
            assert worker.connection._poll(time.perf_counter() + 0.001) is False  # the sleeper runs
            assert worker.connection._spin_backoff == 0  # and that is no miss


class OwnSocketReady:
    """A stand-in poll set that always reports one socket readable."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        return [(self.fd, select.POLLIN)]


async def test_polling_gives_way_when_a_peer_worker_answered(registry: PluginRegistry) -> None:
    """Workers sharing a poll set: a caller polling for one worker's answer stops as soon
    as another's is in (its caller is not kept waiting), without counting it a miss."""
    peers = select.poll()
    async with open_worker_process() as quiet, open_worker_process() as busy:
        quiet.spin_with(peers)
        busy.spin_with(peers)
        pending = busy.submit(job(registry, "echo", 1))
        with trio.fail_after(30):
            while not select.select([busy.connection.fd], [], [], 0)[0]:
                await trio.sleep(0.001)  # the answer is in busy's socket, unread
        started = time.perf_counter()
        assert quiet.connection._poll(started + 10) is True  # not ten seconds: at once
        assert time.perf_counter() - started < 5
        assert quiet.connection._spin_backoff == 0
        result = await busy.collect(pending, backend="test", sent_now=False)
        assert result.output == 1
        # Its own socket found ready by the peers' poll is no reason to give way (its answer
        # came between the read and the poll): it reads on, here until the time is up.
        quiet.spin_alone()
        quiet.connection._spin_peers = OwnSocketReady(quiet.connection.fd)  # type: ignore[assignment]
        assert quiet.connection._poll(time.perf_counter() + 0.01) is False
        assert quiet.connection._spin_backoff == 16
        quiet.connection._spin_peers = None
        quiet.spin_with(peers)
        quiet_fd = quiet.connection.fd
    # Leaving the poll set is part of closing: it never keeps an fd that may be reused.
    with pytest.raises(KeyError):
        peers.unregister(quiet_fd)
    with pytest.raises(KeyError):
        peers.unregister(busy.connection.fd)


async def test_an_answer_got_by_polling_yields_to_the_run_now_and_then(
    registry: PluginRegistry,
) -> None:
    """A reply picked up by polling costs no trip through the scheduler, except at least
    every _YIELD_EVERY: a caller in a loop never holds the run's thread for long."""
    steps = 0
    me = trio.lowlevel.current_task()

    class CountSteps(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            nonlocal steps
            steps += task is me

    counter = CountSteps()
    async with open_worker_process() as worker:
        await worker.execute(job(registry, "echo", 0), backend="test")  # handler imported
        trio.lowlevel.add_instrument(counter)
        try:
            worker.connection._spin_backoff = 0
            worker.connection._yielded_at = time.perf_counter() + 3600  # yielded "just now"
            result = await worker.execute(job(registry, "echo", 1), backend="test", spin=5)
            assert result.output == 1
            assert steps == 0  # polled, answered, returned: not once through the scheduler
            worker.connection._yielded_at = 0.0  # long ago
            result = await worker.execute(job(registry, "echo", 2), backend="test", spin=5)
            assert result.output == 2
            assert steps == 1  # the same, then one trip through the scheduler
        finally:
            trio.lowlevel.remove_instrument(counter)


async def test_a_frame_the_socket_takes_in_part_is_finished_by_the_collector(
    registry: PluginRegistry,
) -> None:
    """``submit`` writes what the kernel takes and keeps the send lock for the rest, which
    ``collect`` sends from another task; frames sent meanwhile wait for it, whole."""
    payload = os.urandom(16 << 20)  # far more than a socket buffer holds (4 MiB)
    async with open_worker_process() as worker:
        big = worker.submit(job(registry, "echo", payload))
        assert big.unsent is not None and big.unsent[1]  # begun, lock held for the rest
        async with trio.open_nursery() as nursery:
            pong: list[object] = []

            async def ping() -> None:
                pong.append(await worker.ping())

            nursery.start_soon(ping)  # must queue behind the half-sent frame
            await trio.sleep(0.05)
            assert not pong
            with trio.fail_after(30):
                result = await worker.collect(big, backend="test")
        assert result.output == payload and pong
        # The lock is free again: a plain round trip goes straight through.
        assert (await worker.execute(job(registry, "echo", 7), backend="test")).output == 7


async def test_collect_cancelled_before_the_rest_is_sent_still_sends_it_whole(
    registry: PluginRegistry,
) -> None:
    """A caller cancelled while its frame is half out finishes the frame (half a frame would
    end the worker), then stops the execution as any cancelled caller does."""
    payload = os.urandom(16 << 20)
    async with open_worker_process() as worker:
        pending = worker.submit(job(registry, "echo", payload))
        assert pending.unsent is not None
        with trio.CancelScope() as scope:
            scope.cancel()
            await worker.collect(pending, backend="test")
        assert scope.cancelled_caught
        # The worker read a whole frame and is still serving.
        assert (await worker.execute(job(registry, "echo", "ok"), backend="test")).output == "ok"
        assert worker.alive


async def test_an_answer_read_for_the_parked_reader_wakes_it(registry: PluginRegistry) -> None:
    """``read_for_reader`` (a channel pump polling right after it sent) may read the very
    answer the task parked on the socket waits for: it then cancels that park, and the
    reader returns with it. With no channel bridged, nobody parks cancellably and it reads
    nothing."""
    async with open_worker_process() as worker:
        worker.read_for_reader(0.001)  # no reader parked: a no-op
        worker.channels["c"] = None  # type: ignore[assignment]  # parks become cancellable
        try:
            pending = worker.submit(job(registry, "sleep_sync", {"seconds": 0.2}))
            outcome: list[object] = []

            async def collect() -> None:
                try:
                    outcome.append(await worker.collect(pending, backend="test"))
                except WorkerCrashedError as exc:
                    outcome.append(exc)

            with trio.fail_after(30):  # a reader left parked would hang here
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(collect)
                    while worker.connection._parked is None:
                        await trio.sleep(0.01)
                    # Read the answer here, in this task, the moment it comes.
                    while not pending.done:
                        worker.connection._spin_backoff = 0
                        worker.read_for_reader(0.05)
                        await trio.lowlevel.checkpoint()
            assert len(outcome) == 1 and outcome[0].output is not None  # type: ignore[attr-defined]
            # A worker lost while the reader is parked: its EOF wakes the reader too.
            pending = worker.submit(job(registry, "sleep_sync", {"seconds": 30}))
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(collect)
                    while worker.connection._parked is None:
                        await trio.sleep(0.01)
                    os.kill(worker.pid, signal.SIGKILL)
                    while worker.alive:
                        worker.connection._spin_backoff = 0
                        worker.read_for_reader(0.05)
                        await trio.sleep(0.01)
                    await worker.lost.wait()
            assert isinstance(outcome[1], WorkerCrashedError)
        finally:
            worker.channels.clear()


def test_a_channel_is_alone_when_no_other_sent_lately() -> None:
    """The test ChannelBridge.pump_in makes before polling for an answer."""
    from plugin_execution.host.connection import WorkerConnection

    proc = WorkerConnection.__new__(WorkerConnection)
    proc._channel_sends = [(float("-inf"), None)] * 2
    a, b = object(), object()
    assert proc.channel_sent(a, 0.0, 0.005)  # type: ignore[arg-type]
    assert proc.channel_sent(a, 0.001, 0.005)  # type: ignore[arg-type]  # itself only
    assert not proc.channel_sent(b, 0.002, 0.005)  # type: ignore[arg-type]  # a, 1 ms ago
    assert not proc.channel_sent(a, 0.003, 0.005)  # type: ignore[arg-type]  # b, 1 ms ago
    assert proc.channel_sent(a, 0.009, 0.005)  # type: ignore[arg-type]  # b, 7 ms ago


async def test_only_a_worker_of_its_own_process_is_polled_for_answers() -> None:
    """Polling for an answer holds the GIL a thread worker needs to produce it, and needs a
    second CPU for a process worker: neither polls otherwise (see WorkerConnection.spin_ok)."""
    from plugin_execution.host.thread import open_worker_thread

    async with open_worker_thread() as thread_worker:
        assert thread_worker.spin_ok is False
    async with open_worker_process() as process_worker:
        assert process_worker.spin_ok is (len(os.sched_getaffinity(0)) >= 2)


# -- a first request sent before the worker's Hello -------------------------------------


async def test_a_request_sent_before_hello_is_answered(registry: PluginRegistry) -> None:
    async with open_worker_process(handshake=False) as worker:
        assert not worker.greeted  # yielded at once: the child is still starting
        result = await worker.execute(job(registry, "echo", "early"), backend="test")
        assert result.output == "early"
        assert worker.greeted  # its Hello was read with the answer


async def test_a_worker_that_dies_before_hello_fails_the_request_sent_to_it(
    registry: PluginRegistry, tmp_path: Path
) -> None:
    # A child that cannot start: with one fd allowed it cannot import its runtime.
    from plugin_execution.host.limits import WorkerLimits

    limits = WorkerLimits(open_files=1)  # too few fds to run at all
    async with open_worker_process(handshake=False, limits=limits) as worker:
        with trio.fail_after(30), pytest.raises(WorkerCrashedError):
            await worker.execute(job(registry, "echo", 1), backend="test")
        assert not worker.greeted


async def test_a_worker_silent_past_its_start_timeout_is_killed(
    registry: PluginRegistry,
) -> None:
    from plugin_execution.host.process import serve_worker, worker_socketpair

    host, child = worker_socketpair()
    try:  # a child that holds the socket and never says Hello
        process = await trio.lowlevel.open_process(
            ["python3", "-I", "-c", "import time; time.sleep(60)"],
            pass_fds=(child.fileno(),),
            start_new_session=True,  # a group leader, killed with its group (the default)
        )
    finally:
        child.close()
    async with serve_worker(process, host, None, start_timeout=0.5, handshake=False) as worker:
        started = trio.current_time()
        with trio.fail_after(30), pytest.raises(WorkerCrashedError, match="did not start"):
            await worker.execute(job(registry, "echo", 1), backend="test")
        assert trio.current_time() - started < 10  # killed at its start timeout, not later
        assert worker.exit_cause == "killed"
    assert process.returncode == -signal.SIGKILL
