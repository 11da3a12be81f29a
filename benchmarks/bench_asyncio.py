"""``execute`` from an asyncio host (plugin_execution.asyncio) next to a trio host.

Four contenders, each a child process of this script that keeps its backend warm for the
whole run and measures when told to (one at a time, in an order that rotates every round, so
drift and background load hit all alike):

- ``trio / in-process`` and ``asyncio / in-process``: ``await backend.execute(request)`` of
  ``_handlers.noop`` (async, returns its input) on an in-process backend, from ``trio.run`` or
  from ``asyncio.run`` (trio then runs as a guest on the asyncio loop);
- ``trio / worker-pool`` and ``asyncio / worker-pool``: the same call of ``_handlers.echo``
  (sync, its 16 B input goes to a worker process and back) on a pool of 2 worker processes
  (``min_workers = max_workers = 2``).

The request is built inside the timed call. Measured:

- latency: one caller, every call timed on its own (``perf_counter_ns``): p50 and p99;
- latency after a yield: the same, but the caller yields to its loop once before each call
  (``asyncio.sleep(0)`` / ``trio.sleep(0)``, not timed), as a request handler that awaits
  anything else between calls does: p50 (from asyncio, trio must still be awake then);
- throughput: C concurrent callers (1, 8, 64 tasks of the host's own kind) sharing a fixed
  number of calls, calls / wall time; the median over rounds is reported.

Targets (the issue): asyncio-hosted p50 within 1.5x the trio-hosted p50, and asyncio-hosted
throughput >= 0.7x trio-hosted, at every caller count, for both backends.

Run: ``python benchmarks/bench_asyncio.py [--quick] [--rounds N] [--backends B,..] [--json]``
(the full run takes ~1-2 min on 2 vCPUs, ``--quick`` ~20 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from importlib.metadata import version
from typing import Any

import trio

from _common import PLUGIN_ID, bench_registry, percentile
from plugin_execution import ExecutionRequest

CONCURRENCY = (1, 8, 64)
HOSTS = ("trio", "asyncio")
BACKENDS: dict[str, tuple[str, Any, dict[str, Any]]] = {
    # backend: (handler, input, options)
    "in-process": ("noop", {"n": 1}, {}),
    "worker-pool": ("echo", b"0123456789abcdef", {"min_workers": 2, "max_workers": 2}),
}
TARGET_P50_X = 1.5
TARGET_THROUGHPUT_X = 0.7

Call = Callable[[], Awaitable[Any]]


# -- the child: one host, one backend, measuring on command --------------------------------


def child_main(host: str, backend_type: str) -> None:
    handler, payload, options = BACKENDS[backend_type]
    options = {**options, "workspace": tempfile.mkdtemp(prefix="bench-asyncio-")}

    def request() -> ExecutionRequest:
        return ExecutionRequest(plugin_id=PLUGIN_ID, handler_id=handler, input=payload)

    if host == "trio":
        trio.run(trio_child, backend_type, options, request)
    else:
        asyncio.run(asyncio_child(backend_type, options, request))
    os.rmdir(options["workspace"])


async def trio_child(
    backend_type: str, options: dict[str, Any], request: Callable[[], ExecutionRequest]
) -> None:
    from plugin_execution import create_execution_backend

    async with create_execution_backend(
        type=backend_type, registry=bench_registry(), **options
    ) as backend:
        execute = backend.execute

        async def call() -> Any:
            return (await execute(request())).output

        async def spawn_all(callers: int, each: int) -> None:
            async with trio.open_nursery() as nursery:
                for _ in range(callers):
                    nursery.start_soon(loop_calls, call, each)

        while command := await trio.to_thread.run_sync(sys.stdin.readline):
            result = await measure(command, call, spawn_all, partial(trio.sleep, 0))
            print(json.dumps(result), flush=True)


async def asyncio_child(
    backend_type: str, options: dict[str, Any], request: Callable[[], ExecutionRequest]
) -> None:
    from plugin_execution.asyncio import create_execution_backend

    async with create_execution_backend(
        type=backend_type, registry=bench_registry(), **options
    ) as backend:
        execute = backend.execute

        async def call() -> Any:
            return (await execute(request())).output

        async def spawn_all(callers: int, each: int) -> None:
            await asyncio.gather(*(loop_calls(call, each) for _ in range(callers)))

        loop = asyncio.get_running_loop()
        while command := await loop.run_in_executor(None, sys.stdin.readline):
            result = await measure(command, call, spawn_all, partial(asyncio.sleep, 0))
            print(json.dumps(result), flush=True)


async def loop_calls(call: Call, count: int) -> None:
    for _ in range(count):
        await call()


async def measure(
    command: str, call: Call, spawn_all: Callable[[int, int], Awaitable[None]], pause: Call
) -> Any:
    kind, *numbers = command.split()
    if kind in ("latency", "latency-yield"):
        samples = []
        clock = time.perf_counter_ns
        yields = kind == "latency-yield"
        for _ in range(int(numbers[0])):
            if yields:
                await pause()
            start = clock()
            await call()
            samples.append(clock() - start)
        return samples
    callers, total = int(numbers[0]), int(numbers[1])
    each = total // callers
    start = time.perf_counter()
    await spawn_all(callers, each)
    return each * callers / (time.perf_counter() - start)


# -- the parent: rounds over the four children ---------------------------------------------


class Child:
    def __init__(self, host: str, backend_type: str) -> None:
        self.host = host
        self.backend = backend_type
        self.name = f"{host} / {backend_type}"
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--child", host, backend_type],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, command: str) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited ({self.process.wait()})")
        return json.loads(line)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def run_rounds(args: argparse.Namespace) -> dict[str, Any]:
    children = [Child(host, backend) for backend in args.backends for host in HOSTS]
    latency: dict[str, list[int]] = {c.name: [] for c in children}
    after_yield: dict[str, list[int]] = {c.name: [] for c in children}
    throughput: dict[str, dict[int, list[float]]] = {
        c.name: {n: [] for n in args.concurrency} for c in children
    }
    try:
        for child in children:  # warm up: workers started, handlers imported
            child.ask(f"latency {args.calls}")
            for callers in args.concurrency:
                child.ask(f"throughput {callers} {max(callers, args.total // 4)}")
        for round_no in range(args.rounds):
            shift = round_no % len(children)
            for child in children[shift:] + children[:shift]:
                latency[child.name] += child.ask(f"latency {args.calls}")
                after_yield[child.name] += child.ask(f"latency-yield {args.calls}")
                for callers in args.concurrency:
                    total = max(callers, args.total // callers * callers)
                    throughput[child.name][callers].append(
                        child.ask(f"throughput {callers} {total}")
                    )
    finally:
        for child in children:
            child.close()
    return {
        "latency": {name: summarize_latency(s) for name, s in latency.items()},
        "latency_after_yield": {name: summarize_latency(s) for name, s in after_yield.items()},
        "throughput": {
            name: {str(c): statistics.median(rates) for c, rates in by_callers.items()}
            for name, by_callers in throughput.items()
        },
    }


def summarize_latency(samples: list[int]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "calls": len(ordered),
        "p50_us": statistics.median(ordered) / 1000,
        "p99_us": percentile(ordered, 0.99) / 1000,
    }


def verdicts(result: dict[str, Any], backends: Sequence[str]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    for backend in backends:
        trio_name, aio_name = f"trio / {backend}", f"asyncio / {backend}"
        lat = result["latency"]
        ratio = lat[aio_name]["p50_us"] / lat[trio_name]["p50_us"]
        figures: dict[str, Any] = {"p50_x": ratio, "p50_met": ratio <= TARGET_P50_X}
        after = result["latency_after_yield"]
        figures["p50_after_yield_x"] = after[aio_name]["p50_us"] / after[trio_name]["p50_us"]
        for callers, rate in result["throughput"][aio_name].items():
            x = rate / result["throughput"][trio_name][callers]
            figures[f"throughput_{callers}_x"] = x
            figures[f"throughput_{callers}_met"] = x >= TARGET_THROUGHPUT_X
        targets[backend] = figures
    return targets


def print_table(result: dict[str, Any]) -> None:
    concurrency = result["settings"]["concurrency"]
    head = "".join(f"{f'{c} callers/s':>14}" for c in concurrency)
    print(f"{'host / backend':<24}{'p50 us':>10}{'p99 us':>10}{'p50 yield':>11}{head}")
    for name, lat in result["latency"].items():
        rates = result["throughput"][name]
        after = result["latency_after_yield"][name]["p50_us"]
        row = f"{name:<24}{lat['p50_us']:>10.1f}{lat['p99_us']:>10.1f}{after:>11.1f}"
        row += "".join(f"{rates[str(c)]:>14.0f}" for c in concurrency)
        print(row)
    print()
    for backend, figures in result["targets"].items():
        verdict = "met" if figures["p50_met"] else "MISSED"
        print(
            f"{backend}: asyncio p50 = {figures['p50_x']:.2f} x trio "
            f"(target <= {TARGET_P50_X:g}): {verdict}; "
            f"after a yield {figures['p50_after_yield_x']:.2f} x"
        )
        for c in concurrency:
            x = figures[f"throughput_{c}_x"]
            verdict = "met" if figures[f"throughput_{c}_met"] else "MISSED"
            print(
                f"  {c} callers: asyncio throughput = {x:.2f} x trio "
                f"(target >= {TARGET_THROUGHPUT_X:g}): {verdict}"
            )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, help="timed rounds (default 10; 3 with --quick)")
    parser.add_argument("--calls", type=int, help="latency calls per round (default 500)")
    parser.add_argument("--total", type=int, help="calls per throughput run (default 2048)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few rounds and calls")
    parser.add_argument(
        "--concurrency",
        default=",".join(map(str, CONCURRENCY)),
        help="caller counts for throughput (default 1,8,64)",
    )
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="backends to compare (default in-process,worker-pool)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--child", nargs=2, metavar=("HOST", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 10)
    args.calls = args.calls or (200 if args.quick else 500)
    args.total = args.total or (512 if args.quick else 2048)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.backends = args.backends.split(",")
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends: {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(*args.child)
        return 0
    started = time.perf_counter()
    result = run_rounds(args)
    result["targets"] = verdicts(result, args.backends)
    result["settings"] = {
        "rounds": args.rounds,
        "latency_calls_per_round": args.calls,
        "throughput_calls_per_run": args.total,
        "concurrency": args.concurrency,
        "backends": args.backends,
        "quick": args.quick,
        "wall_s": time.perf_counter() - started,
    }
    result["environment"] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "trio": version("trio"),
        "plugin-execution": version("plugin-execution"),
    }
    result = {"benchmark": "asyncio", **result}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
        print(f"\n(wall time {result['settings']['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
