"""Run many: ``backend.map`` on the worker pool, next to its peers and the socketpair floor.

All in one trio run, side by side, with the same number of worker processes (``--workers``,
default 2) and the same 16 B echo (``_handlers.echo``):

- ``map``: ``async with pool.map(requests, concurrency=64) as results`` over a generator of
  ``--executions`` requests (default 100,000), every result read; executions per second.
- ``map_no_recycling``: the same on a pool that keeps its workers for good
  (``max_executions_per_worker`` out of reach), as the peers do: at these rates the default
  (a new worker every 10,000 executions) replaces ~3 workers a second.
- ``anyio.to_process`` / ``trio_parallel``: 64 trio tasks calling them, one call at a time each
  (the peers have no run-many of their own); the best of the two is the baseline.
- ``socketpair floor``: 64 tasks sharing the floor's connections, one frame per call.

The peers and the floor make ``--peer-calls`` calls a round (default 20,000: at their rates
that is seconds, and a rate does not need 100,000). Rounds alternate the contenders and the
median of each is reported. Then the host's memory over a long map: ``--rss-executions``
inputs (default 1,000,000; ``--quick`` 100,000) through ``map``, the host's resident set
sampled every 50 ms; the figure is its peak less its level before the map.

Targets (issue #17): map >= 3x the best peer and >= 1.5x the floor; RSS growth <= 50 MB.
``--json`` prints one JSON object on its last line (``map_per_s``, ``best_peer_per_s``,
``floor_per_s``, the ratios, ``rss_growth_mb``).

Run: ``python benchmarks/bench_map.py [--quick] [--rounds N] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import trio

from _common import PLUGIN_ID, bench_registry
from bench_pool import open_anyio, open_floor, open_trio_parallel, time_throughput
from plugin_execution import ExecutionRequest, create_execution_backend

PAYLOAD = b"x" * 16
CALLERS = 64
TARGET_X_PEER = 3.0
TARGET_X_FLOOR = 1.5
TARGET_RSS_MB = 50.0


def requests(count: int) -> Iterator[ExecutionRequest]:
    for _ in range(count):
        yield ExecutionRequest(plugin_id=PLUGIN_ID, handler_id="echo", input=PAYLOAD)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def time_map(pool: Any, count: int, concurrency: int) -> float:
    """Executions per second of one ``map`` over ``count`` requests; every result checked."""
    failed = 0
    start = time.perf_counter()
    async with pool.map(requests(count), concurrency=concurrency) as results:
        async for result in results:
            failed += not result.ok
    elapsed = time.perf_counter() - start
    if failed:
        raise RuntimeError(f"{failed} of {count} executions failed")
    return count / elapsed


async def rss_growth(pool: Any, count: int, concurrency: int) -> dict[str, float]:
    """Peak resident-set growth of this host over a map of ``count`` inputs."""
    before = rss_mb()
    peak = before

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_mb())
            await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        rate = await time_map(pool, count, concurrency)
        nursery.cancel_scope.cancel()
    return {"before_mb": before, "peak_mb": peak, "growth_mb": peak - before, "per_s": rate}


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    rates: dict[str, list[float]] = {
        "map": [],
        "map_no_recycling": [],
        "anyio": [],
        "trio_parallel": [],
        "floor": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-map-") as root:

        def open_pool(**options: Any) -> Any:
            return create_execution_backend(
                type="worker-pool",
                registry=bench_registry(),
                workspace=root,
                min_workers=args.workers,
                max_workers=args.workers,
                **options,
            )

        async with (
            open_pool() as pool,
            # like the peers: workers kept for good
            open_pool(max_executions_per_worker=10**12) as kept,
            open_anyio(args.workers) as anyio_call,
            open_trio_parallel(args.workers) as tp_call,
            open_floor(args.workers) as floor_call,
        ):
            peers = {"anyio": anyio_call, "trio_parallel": tp_call, "floor": floor_call}
            for call in peers.values():  # start the workers, import the handler
                await time_throughput(call, PAYLOAD, CALLERS, CALLERS * 4)
            await time_map(pool, 1000, CALLERS)
            await time_map(kept, 1000, CALLERS)
            maps = {"map": pool, "map_no_recycling": kept}
            for round_ in range(args.rounds):
                order = [*maps, *peers]
                order = order[round_ % len(order) :] + order[: round_ % len(order)]
                for name in order:
                    if name in maps:
                        rates[name].append(await time_map(maps[name], args.executions, CALLERS))
                    else:
                        rate = await time_throughput(peers[name], PAYLOAD, CALLERS, args.peer_calls)
                        rates[name].append(rate)
                print(
                    f"round {round_ + 1}: "
                    + ", ".join(f"{n} {rates[n][-1]:,.0f}/s" for n in order),
                    file=sys.stderr,
                )
            memory = await rss_growth(pool, args.rss_executions, CALLERS)
            stats = pool.stats()
    medians = {name: statistics.median(values) for name, values in rates.items()}
    best_peer = max(medians["anyio"], medians["trio_parallel"])
    return {
        "executions": args.executions,
        "rounds": args.rounds,
        "workers": args.workers,
        "callers": CALLERS,
        "map_per_s": medians["map"],
        "map_no_recycling_per_s": medians["map_no_recycling"],
        "anyio_per_s": medians["anyio"],
        "trio_parallel_per_s": medians["trio_parallel"],
        "best_peer_per_s": best_peer,
        "floor_per_s": medians["floor"],
        "map_x_best_peer": medians["map"] / best_peer,
        "map_x_floor": medians["map"] / medians["floor"],
        "map_no_recycling_x_best_peer": medians["map_no_recycling"] / best_peer,
        "map_no_recycling_x_floor": medians["map_no_recycling"] / medians["floor"],
        "rss_executions": args.rss_executions,
        "rss_growth_mb": memory["growth_mb"],
        "rss": memory,
        "rates": rates,
        "pool_failed": stats.failed,
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"{result['executions']:,} executions of a 16 B echo, {result['workers']} workers")
    for name in ("map", "map_no_recycling", "anyio", "trio_parallel", "floor"):
        print(f"  {name:16} {result[name + '_per_s']:>10,.0f}/s")
    for name in ("map", "map_no_recycling"):
        ratio_peer, ratio_floor = result[name + "_x_best_peer"], result[name + "_x_floor"]
        print(
            f"  {name} x best peer {ratio_peer:.2f} (target >= {TARGET_X_PEER}: "
            f"{'met' if ratio_peer >= TARGET_X_PEER else 'MISSED'}), "
            f"x floor {ratio_floor:.2f} (target >= {TARGET_X_FLOOR}: "
            f"{'met' if ratio_floor >= TARGET_X_FLOOR else 'MISSED'})"
        )
    growth = result["rss_growth_mb"]
    print(
        f"  host RSS over a {result['rss_executions']:,}-input map: +{growth:.1f} MB "
        f"(target <= {TARGET_RSS_MB:.0f}: {'met' if growth <= TARGET_RSS_MB else 'MISSED'})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--executions", type=int, default=100_000)
    parser.add_argument("--peer-calls", type=int, default=20_000)
    parser.add_argument("--rss-executions", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a short run: 20,000 executions")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = parser.parse_args(argv)
    if args.quick:
        args.executions, args.peer_calls, args.rss_executions = 20_000, 5_000, 100_000
        args.rounds = min(args.rounds, 2)
    result = trio.run(measure, args)
    print_table(result)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
