"""A harness: run one handler over many inputs with ``backend.map``, collect every outcome
(failures included) and report latency and throughput.

    python examples/harness.py --backend worker-pool --executions 2000 --concurrency 32

Memory stays flat however many inputs there are: ``map`` pulls the next input only as
results are consumed, and results are folded into counters as they arrive.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import trio

from plugin_execution import ExecutionRequest, PluginRegistry, create_execution_backend


async def main(backend_type: str, executions: int, concurrency: int) -> None:
    registry = PluginRegistry.from_entry_points()
    requests = (  # any iterable or async iterable: pulled lazily, never held whole
        ExecutionRequest(plugin_id="examples.hello", handler_id="fib", input={"n": n % 15})
        for n in range(executions)
    )
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    started = time.perf_counter()
    async with (
        create_execution_backend(type=backend_type, registry=registry) as backend,
        backend.map(requests, concurrency=concurrency) as results,
    ):
        async for result in results:  # as they finish; a failure is one more outcome
            latencies.append(result.duration_s)
            outcomes[result.error.code if result.error else "ok"] += 1
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
