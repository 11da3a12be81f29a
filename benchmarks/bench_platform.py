"""Cost of one permission-checked platform call: ``ctx.cache.get`` in-process and from a
worker-pool handler (a round trip to the host), next to the worker protocol's bare ping.

All in one trio run:

- ``in-process (async)`` / ``in-process (sync)``: a handler on the in-process backend times
  ``await ctx.cache.get("key")`` (async) or ``ctx.cache.get("key")`` (sync, from its thread:
  a hop into the event loop and back);
- ``worker-pool (async)`` / ``worker-pool (sync)``: the same handlers on a one-worker pool:
  each call is a ``pcall`` frame to the host, a permission check and a ``MemoryCache`` read
  there, and a ``preply`` back; async handlers wait on the worker's trio loop, sync ones on a
  lock in their executor thread;
- ``bare ping``: ``await worker.ping()`` from the host to a worker process of its own and back
  (``Ping`` / ``Pong``: the protocol's cheapest round trip), timed on the host.

The handlers time every call themselves (``perf_counter_ns``) and return the samples, so the
figures are per call, without the execution around them. Variants run in interleaved rounds
with a rotating order; medians and p99 are over all calls. Target: the proxied call (median)
<= 3 x the bare ping (median).

Run: ``python benchmarks/bench_platform.py [--rounds N] [--calls N] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import trio

from _common import Samples, Summary, summarize
from plugin_execution import (
    ExecutionBackend,
    ExecutionRequest,
    PluginRegistry,
    create_execution_backend,
)
from plugin_execution.host.process import WorkerProcess, open_worker_process
from plugin_execution.platform import Platform

HERE = Path(__file__).resolve().parent
PLUGIN_ID = "bench.platform"
TARGET_RATIO = 3.0


def bench_registry() -> PluginRegistry:
    registry = PluginRegistry()
    registry.register(
        {
            "id": PLUGIN_ID,
            "version": "1",
            "root": str(HERE),
            "handlers": [
                {"id": "async", "entry": "_platform_handlers:cache_get"},
                {"id": "sync", "entry": "_platform_handlers:cache_get_sync"},
            ],
            "permissions": {"platform": ["cache"]},
        }
    )
    return registry


async def time_handler(backend: ExecutionBackend, handler: str, calls: int, out: Samples) -> None:
    request = ExecutionRequest(plugin_id=PLUGIN_ID, handler_id=handler, input={"calls": calls})
    out.extend((await backend.execute(request, timeout=600)).output)


async def time_ping(worker: WorkerProcess, calls: int, out: Samples) -> None:
    clock = time.perf_counter_ns
    for _ in range(calls):
        start = clock()
        await worker.ping()
        out.append(clock() - start)


async def measure(args: argparse.Namespace) -> dict[str, Samples]:
    registry = bench_registry()
    samples: dict[str, Samples] = {
        "in-process (async)": [],
        "in-process (sync)": [],
        "worker-pool (async)": [],
        "worker-pool (sync)": [],
        "bare ping": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-platform-") as root:
        services = Platform()
        await services.cache.set(PLUGIN_ID, "key", b"\xa5value", None)  # msgpack "value"
        async with (
            create_execution_backend(
                type="in-process", registry=registry, platform=services, workspace=root
            ) as local,
            create_execution_backend(
                type="worker-pool",
                registry=registry,
                platform=services,
                workspace=root,
                min_workers=1,
                max_workers=1,
            ) as pool,
            open_worker_process() as worker,
        ):
            variants: list[Callable[[], Awaitable[None]]] = [
                lambda: time_handler(local, "async", args.calls, samples["in-process (async)"]),
                lambda: time_handler(local, "sync", args.calls, samples["in-process (sync)"]),
                lambda: time_handler(pool, "async", args.calls, samples["worker-pool (async)"]),
                lambda: time_handler(pool, "sync", args.calls, samples["worker-pool (sync)"]),
                lambda: time_ping(worker, args.calls, samples["bare ping"]),
            ]
            for _ in range(args.warmup):
                for variant in variants:
                    await variant()
            for series in samples.values():
                series.clear()
            for round_no in range(args.rounds):
                shift = round_no % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    await variant()
    return samples


def report(summary: dict[str, Summary], args: argparse.Namespace) -> dict[str, Any]:
    ping = summary["bare ping"]["median_us"]
    ratios = {
        name: summary[name]["median_us"] / ping
        for name in ("worker-pool (async)", "worker-pool (sync)")
    }
    return {
        "benchmark": "platform",
        "variants": summary,
        "ratio_to_ping": ratios,
        "target_ratio": TARGET_RATIO,
        "target_met": all(r <= TARGET_RATIO for r in ratios.values()),
        "settings": {"rounds": args.rounds, "calls_per_round": args.calls},
        "environment": {
            "python": platform.python_version(),
            "trio": version("trio"),
            "plugin_execution": version("plugin-execution"),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
    }


def print_table(result: dict[str, Any]) -> None:
    variants = result["variants"]
    ping = variants["bare ping"]["median_us"]
    print(f"{'variant':<22} {'calls':>7} {'median us':>10} {'p99 us':>9} {'x ping':>7}")
    for name, row in variants.items():
        print(
            f"{name:<22} {row['calls']:>7} {row['median_us']:>10.2f} "
            f"{row['p99_us']:>9.2f} {row['median_us'] / ping:>7.2f}"
        )
    verdict = "met" if result["target_met"] else "MISSED"
    ratios = ", ".join(f"{k}: {v:.2f}" for k, v in result["ratio_to_ping"].items())
    print(
        f"\nproxied ctx.cache.get vs bare ping (medians): {ratios}; "
        f"target <= {result['target_ratio']:g}x: {verdict}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    parser.add_argument(
        "--calls", type=int, default=500, help="timed calls per variant per round (default 500)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 when the target is missed"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.calls < 1 or args.warmup < 0:
        parser.error("--rounds and --calls must be >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = report(summarize(trio.run(measure, args)), args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 1 if args.check and not result["target_met"] else 0


if __name__ == "__main__":
    sys.exit(main())
