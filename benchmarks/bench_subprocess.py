"""Time from ``execute()`` to result on the subprocess backend, next to a bare interpreter.

Side by side, in one run, in interleaved rounds (so background load hits all alike):

- ``bare python -I -c pass``: spawn + wait of a fresh isolated interpreter (the floor);
- ``spawn, sync handler`` / ``spawn, async handler``: ``start_method="spawn"``;
- ``zygote, sync handler`` / ``zygote, async handler``: ``start_method="zygote"``.

Targets (issue 3): spawn <= 1.5 x bare + 5 ms; zygote median <= 5 ms. An async handler needs
trio in the child; a spawned child pays for importing it, a zygote's child does not.

Run: ``python benchmarks/bench_subprocess.py [--rounds N] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from plugin_execution import (
    ExecutionRequest,
    HandlerSpec,
    PluginManifest,
    PluginRegistry,
    WorkspaceManager,
    create_execution_backend,
)

HERE = Path(__file__).resolve().parent
PLUGIN = "bench.handlers"


def registry() -> PluginRegistry:
    return PluginRegistry(
        [
            PluginManifest(
                id=PLUGIN,
                root=str(HERE),
                handlers=(
                    HandlerSpec(id="sync", entry="_handlers:noop_sync"),
                    HandlerSpec(id="async", entry="_handlers:noop"),
                ),
            )
        ]
    )


async def bare_python() -> float:
    start = time.perf_counter()
    await trio.run_process([sys.executable, "-I", "-c", "pass"])
    return time.perf_counter() - start


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(rounds: int) -> dict[str, dict[str, float]]:
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as root:
        async with (
            create_execution_backend(
                type="subprocess",
                registry=registry(),
                start_method="spawn",
                workspace=WorkspaceManager(Path(root) / "spawn"),
            ) as spawn,
            create_execution_backend(
                type="subprocess",
                registry=registry(),
                start_method="zygote",
                workspace=WorkspaceManager(Path(root) / "zygote"),
            ) as zygote,
        ):

            async def timed(backend: Any, handler: str) -> float:
                start = time.perf_counter()
                await backend.execute(
                    ExecutionRequest(plugin_id=PLUGIN, handler_id=handler, input={"n": 1})
                )
                return time.perf_counter() - start

            variants = {
                "bare python -I -c pass": bare_python,
                "spawn, sync handler": lambda: timed(spawn, "sync"),
                "spawn, async handler": lambda: timed(spawn, "async"),
                "zygote, sync handler": lambda: timed(zygote, "sync"),
                "zygote, async handler": lambda: timed(zygote, "async"),
            }
            for name, run in variants.items():  # warm caches once, untimed
                await run()
                samples[name] = []
            for i in range(rounds):
                names = list(variants)
                names = names[i % len(names) :] + names[: i % len(names)]
                for name in names:
                    samples[name].append(await variants[name]())
    return {
        name: {"median_ms": statistics.median(s) * 1e3, "p99_ms": percentile(s, 0.99) * 1e3}
        for name, s in samples.items()
    }


def report(results: dict[str, dict[str, float]]) -> None:
    bare = results["bare python -I -c pass"]["median_ms"]
    spawn_target = 1.5 * bare + 5
    print(f"{'variant':<26}{'median ms':>11}{'p99 ms':>9}{'x bare':>8}  target")
    for name, figures in results.items():
        median = figures["median_ms"]
        if name.startswith("spawn"):
            target = f"<= {spawn_target:.1f} ms " + ("met" if median <= spawn_target else "MISSED")
        elif name.startswith("zygote"):
            target = "<= 5.0 ms " + ("met" if median <= 5 else "MISSED")
        else:
            target = "(floor)"
        print(f"{name:<26}{median:>11.2f}{figures['p99_ms']:>9.2f}{median / bare:>8.2f}  {target}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = trio.run(main, args.rounds)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        report(results)
