"""A harness: run one handler over many inputs with bounded concurrency, collect every
outcome (failures included) and report latency and throughput.

    python examples/harness.py --backend worker-pool --executions 2000 --concurrency 32

Memory stays flat however many inputs there are: a fixed number of caller tasks pull the
next input when they are free, and results are folded into counters as they arrive.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import trio

from plugin_execution import (
    ExecutionBackend,
    ExecutionRequest,
    PluginRegistry,
    create_execution_backend,
)


async def main(backend_type: str, executions: int, concurrency: int) -> None:
    registry = PluginRegistry.from_entry_points()
    inputs = iter(range(executions))  # stands for any large source of inputs
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []

    async def caller(backend: ExecutionBackend) -> None:
        for n in inputs:
            started = time.perf_counter()
            result = await backend.execute(
                ExecutionRequest(plugin_id="examples.hello", handler_id="fib", input={"n": n % 15}),
                raise_errors=False,  # a failure is one more outcome to count
            )
            latencies.append(time.perf_counter() - started)
            outcomes[result.error.code if result.error else "ok"] += 1

    started = time.perf_counter()
    async with (
        create_execution_backend(type=backend_type, registry=registry) as backend,
        trio.open_nursery() as nursery,
    ):
        for _ in range(concurrency):
            nursery.start_soon(caller, backend)
    elapsed = time.perf_counter() - started
    latencies.sort()
    print(f"{executions} executions on {backend_type} in {elapsed:.2f} s")
    print(f"throughput: {executions / elapsed:.0f}/s")
    print(
        f"latency p50 {statistics.median(latencies) * 1e3:.2f} ms, "
        f"p99 {latencies[int(0.99 * (len(latencies) - 1))] * 1e3:.2f} ms"
    )
    print("outcomes: " + ", ".join(f"{code} {n}" for code, n in sorted(outcomes.items())))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend", default="worker-pool", choices=("in-process", "worker-pool", "subprocess")
    )
    parser.add_argument("--executions", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    trio.run(main, args.backend, args.executions, args.concurrency)
