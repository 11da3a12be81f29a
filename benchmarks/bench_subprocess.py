"""Time from ``execute()`` to result on the subprocess backend, next to a bare interpreter, for
each sandbox layer.

Side by side, in one run, in interleaved rounds (so background load hits all alike):

- ``bare python -I -c pass``: spawn + wait of a fresh isolated interpreter (the floor);
- for each start method (``spawn``, ``zygote``), a sync handler under cumulative sandboxes:
  ``off`` (``sandbox=False``: the process layer and rlimits, which are always on),
  ``+capabilities``, ``+landlock``, ``+bubblewrap``, ``+seccomp`` (everything: the default);
  the ``delta`` column is what the layer added to the row above it;
- an async handler with the sandbox off and on (a spawned child imports trio for it; a zygote's
  child has it already);
- ``zygote-on-request``: the zygote with ``fork_ahead=False`` (each child forked when its
  execution asks), sandbox off and fully on: the same run's A/B for the child forked ahead.

A layer this machine lacks is left out and said so. Targets: spawn <= 1.5 x bare + 5 ms
(issue 3); zygote median <= 0.35 x bare, sync and async, every layer (issue 17). Bubblewrap
costs a spawned child an extra exec of bwrap and its namespaces (~3 ms); a zygote's children
run inside the zygote's bwrap and pay nothing for it.

Run: ``python benchmarks/bench_subprocess.py [--rounds N] [--methods spawn,zygote] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from _common import PLUGIN_ID, bench_registry
from plugin_execution import ExecutionRequest, WorkspaceManager, create_execution_backend
from plugin_execution.sandbox import OPTIONAL_LAYERS, detect

BARE = "bare python -I -c pass"
ON_REQUEST = "zygote-on-request"
ZYGOTE_TARGET = 0.35  # x bare (issue 17)


def sandboxes() -> tuple[list[tuple[str, bool | tuple[str, ...]]], list[str]]:
    """The cumulative sandbox configurations this machine can run, and the layers it lacks."""
    support = detect()
    configs: list[tuple[str, bool | tuple[str, ...]]] = [("off", False)]
    layers: list[str] = []
    missing = []
    for layer in OPTIONAL_LAYERS:
        if not support[layer].available:
            missing.append(f"{layer}: {support[layer].detail}")
            continue
        layers.append(layer)
        configs.append((f"+{layer}", tuple(layers)))
    return configs, missing


async def bare_python() -> float:
    start = time.perf_counter()
    await trio.run_process([sys.executable, "-I", "-c", "pass"])
    return time.perf_counter() - start


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed(backend: Any, handler: str) -> float:
    start = time.perf_counter()
    await backend.execute(ExecutionRequest(plugin_id=PLUGIN_ID, handler_id=handler, input=1))
    return time.perf_counter() - start


#: Start methods: the backend's option, and whether the zygote forks each child ahead.
METHODS = {
    "spawn": ("spawn", False),
    "zygote": ("zygote", True),
    ON_REQUEST: ("zygote", False),
}


async def main(rounds: int, methods: list[str]) -> dict[str, dict[str, float]]:
    configs, _ = sandboxes()
    variants: dict[str, Callable[[], Awaitable[float]]] = {BARE: bare_python}
    with tempfile.TemporaryDirectory() as root:
        async with AsyncExitStack() as stack:
            for method in methods:
                start_method, ahead = METHODS[method]
                for label, sandbox in configs:
                    ends = label in ("off", configs[-1][0])
                    if method == ON_REQUEST and not ends:
                        continue
                    handlers = [("sync", "noop_sync")] + [("async", "noop")] * ends
                    for kind, handler in handlers:
                        # A backend per row: with one shared by two rows, the second would
                        # run right after the first and find its child forked ahead still
                        # starting (see "Back to back" in the README).
                        backend = await stack.enter_async_context(
                            create_execution_backend(
                                type="subprocess",
                                registry=bench_registry(),
                                start_method=start_method,
                                sandbox=sandbox,
                                workspace=WorkspaceManager(Path(root) / f"{method}{label}{kind}"),
                                fork_ahead=ahead,
                            )
                        )
                        variants[f"{method}, {kind}, {label}"] = _bind(backend, handler)
            samples: dict[str, list[float]] = {}
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


def _bind(backend: Any, handler: str) -> Callable[[], Awaitable[float]]:
    return lambda: timed(backend, handler)


def report(results: dict[str, dict[str, float]], missing: list[str]) -> None:
    bare = results[BARE]["median_ms"]
    spawn_target = 1.5 * bare + 5
    print(f"{'variant':<34}{'median ms':>10}{'p99 ms':>9}{'delta':>8}{'x bare':>8}  target")
    previous: dict[str, float] = {}
    for name, figures in results.items():
        median = figures["median_ms"]
        group = name.rsplit(",", 1)[0]
        delta = f"{median - previous[group]:+.2f}" if group in previous else ""
        previous[group] = median
        if name.startswith("spawn"):
            target = f"<= {spawn_target:.1f} ms " + ("met" if median <= spawn_target else "MISSED")
        elif name.startswith("zygote"):
            ratio = ZYGOTE_TARGET * bare
            target = f"<= {ZYGOTE_TARGET} x bare " + ("met" if median <= ratio else "MISSED")
        else:
            target = "(floor)"
        print(
            f"{name:<34}{median:>10.2f}{figures['p99_ms']:>9.2f}{delta:>8}"
            f"{median / bare:>8.2f}  {target}"
        )
    for line in missing:
        print(f"not measured, not available here: {line}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated, of {', '.join(METHODS)} (default: all)",
    )
    args = parser.parse_args()
    results = trio.run(main, args.rounds, args.methods.split(","))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        report(results, sandboxes()[1])
