"""Round trips through the Ray backend, next to bare Ray actor calls and the local pool.

All contenders run in one trio run on one local Ray instance (loopback), with the same number
of workers (``--workers``, default 2) and the same trivial work, a 16 B echo:

- ``ray backend``: ``await backend.execute(ExecutionRequest(..., input=payload))`` on
  ``create_execution_backend(type="ray", min_workers=N, max_workers=N)``, the benchmarks'
  ``_handlers.echo`` registered by path (the request is built inside the timed call);
- ``bare actor``: N plain Ray actors with an ``echo`` method, called round-robin from trio
  through the same kind of bridge the backend uses for Ray futures
  (``host.ray.wait_ref``: ``ObjectRef.future()`` plus a done-callback that wakes the task
  through ``TrioToken.run_sync_soon``, no thread per call);
- ``worker pool`` (reference row): the local process pool, ``type="worker-pool"``.

Measured: latency with one caller, every call timed on its own (p50, p99); throughput with C
concurrent callers (2, 8, 64 trio tasks) sharing a fixed number of calls, calls / wall time,
the median over rounds. Rounds rotate the contenders' order. Targets (the issue): Ray backend
p50 <= 1.3 x the bare actor call's, and its throughput >= 0.8 x the bare actors' at every
concurrency.

Run: ``python benchmarks/bench_ray.py [--quick] [--rounds N] [--workers N] [--json FILE]``
(needs the ``ray`` extra; ``--quick`` takes ~30 s on 2 vCPUs, most of it starting Ray).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: loopback

from _common import PLUGIN_ID, bench_registry, percentile
from plugin_execution import ExecutionRequest, create_execution_backend
from plugin_execution.host.ray import wait_ref

PAYLOAD = b"x" * 16
CONCURRENCY = (2, 8, 64)
TARGET_P50_X_BARE = 1.3
TARGET_THROUGHPUT_X_BARE = 0.8
RAY_BACKEND, BARE, POOL = "ray backend", "bare actor", "worker pool"

Call = Callable[[bytes], Awaitable[Any]]


class Echo:
    def echo(self, payload: bytes) -> bytes:
        return payload


@asynccontextmanager
async def open_backend(kind: str, workers: int) -> AsyncIterator[Call]:
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as root:
        async with create_execution_backend(
            type=kind,
            registry=bench_registry(),
            workspace=root,
            min_workers=workers,
            max_workers=workers,
        ) as backend:
            execute = backend.execute

            async def call(payload: bytes) -> Any:
                request = ExecutionRequest(plugin_id=PLUGIN_ID, handler_id="echo", input=payload)
                return (await execute(request)).output

            yield call  # (its min_workers are up once the block is entered)


@asynccontextmanager
async def open_bare(workers: int) -> AsyncIterator[Call]:
    import ray

    actors = [ray.remote(Echo).options(num_cpus=1).remote() for _ in range(workers)]  # type: ignore[attr-defined]
    try:
        for actor in actors:
            await wait_ref(actor.echo.remote(b"ready"))
        turn = 0

        async def call(payload: bytes) -> Any:
            nonlocal turn
            actor = actors[turn % workers]
            turn += 1
            return await wait_ref(actor.echo.remote(payload))

        yield call
    finally:
        for actor in actors:
            ray.kill(actor)


async def latency(call: Call, calls: int) -> list[int]:
    samples = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        await call(PAYLOAD)
        samples.append(time.perf_counter_ns() - start)
    return samples


async def throughput(call: Call, callers: int, total: int) -> float:
    left = total

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call(PAYLOAD)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(caller)
    return total / (time.perf_counter() - start)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    ray.init(
        num_cpus=2 * args.workers + 1,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _node_ip_address="127.0.0.1",
    )
    names = [RAY_BACKEND, BARE, POOL]
    lat: dict[str, list[int]] = {name: [] for name in names}
    thr: dict[str, dict[int, list[float]]] = {n: {c: [] for c in CONCURRENCY} for n in names}
    try:
        async with AsyncExitStack() as stack:
            calls = {
                RAY_BACKEND: await stack.enter_async_context(open_backend("ray", args.workers)),
                BARE: await stack.enter_async_context(open_bare(args.workers)),
                POOL: await stack.enter_async_context(open_backend("worker-pool", args.workers)),
            }
            for name, call in calls.items():  # warm-up, and a check that it echoes
                assert await call(PAYLOAD) == PAYLOAD, name
                await latency(call, args.latency_calls // 4)
            for round_ in range(args.rounds):
                order = names[round_ % 3 :] + names[: round_ % 3]
                for name in order:
                    lat[name] += await latency(calls[name], args.latency_calls)
                    for callers in CONCURRENCY:
                        rate = await throughput(calls[name], callers, args.throughput_calls)
                        thr[name][callers].append(rate)
    finally:
        ray.shutdown()
    figures: dict[str, Any] = {}
    for name in names:
        ordered = sorted(lat[name])
        figures[name] = {
            "p50_us": percentile(ordered, 0.5) / 1000,
            "p99_us": percentile(ordered, 0.99) / 1000,
            "calls_per_s": {c: statistics.median(thr[name][c]) for c in CONCURRENCY},
        }
    ray_, bare = figures[RAY_BACKEND], figures[BARE]
    targets = {
        "p50_x_bare": ray_["p50_us"] / bare["p50_us"],
        "p50_ok": ray_["p50_us"] <= TARGET_P50_X_BARE * bare["p50_us"],
        "throughput_x_bare": {
            c: ray_["calls_per_s"][c] / bare["calls_per_s"][c] for c in CONCURRENCY
        },
    }
    targets["throughput_ok"] = all(
        x >= TARGET_THROUGHPUT_X_BARE for x in targets["throughput_x_bare"].values()
    )
    return {
        "workers": args.workers,
        "rounds": args.rounds,
        "cpus": len(os.sched_getaffinity(0)),
        "loadavg": os.getloadavg(),
        "figures": figures,
        "targets": targets,
    }


def report(result: dict[str, Any]) -> None:
    head = f"{'':<12} {'p50 us':>9} {'p99 us':>9}" + "".join(
        f" {f'{c} callers/s':>13}" for c in CONCURRENCY
    )
    print(head)
    for name, fig in result["figures"].items():
        rates = "".join(f" {fig['calls_per_s'][c]:>13.0f}" for c in CONCURRENCY)
        print(f"{name:<12} {fig['p50_us']:>9.1f} {fig['p99_us']:>9.1f}{rates}")
    targets = result["targets"]
    print(
        f"ray backend p50 = {targets['p50_x_bare']:.2f} x bare actor "
        f"(target <= {TARGET_P50_X_BARE}): {'ok' if targets['p50_ok'] else 'MISSED'}"
    )
    ratios = ", ".join(f"{c}: {x:.2f}" for c, x in targets["throughput_x_bare"].items())
    print(
        f"ray backend throughput / bare actor ({ratios}) (target >= "
        f"{TARGET_THROUGHPUT_X_BARE}): {'ok' if targets['throughput_ok'] else 'MISSED'}"
    )
    print(f"({result['cpus']} CPUs, load average {result['loadavg'][0]:.2f} at the end)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round, fewer calls")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON ('-': stdout)")
    args = parser.parse_args()
    args.latency_calls, args.throughput_calls = (200, 512) if args.quick else (1000, 2048)
    if args.quick:
        args.rounds = 1
    try:
        import ray  # noqa: F401
    except ImportError:
        print("bench_ray needs Ray: pip install 'plugin-execution[ray]'", file=sys.stderr)
        return 2
    result = trio.run(run, args)
    if args.json == "-":
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        report(result)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
