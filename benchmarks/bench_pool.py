"""Round trips through the worker pool, next to its peers and a raw socketpair floor.

All contenders run in one trio run, side by side, with the same number of worker processes
(``--workers``, default 2) and the same trivial work: ``_handlers.echo`` returns its input, so
the payload (a ``bytes`` object) goes to a worker process **and back** on every call.

- ``worker pool``: ``await pool.execute(ExecutionRequest(..., input=payload))`` on
  ``create_execution_backend(type="worker-pool", min_workers=N, max_workers=N)``, ``echo``
  registered as a handler by path. The request is built inside the timed call (it is part of
  what a caller pays); the figure is the call's ``output``.
- ``trio_parallel``: ``ctx.run_sync(echo, None, payload, limiter=CapacityLimiter(N))`` on a
  context from ``trio_parallel.open_worker_context()`` (closed, workers joined, at the end).
- ``anyio.to_process``: ``anyio.to_process.run_sync(echo, None, payload, limiter=...)`` called
  from trio (anyio runs on trio natively); anyio kills and reaps its workers when the run ends.
- ``ProcessPoolExecutor``: ``ProcessPoolExecutor(max_workers=N)`` ("spawn" context), driven
  from trio without a thread per call: ``submit()``, then a done-callback (run on the
  executor's own management thread) wakes the task through ``TrioToken.run_sync_soon``. That
  is cheaper than parking a thread in ``future.result()`` via ``trio.to_thread.run_sync``.
- ``socketpair floor``: N child processes (``python -I``), each on one end of a
  ``socket.socketpair()``, echoing length-prefixed frames (4-byte length + payload) with
  ``recv_into`` / ``sendall``; the parent drives them with trio sockets, one frame in flight
  per connection. With one caller that is the raw round trip; with C callers the callers
  share the N connections, so it is also the throughput of a minimal pool.
- ``floor, 1 CPU (pinned)`` / ``floor, 2 CPUs (pinned)`` (latency only): one more floor child,
  pinned to the first CPU or to the second, timed while the trio thread is pinned to the
  first. A one-caller ping-pong costs about half as much when the scheduler puts both
  processes on one CPU (no cross-CPU wake-up), and where it puts them changes from run to run
  (the unpinned floor moves between ~20 and ~45 us on 2 vCPUs); these two rows show both
  cases, so a floor that moved can be told from a contender that did. The latency target is
  judged against the unpinned floor (same conditions as everyone) and, as a steadier second
  reading, against the cross-CPU one. ``--no-pinned-floors`` leaves them out.

Measured per payload size (16 B, 10 KB = 10240 B, 1 MB = 1048576 B):

- latency: one caller, every call timed on its own (``perf_counter_ns``): p50 and p99;
- throughput: C concurrent callers (2, 8, 64 trio tasks) sharing a fixed number of calls,
  calls / wall time; the median over rounds is reported.

Each round runs every measurement for every contender, in an order that rotates each round
(so drift and background load hit all alike); ``--warmup`` untimed rounds come first (they
start the worker processes and import the handler), after a check that every contender
echoes the payload back intact. Targets (the issue): pool p50 <= 2 x floor p50, and pool
throughput ahead of every peer (trio_parallel, anyio, ProcessPoolExecutor) at every
concurrency. A contender that fails is reported as an error row; the others carry on.

Run: ``python benchmarks/bench_pool.py [--quick] [--rounds N] [--workers N] [--json]``
(the full run takes ~2-3 min on 2 vCPUs, ``--quick`` ~20 s). ``--only pool,floor`` narrows the
contenders, ``--sizes``/``--concurrency`` the grid, ``--pool-option KEY=VALUE`` passes
options to the pool (e.g. ``max_concurrency_per_worker=4``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import asynccontextmanager, contextmanager, nullcontext
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import anyio
import anyio.to_process
import attrs
import trio
import trio_parallel

from _common import PLUGIN_ID, bench_registry, import_handlers, percentile
from plugin_execution import ExecutionRequest, create_execution_backend

SIZES: dict[str, int] = {"16 B": 16, "10 KB": 10 * 1024, "1 MB": 1024 * 1024}
#: Per size: (latency calls per contender per round, throughput calls per run).
WORK: dict[str, tuple[int, int]] = {"16 B": (200, 1024), "10 KB": (200, 1024), "1 MB": (20, 128)}
CONCURRENCY = (2, 8, 64)
TARGET_P50_X_FLOOR = 2.0
BLOCK_TIMEOUT_S = 60.0  # one measurement of one contender; past it the contender is an error
SHUTDOWN_TIMEOUT_S = 30.0
PINNED_SAME = "floor, 1 CPU (pinned)"
PINNED_CROSS = "floor, 2 CPUs (pinned)"

Call = Callable[[bytes], Awaitable[Any]]


echo = import_handlers().echo


# -- the contenders: each an async context manager yielding ``call(payload) -> echoed`` ----


@asynccontextmanager
async def open_pool(
    workers: int, options: dict[str, Any], info: dict[str, Any]
) -> AsyncIterator[Call]:
    with tempfile.TemporaryDirectory(prefix="bench-pool-") as root:
        async with create_execution_backend(
            type="worker-pool",
            registry=bench_registry(),
            workspace=root,
            min_workers=workers,
            max_workers=workers,
            **options,
        ) as pool:
            execute = pool.execute

            async def call(payload: bytes) -> Any:
                request = ExecutionRequest(plugin_id=PLUGIN_ID, handler_id="echo", input=payload)
                return (await execute(request)).output

            try:
                yield call
            finally:  # the pool's own counters (recycled workers, crashes...) as evidence
                try:
                    info["stats"] = attrs.asdict(pool.stats())
                except Exception as exc:
                    info["stats"] = f"stats() failed: {describe(exc)}"


@asynccontextmanager
async def open_trio_parallel(workers: int) -> AsyncIterator[Call]:
    limiter = trio.CapacityLimiter(workers)
    async with trio_parallel.open_worker_context() as ctx:
        run_sync = ctx.run_sync

        async def call(payload: bytes) -> Any:
            return await run_sync(echo, None, payload, limiter=limiter)

        yield call


@asynccontextmanager
async def open_anyio(workers: int) -> AsyncIterator[Call]:
    limiter = anyio.CapacityLimiter(workers)
    run_sync = anyio.to_process.run_sync

    async def call(payload: bytes) -> Any:
        return await run_sync(echo, None, payload, limiter=limiter)

    yield call  # anyio's workers live in the run; it kills and reaps them when the run ends


@asynccontextmanager
async def open_executor(workers: int) -> AsyncIterator[Call]:
    executor = ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn")
    )
    token = trio.lowlevel.current_trio_token()
    submit = executor.submit

    async def call(payload: bytes) -> Any:
        future = submit(echo, None, payload)
        done = trio.Event()

        def wake(_: Future[Any]) -> None:
            token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        await done.wait()
        return future.result()

    try:
        yield call
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(executor.shutdown)


FLOOR_CHILD = """\
import socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
buf = bytearray(1 << 16)
have = 0
def fill(need):
    global have
    if need > len(buf):
        buf.extend(bytes(need - len(buf)))
    while have < need:
        n = s.recv_into(memoryview(buf)[have:])
        if not n:
            raise SystemExit(0)
        have += n
while True:
    fill(4)
    end = 4 + int.from_bytes(buf[:4], "big")
    fill(end)
    s.sendall(memoryview(buf)[:end])
    buf[: have - end] = buf[end:have]
    have -= end
"""


class FloorConnection:
    """One end of a socketpair whose other end is a child echoing length-prefixed frames."""

    def __init__(self, sock: trio.socket.SocketType, process: trio.Process) -> None:
        self.sock = sock
        self.process = process

    async def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await self.sock.send(view) :]

    async def roundtrip(self, payload: bytes) -> memoryview:
        size = len(payload)
        header = size.to_bytes(4, "big")
        if size <= 65536:
            await self._send_all(header + payload)
        else:  # a 1 MB concatenation costs more than a second send
            await self._send_all(header)
            await self._send_all(payload)
        buf = bytearray(4 + size)
        view = memoryview(buf)
        got = 0
        while got < len(buf):
            n = await self.sock.recv_into(view[got:])
            if not n:
                raise EOFError("floor child closed its socket")
            got += n
        return view[4:]


@asynccontextmanager
async def open_floor(workers: int, pin: int | None = None) -> AsyncIterator[Call]:
    connections: list[FloorConnection] = []
    try:
        for _ in range(workers):
            parent, child = socket.socketpair()
            try:
                process = await trio.lowlevel.open_process(
                    [sys.executable, "-I", "-c", FLOOR_CHILD, str(child.fileno())],
                    pass_fds=(child.fileno(),),
                )
            except BaseException:
                parent.close()
                raise
            finally:
                child.close()
            connections.append(FloorConnection(trio.socket.from_stdlib_socket(parent), process))
            if pin is not None:
                os.sched_setaffinity(process.pid, {pin})

        idle = list(connections)
        lot = trio.lowlevel.ParkingLot()

        async def call(payload: bytes) -> Any:
            while not idle:  # no checkpoint when a connection is free, as with one caller
                await lot.park()
            connection = idle.pop()
            try:
                return await connection.roundtrip(payload)
            finally:
                idle.append(connection)
                lot.unpark()

        yield call
    finally:
        with trio.CancelScope(shield=True):
            for connection in connections:
                connection.sock.close()  # EOF: the child exits
            for connection in connections:
                with trio.move_on_after(5):
                    await connection.process.wait()
                if connection.process.returncode is None:
                    connection.process.kill()
                    await connection.process.wait()


def cpus() -> list[int]:
    """The CPUs this thread may run on (all of them when affinity is not supported)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


@asynccontextmanager
async def open_pinned_floor(cross: bool) -> AsyncIterator[Call]:
    """One floor connection whose child is pinned to the first CPU (same) or the second."""
    first, second = cpus()[:2]
    async with open_floor(1, pin=second if cross else first) as call:
        yield call


@contextmanager
def parent_pinned() -> Iterator[None]:
    """Pin the trio thread (only; pid 0 is the calling thread) to the first CPU."""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


# -- hosting: each contender in its own task, so one that fails cannot take the run down --


class Contender:
    def __init__(self, name: str, kind: str, opener: Callable[[], Any]) -> None:
        self.name = name
        self.kind = kind  # "floor" | "pool" | "peer" | "reference" (latency only, pinned)
        self.info: dict[str, Any] = {}
        self.opener = opener
        self.call: Call | None = None
        self.error: str | None = None
        self.ready = trio.Event()
        self.stop = trio.Event()
        self.stopped = trio.Event()
        self.scope = trio.CancelScope()

    @property
    def usable(self) -> bool:
        return self.call is not None and self.error is None

    def fail(self, stage: str, exc: BaseException) -> None:
        if self.error is None:
            self.error = f"{stage}: {describe(exc)}"

    async def host(self) -> None:
        try:
            with self.scope:
                async with self.opener() as call:
                    self.call = call
                    self.ready.set()
                    await self.stop.wait()
            if self.scope.cancelled_caught:
                self.fail("shutdown", TimeoutError(f"not closed within {SHUTDOWN_TIMEOUT_S} s"))
        except Exception as exc:
            self.fail("start" if self.call is None else "run/shutdown", exc)
        finally:
            self.ready.set()
            self.stopped.set()


def describe(exc: BaseException) -> str:
    """The first leaf of an exception (group), as ``Type: message``."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def make_contenders(args: argparse.Namespace) -> list[Contender]:
    n = args.workers
    pool = Contender("worker pool", "pool", lambda: open_pool(n, args.pool_options, pool.info))
    every = [
        Contender("socketpair floor", "floor", lambda: open_floor(n)),
        pool,
        Contender("trio_parallel", "peer", lambda: open_trio_parallel(n)),
        Contender("anyio.to_process", "peer", lambda: open_anyio(n)),
        Contender("ProcessPoolExecutor", "peer", lambda: open_executor(n)),
    ]
    if args.pinned_floors and hasattr(os, "sched_setaffinity") and len(cpus()) >= 2:
        every += [
            Contender(PINNED_SAME, "reference", lambda: open_pinned_floor(cross=False)),
            Contender(PINNED_CROSS, "reference", lambda: open_pinned_floor(cross=True)),
        ]
    if args.only:
        wanted = {name.strip().lower() for name in args.only.split(",")}
        every = [c for c in every if c.kind in wanted or c.name.lower() in wanted]
    return every


# -- the timed blocks ---------------------------------------------------------------------


async def time_latency(call: Call, payload: bytes, calls: int, out: list[int]) -> None:
    clock = time.perf_counter_ns
    for _ in range(calls):
        start = clock()
        await call(payload)
        out.append(clock() - start)


async def time_throughput(call: Call, payload: bytes, callers: int, total: int) -> float:
    """Calls per second of ``callers`` tasks making ``total`` calls between them."""
    each = total // callers

    async def caller() -> None:
        for _ in range(each):
            await call(payload)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(caller)
    return each * callers / (time.perf_counter() - start)


async def guarded(contender: Contender, stage: str, block: Callable[[], Awaitable[Any]]) -> Any:
    """Run one block of one contender; a failure or a hang marks it as an error."""
    if not contender.usable:
        return None
    try:
        with trio.fail_after(BLOCK_TIMEOUT_S):
            return await block()
    except trio.TooSlowError:
        contender.fail(stage, TimeoutError(f"hung: not done within {BLOCK_TIMEOUT_S:g} s"))
        return None
    except Exception as exc:
        contender.fail(stage, exc)
        return None


async def check_echo(contender: Contender, payload: bytes) -> None:
    assert contender.call is not None
    output = await contender.call(payload)
    if bytes(output) != payload:
        raise AssertionError(f"echoed {len(bytes(output))} bytes that differ from the payload")


async def measure_size(
    contenders: list[Contender], label: str, args: argparse.Namespace
) -> dict[str, Any]:
    payload = os.urandom(SIZES[label])
    latency_calls, total_calls = WORK[label]
    if args.quick:
        latency_calls, total_calls = max(5, latency_calls // 2), total_calls // 2
    latency_calls = max(1, int(latency_calls * args.scale))
    totals = {c: max(c, math.ceil(total_calls * args.scale / c) * c) for c in args.concurrency}

    for contender in contenders:
        await guarded(contender, f"echo check ({label})", partial(check_echo, contender, payload))

    latency: dict[str, list[int]] = {c.name: [] for c in contenders}
    throughput: dict[int, dict[str, list[float]]] = {
        c: {x.name: [] for x in contenders} for c in args.concurrency
    }
    blocks = ["latency", *args.concurrency]
    for round_no in range(args.warmup + args.rounds):
        timed = round_no >= args.warmup
        gc.collect()
        for block_no, block in enumerate(blocks):
            shift = (round_no + block_no) % len(contenders)
            for contender in contenders[shift:] + contenders[:shift]:
                call = contender.call
                if not contender.usable or call is None:
                    continue
                if block == "latency":
                    samples: list[int] = []
                    pinned = contender.kind == "reference"
                    with parent_pinned() if pinned else nullcontext():
                        await guarded(
                            contender,
                            f"latency ({label})",
                            partial(time_latency, call, payload, latency_calls, samples),
                        )
                    if timed:
                        latency[contender.name] += samples
                elif contender.kind != "reference":
                    callers = int(block)
                    rate = await guarded(
                        contender,
                        f"{callers} callers ({label})",
                        partial(time_throughput, call, payload, callers, totals[callers]),
                    )
                    if timed and rate is not None:
                        throughput[callers][contender.name].append(rate)

    return {
        "payload_bytes": len(payload),
        "latency_calls_per_round": latency_calls,
        "throughput_calls_per_run": totals,
        "latency": {
            name: summarize_latency(s)
            for name, s in latency.items()
            if s and usable(contenders, name)
        },
        "throughput": {
            str(c): {
                name: summarize_rates(r)
                for name, r in rates.items()
                if r and usable(contenders, name)
            }
            for c, rates in throughput.items()
        },
    }


def usable(contenders: list[Contender], name: str) -> bool:
    return any(c.name == name and c.usable for c in contenders)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    contenders = make_contenders(args)
    sizes: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        for contender in contenders:
            nursery.start_soon(contender.host)
        for contender in contenders:
            with trio.move_on_after(120):
                await contender.ready.wait()
            if not contender.ready.is_set():
                contender.fail("start", TimeoutError("not ready within 120 s"))
        try:
            for label in args.sizes:
                sizes[label] = await measure_size(contenders, label, args)
        finally:
            for contender in contenders:
                contender.stop.set()
            for contender in contenders:
                with trio.move_on_after(SHUTDOWN_TIMEOUT_S):
                    await contender.stopped.wait()
                contender.scope.cancel()
    return {
        "sizes": sizes,
        "contenders": {c.name: {"kind": c.kind, "error": c.error, **c.info} for c in contenders},
    }


# -- summarising and reporting ------------------------------------------------------------


def summarize_latency(samples: list[int]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "calls": len(ordered),
        "p50_us": statistics.median(ordered) / 1000,
        "p99_us": percentile(ordered, 0.99) / 1000,
        "mean_us": statistics.fmean(ordered) / 1000,
        "min_us": ordered[0] / 1000,
    }


def summarize_rates(rates: list[float]) -> dict[str, float]:
    return {
        "runs": len(rates),
        "median_calls_per_s": statistics.median(rates),
        "min_calls_per_s": min(rates),
        "max_calls_per_s": max(rates),
    }


def verdicts(measured: dict[str, Any]) -> None:
    """Add, per size, the ratios the targets are stated in."""
    kinds = {name: c["kind"] for name, c in measured["contenders"].items()}
    floor = next((n for n, k in kinds.items() if k == "floor"), None)
    pool = next((n for n, k in kinds.items() if k == "pool"), None)
    peers = [n for n, k in kinds.items() if k == "peer"]
    for figures in measured["sizes"].values():
        lat = figures["latency"]
        targets: dict[str, Any] = {}
        if floor in lat and pool in lat:
            ratio = lat[pool]["p50_us"] / lat[floor]["p50_us"]
            targets["pool_p50_x_floor"] = ratio
            targets["pool_p50_target_met"] = ratio <= TARGET_P50_X_FLOOR
        if PINNED_CROSS in lat and pool in lat:
            ratio = lat[pool]["p50_us"] / lat[PINNED_CROSS]["p50_us"]
            targets["pool_p50_x_cross_cpu_floor"] = ratio
            targets["pool_p50_cross_cpu_target_met"] = ratio <= TARGET_P50_X_FLOOR
        for callers, rates in figures["throughput"].items():
            present = [p for p in peers if p in rates]
            if pool in rates and present:
                best = max(present, key=lambda p: rates[p]["median_calls_per_s"])
                ratio = rates[pool]["median_calls_per_s"] / rates[best]["median_calls_per_s"]
                targets[f"throughput_{callers}"] = {
                    "best_peer": best,
                    "pool_x_best_peer": ratio,
                    "target_met": ratio > 1.0,
                }
        figures["targets"] = targets


def environment() -> dict[str, Any]:
    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        **{name: ver(name) for name in ("trio", "trio-parallel", "anyio", "plugin-execution")},
    }


def print_table(result: dict[str, Any]) -> None:
    contenders = result["contenders"]
    concurrency = result["settings"]["concurrency"]
    floor = next((n for n, c in contenders.items() if c["kind"] == "floor"), None)
    print(
        f"{result['settings']['workers']} workers each; latency: 1 caller; "
        "throughput: calls/s, median over rounds"
    )
    for label, figures in result["sizes"].items():
        lat, tput = figures["latency"], figures["throughput"]
        head = "".join(f"{f'{c} callers/s':>14}" for c in concurrency)
        print(f"\npayload {label} ({figures['payload_bytes']} bytes)")
        print(f"{'contender':<22}{'p50 us':>10}{'p99 us':>10}{'x floor':>9}{head}")
        for name, info in contenders.items():
            if info["error"] and name not in lat:
                print(f"{name:<22}  ERROR {info['error']}")
                continue
            row = f"{name:<22}"
            if name in lat:
                p50 = lat[name]["p50_us"]
                ratio = p50 / lat[floor]["p50_us"] if floor in lat else float("nan")
                row += f"{p50:>10.1f}{lat[name]['p99_us']:>10.1f}{ratio:>9.2f}"
            else:
                row += f"{'-':>10}{'-':>10}{'-':>9}"
            for c in concurrency:
                rate = tput.get(str(c), {}).get(name)
                row += f"{rate['median_calls_per_s']:>14.0f}" if rate else f"{'-':>14}"
            print(row)
        targets = figures["targets"]
        if "pool_p50_x_floor" in targets:
            verdict = "met" if targets["pool_p50_target_met"] else "MISSED"
            print(
                f"  pool p50 = {targets['pool_p50_x_floor']:.2f} x floor "
                f"(target <= {TARGET_P50_X_FLOOR:g}): {verdict}"
            )
        if "pool_p50_x_cross_cpu_floor" in targets:
            verdict = "met" if targets["pool_p50_cross_cpu_target_met"] else "MISSED"
            print(
                f"  pool p50 = {targets['pool_p50_x_cross_cpu_floor']:.2f} x the floor pinned "
                f"across 2 CPUs: {verdict}"
            )
        for c in concurrency:
            t = targets.get(f"throughput_{c}")
            if t:
                verdict = "met" if t["target_met"] else "MISSED"
                print(
                    f"  {c} callers: pool = {t['pool_x_best_peer']:.2f} x best peer "
                    f"({t['best_peer']}) (target > 1): {verdict}"
                )
    stats = next((c.get("stats") for c in contenders.values() if c["kind"] == "pool"), None)
    if isinstance(stats, dict):
        print(
            f"\npool stats: {stats['total']} executions, {stats['failed']} failed"
            f"{' ' + str(stats['failed_by_code']) if stats['failed_by_code'] else ''}, "
            f"{stats['workers_recycled']} workers recycled, "
            f"{stats['worker_crashes']} worker crashes, "
            f"{stats['queue_full_rejections']} queue-full rejections"
        )
    elif stats:
        print(f"\npool stats: {stats}")
    errors = {n: c["error"] for n, c in contenders.items() if c["error"]}
    for name, error in errors.items():
        print(f"\nERROR {name}: {error}")
    if result["leftover_processes"]:
        print("\nLEFTOVER PROCESSES:", *result["leftover_processes"], sep="\n  ")


def leftover_processes() -> list[str]:
    """Descendants of this process still alive (or unreaped) after the run, from /proc.

    multiprocessing's resource tracker is left out: it is shared by the interpreter and exits
    with it, not with the executor.
    """
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    mine, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - mine
        mine |= frontier
    found = []
    for pid in sorted(mine):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if "resource_tracker" not in cmdline:
            found.append(f"{pid} {cmdline[:160] or '<zombie>'}")
    return found


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--rounds", type=int, help="timed rounds per payload (default 15; 4 with --quick)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few rounds and calls")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply the calls per round (default 1)"
    )
    parser.add_argument(
        "--sizes", default=",".join(SIZES), help=f"payloads (default {','.join(SIZES)})"
    )
    parser.add_argument(
        "--concurrency",
        default=",".join(map(str, CONCURRENCY)),
        help="caller counts for throughput (default 2,8,64)",
    )
    parser.add_argument(
        "--only", help="comma-separated contender names or kinds (floor, pool, peer)"
    )
    parser.add_argument(
        "--pool-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra worker-pool option (VALUE parsed as JSON when it can be), repeatable",
    )
    parser.add_argument(
        "--no-pinned-floors",
        dest="pinned_floors",
        action="store_false",
        help="skip the two floor rows pinned to 1 CPU / across 2 CPUs",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 4 if args.quick else 15
    args.sizes = [s.strip() for s in args.sizes.split(",")]
    if unknown := [s for s in args.sizes if s not in SIZES]:
        parser.error(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.pool_options = {}
    for option in args.pool_option:
        key, sep, raw = option.partition("=")
        if not sep:
            parser.error(f"--pool-option wants KEY=VALUE, got {option!r}")
        try:
            args.pool_options[key] = json.loads(raw)
        except ValueError:
            args.pool_options[key] = raw
    if args.rounds < 1 or args.warmup < 0 or args.workers < 1 or min(args.concurrency) < 1:
        parser.error("--rounds, --workers and concurrency must be >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    result = trio.run(measure, args)
    verdicts(result)
    result["leftover_processes"] = leftover_processes()
    result["settings"] = {
        "workers": args.workers,
        "rounds": args.rounds,
        "warmup_rounds": args.warmup,
        "quick": args.quick,
        "scale": args.scale,
        "concurrency": args.concurrency,
        "pool_options": args.pool_options,
        "pinned_floors": args.pinned_floors,
        "handler": "_handlers.echo: returns its input (payload goes there and back)",
        "wall_s": time.perf_counter() - started,
    }
    result["environment"] = environment()
    result = {"benchmark": "pool", **result}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
        print(f"\n(wall time {result['settings']['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
