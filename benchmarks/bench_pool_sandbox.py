"""The kernel sandbox on the worker pool: what it costs per call, and with several plugins.

Contenders, all in one trio run, each a worker pool of ``--workers`` (default 2) process
workers calling ``_handlers.echo`` with a 16 B payload (to the worker and back):

- ``pool``: the unsandboxed pool (``sandbox=False``), one plugin;
- ``sandboxed``: ``sandbox=True`` (every layer this machine has), one plugin;
- ``per plugin, no layers``: ``sandbox=()``: the sandboxed pool's placement and worker
  directories, no kernel layer (tells the placement's cost from the layers');
- ``sandboxed, 4 plugins``: the same, four plugins (the echo handler registered under four
  ids) called round-robin: with as many workers as plugins a plugin has its worker; with
  fewer, workers are traded between plugins (see placement.py);
- ``sandboxed, 4 plugins, 4 workers``: the same with ``max_workers=4``.

Measured: latency (one caller, every call timed on its own: p50, p99) and throughput (C
concurrent callers, 2/8/64, sharing a fixed number of calls: calls/s, median over rounds).
Each round measures every contender, in an order that rotates each round, one measurement
of all of them after the other (latency, then each number of callers), so that the load of a
shared machine drifts little between the figures compared; ``--warmup`` untimed rounds come
first (every worker started, every plugin called). Also reported: how long a worker takes to
start (a pool's first call, the sandboxed one under bubblewrap).

Targets (issue 19): sandboxed vs pool, p50 and throughput at 2/8/64 callers within 10%; 4
plugins round-robin, throughput >= 0.7 x one plugin's.

Run: ``python benchmarks/bench_pool_sandbox.py [--quick] [--rounds N] [--workers N]
[--one-plugin] [--json]`` (``--quick``: a smoke run of a few seconds; ``--one-plugin``: the
pool, sandboxed and no-layers contenders only, the per-call comparison without the 4-plugin
rounds).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from _common import HERE, PLUGIN_ID, percentile
from plugin_execution import ExecutionRequest, PluginRegistry, create_execution_backend
from plugin_execution.sandbox import detect

PAYLOAD = b"x" * 16
CONCURRENCY = (2, 8, 64)
PLUGINS = 4
TARGET_WITHIN = 0.10
TARGET_PLUGINS_X = 0.7

Call = Callable[[], Awaitable[Any]]


def registry(plugins: int) -> PluginRegistry:
    """The echo handler under ``plugins`` plugin ids (the first is the usual one)."""
    registry = PluginRegistry()
    for n in range(plugins):
        registry.register(
            {
                "id": PLUGIN_ID if n == 0 else f"{PLUGIN_ID}.{n}",
                "version": "1",
                "root": str(HERE),
                "handlers": [{"id": "echo", "entry": "_handlers:echo"}],
            }
        )
    return registry


@asynccontextmanager
async def open_contender(
    workers: int, sandbox: bool | tuple[str, ...], plugins: int, info: dict[str, Any]
) -> AsyncIterator[Call]:
    ids = [PLUGIN_ID if n == 0 else f"{PLUGIN_ID}.{n}" for n in range(plugins)]
    with tempfile.TemporaryDirectory(prefix="bench-sbx-") as root:
        started = time.perf_counter()
        async with create_execution_backend(
            type="worker-pool",
            registry=registry(plugins),
            workspace=root,
            min_workers=0 if sandbox is not False else workers,
            max_workers=workers,
            sandbox=sandbox,
            acquire_timeout=60,
        ) as pool:
            execute = pool.execute
            first = await execute(
                ExecutionRequest(plugin_id=ids[0], handler_id="echo", input=PAYLOAD)
            )
            info["first_call_ms"] = (time.perf_counter() - started) * 1000
            info["layers"] = first.metadata.get("sandbox", [])
            turn = itertools.cycle(ids)

            async def call() -> Any:
                request = ExecutionRequest(plugin_id=next(turn), handler_id="echo", input=PAYLOAD)
                return (await execute(request)).output

            try:
                yield call
            finally:
                details = pool.stats().details
                info["workers_peak"] = details["workers_peak"]
                info["workers_recycled"] = pool.stats().workers_recycled


async def latency(call: Call, calls: int) -> list[int]:
    samples = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        await call()
        samples.append(time.perf_counter_ns() - start)
    return samples


async def throughput(call: Call, callers: int, calls: int) -> float:
    left = calls

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(caller)
    return calls / (time.perf_counter() - start)


CONTENDERS: dict[str, tuple[bool | tuple[str, ...], int, int | None]] = {
    # name: (sandbox, plugins, workers; None: --workers)
    "pool": (False, 1, None),
    "sandboxed": (True, 1, None),
    "per plugin, no layers": ((), 1, None),
    "sandboxed, 4 plugins": (True, PLUGINS, None),
    "sandboxed, 4 plugins, 4 workers": (True, PLUGINS, PLUGINS),
}


def _share(name: str, args: argparse.Namespace) -> int:
    """More plugins than workers: workers traded on (nearly) every call, so far fewer
    calls (a worker start each)."""
    _, plugins, workers = CONTENDERS[name]
    return 16 if plugins > (workers or args.workers) else 1


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    lat_calls, tput_calls = (50, 256) if args.quick else (300, 2048)
    names = [n for n in CONTENDERS if not args.one_plugin or CONTENDERS[n][1] == 1]
    info: dict[str, dict[str, Any]] = {name: {} for name in names}
    lat: dict[str, list[int]] = {name: [] for name in names}
    tput: dict[tuple[str, int], list[float]] = {(n, c): [] for n in names for c in CONCURRENCY}
    async with _contenders(names, args.workers, info) as calls:
        for _ in range(args.warmup):
            for name in names:
                await throughput(calls[name], 8, 64)
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            # Each measurement of every contender back to back (latency, then each number of
            # callers), so that the machine's load drifts little between the ones compared.
            for name in order:
                lat[name] += await latency(calls[name], max(4, lat_calls // _share(name, args)))
            for callers in CONCURRENCY:
                for name in order:
                    count = max(callers, tput_calls // _share(name, args))
                    tput[(name, callers)].append(await throughput(calls[name], callers, count))
    results: dict[str, Any] = {}
    for name in names:
        ordered = sorted(lat[name])
        results[name] = {
            "p50_us": statistics.median(ordered) / 1000,
            "p99_us": percentile(ordered, 0.99) / 1000,
            "calls_per_s": {c: statistics.median(tput[(name, c)]) for c in CONCURRENCY},
            **info[name],
        }
    return {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "layers_available": list(detect().available),
        "workers": args.workers,
        "rounds": args.rounds,
        "results": results,
        "ratios": ratios(results),
    }


@asynccontextmanager
async def _contenders(
    names: Sequence[str], workers: int, info: dict[str, dict[str, Any]]
) -> AsyncIterator[dict[str, Call]]:
    calls: dict[str, Call] = {}
    async with _stack(names, workers, info, calls):
        yield calls


@asynccontextmanager
async def _stack(
    names: Sequence[str],
    workers: int,
    info: dict[str, dict[str, Any]],
    calls: dict[str, Call],
) -> AsyncIterator[None]:
    if not names:
        yield
        return
    name, rest = names[0], names[1:]
    sandbox, plugins, fixed = CONTENDERS[name]
    async with open_contender(fixed or workers, sandbox, plugins, info[name]) as call:
        calls[name] = call
        async with _stack(rest, workers, info, calls):
            yield


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    if "pool" not in results or "sandboxed" not in results:
        return {}
    base, sandboxed = results["pool"], results["sandboxed"]
    out: dict[str, Any] = {
        "sandboxed/pool p50": sandboxed["p50_us"] / base["p50_us"],
        "sandboxed/pool calls/s": {
            c: sandboxed["calls_per_s"][c] / base["calls_per_s"][c] for c in CONCURRENCY
        },
    }
    for name in ("sandboxed, 4 plugins", "sandboxed, 4 plugins, 4 workers"):
        if name not in results:
            continue
        out[f"{name} / sandboxed calls/s"] = {
            c: results[name]["calls_per_s"][c] / sandboxed["calls_per_s"][c] for c in CONCURRENCY
        }
    return out


def report(data: dict[str, Any]) -> str:
    lines = [
        f"workers: {data['workers']}, rounds: {data['rounds']}, "
        f"layers: {', '.join(data['layers_available'])}",
        f"{'contender':34} {'p50 us':>8} {'p99 us':>8} "
        + " ".join(f"{f'{c} callers/s':>14}" for c in CONCURRENCY)
        + f" {'1st call ms':>12} {'peak':>5} {'recycled':>8}",
    ]
    for name, r in data["results"].items():
        lines.append(
            f"{name:34} {r['p50_us']:8.1f} {r['p99_us']:8.1f} "
            + " ".join(f"{r['calls_per_s'][c]:14.0f}" for c in CONCURRENCY)
            + f" {r['first_call_ms']:12.1f} {r['workers_peak']:5d} {r['workers_recycled']:8d}"
        )
    ratios = data["ratios"]
    if not ratios:
        return "\n".join(lines)
    within = 1 + TARGET_WITHIN
    lines.append(
        f"sandboxed / pool: p50 x{ratios['sandboxed/pool p50']:.2f} (target <= {within:.2f}); "
        "calls/s "
        + ", ".join(f"{c}: x{v:.2f}" for c, v in ratios["sandboxed/pool calls/s"].items())
        + f" (target >= {1 - TARGET_WITHIN:.2f})"
    )
    for key, values in ratios.items():
        if key.startswith("sandboxed, 4"):
            lines.append(
                f"{key}: "
                + ", ".join(f"{c}: x{v:.2f}" for c, v in values.items())
                + f" (target >= {TARGET_PLUGINS_X})"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few rounds and calls")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--one-plugin",
        action="store_true",
        help="only the one-plugin contenders (the pool, sandboxed, no layers): the per-call "
        "comparison alone, without the long 4-plugin rounds",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = min(args.rounds, 2)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data = trio.run(measure, args)
    print(json.dumps(data, indent=2) if args.json else report(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
