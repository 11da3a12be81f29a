"""Round trips per second of a 100-byte WebSocket echo: bare trio-websocket vs our channels.

Three echo servers run side by side in one trio run, each on its own 127.0.0.1 port, and
one client per connection talks to them from the same process (as the bare figure in
DESIGN.md was measured: ~9k messages/s):

- ``bare trio-websocket``: ``serve_websocket`` with a handler that accepts and echoes; the
  floor, measured in the same run;
- ``in-process channel``: ``mount_websocket_channels`` on an in-process backend, the session
  handler ``async def echo(ctx, channel)`` (``benchmarks/_channels.py``), awaited with the
  connection itself;
- ``worker-pool channel``: the same handler on a worker pool (``--workers`` process workers),
  its messages bridged over the worker protocol with credit-based flow control.

Two loads: ``1 connection`` sends a message and waits for its echo, ``--messages`` times;
``16 connections`` do the same concurrently, each its share of the messages. The figure is
messages per second over the wall time of the load (connections are opened beforehand).
Rounds interleave the servers (the order rotates each round) after an untimed warm-up; the
median round is reported, with its ratio to the bare server's median of the same load.
Targets: in-process >= 80% of bare, worker-pool >= 50% of bare.

Run: ``python benchmarks/bench_websocket.py [--quick] [--rounds N] [--messages N] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from importlib.metadata import version
from pathlib import Path
from typing import Any

import trio
from trio_websocket import (
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

from plugin_execution import (
    ChannelLimits,
    ChannelSpec,
    PluginManifest,
    PluginRegistry,
    WebSocketRouter,
    create_execution_backend,
    mount_websocket_channels,
)

HERE = Path(__file__).resolve().parent
PLUGIN_ID = "bench.channels"
PAYLOAD = b"x" * 100
SERVERS = ("bare trio-websocket", "in-process channel", "worker-pool channel")
TARGETS = {"in-process channel": 0.8, "worker-pool channel": 0.5}

Client = Callable[[], Awaitable[None]]


def manifest() -> PluginManifest:
    return PluginManifest(
        id=PLUGIN_ID, root=str(HERE), channels=[ChannelSpec(path="/echo", entry="_channels:echo")]
    )


async def bare_echo(request: WebSocketRequest) -> None:
    ws = await request.accept()
    while True:
        await ws.send_message(await ws.get_message())


async def round_trips(ws: WebSocketConnection, count: int) -> None:
    send, receive = ws.send_message, ws.get_message
    for _ in range(count):
        await send(PAYLOAD)
        if await receive() != PAYLOAD:
            raise AssertionError("the echo changed the payload")


async def timed_load(connections: Sequence[WebSocketConnection], messages: int) -> float:
    """Messages per second: ``messages`` round trips shared by ``connections``."""
    share = messages // len(connections)
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for ws in connections:
            nursery.start_soon(round_trips, ws, share)
    return share * len(connections) / (time.perf_counter() - started)


async def measure(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    registry = PluginRegistry([manifest()])
    loads = {"1 connection": 1, f"{args.concurrency} connections": args.concurrency}
    rates: dict[str, dict[str, list[float]]] = {load: {s: [] for s in SERVERS} for load in loads}
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        urls: dict[str, str] = {}
        bare = await nursery.start(serve_websocket, bare_echo, "127.0.0.1", 0, None)
        urls["bare trio-websocket"] = f"ws://127.0.0.1:{bare.port}/echo"
        for name, kind, options in (
            ("in-process channel", "in-process", {}),
            (
                "worker-pool channel",
                "worker-pool",
                {"min_workers": args.workers, "max_workers": args.workers},
            ),
        ):
            backend = await stack.enter_async_context(
                create_execution_backend(type=kind, registry=registry, **options)
            )
            router = WebSocketRouter()
            limits = ChannelLimits(idle_timeout=None)
            [route] = mount_websocket_channels(router, registry, backend=backend, limits=limits)
            server = await nursery.start(router.serve, "127.0.0.1", 0)
            urls[name] = f"ws://127.0.0.1:{server.port}{route.path}"
        clients: dict[str, list[WebSocketConnection]] = {}
        for name, url in urls.items():
            clients[name] = [
                await stack.enter_async_context(open_websocket_url(url))
                for _ in range(args.concurrency)
            ]
        for _ in range(args.warmup):
            for name in SERVERS:
                await timed_load(clients[name], args.messages // 4)
        for round_no in range(args.rounds):
            order = SERVERS[round_no % 3 :] + SERVERS[: round_no % 3]
            for load, width in loads.items():
                for name in order:
                    rate = await timed_load(clients[name][:width], args.messages)
                    rates[load][name].append(rate)
        nursery.cancel_scope.cancel()
    return rates


def report(rates: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> dict[str, Any]:
    loads: dict[str, Any] = {}
    for load, by_server in rates.items():
        bare = statistics.median(by_server[SERVERS[0]])
        rows = {}
        for name, series in by_server.items():
            median = statistics.median(series)
            row: dict[str, Any] = {
                "msgs_per_s": median,
                "min": min(series),
                "max": max(series),
                "ratio_to_bare": median / bare,
            }
            if name in TARGETS:
                row["target_ratio"] = TARGETS[name]
                row["target_met"] = median / bare >= TARGETS[name]
            rows[name] = row
        loads[load] = rows
    return {
        "benchmark": "websocket",
        "payload_bytes": len(PAYLOAD),
        "loads": loads,
        "targets_met": all(
            row.get("target_met", True) for rows in loads.values() for row in rows.values()
        ),
        "settings": {
            "rounds": args.rounds,
            "messages_per_load": args.messages,
            "concurrency": args.concurrency,
            "workers": args.workers,
        },
        "environment": {
            "python": platform.python_version(),
            "trio": version("trio"),
            "trio_websocket": version("trio-websocket"),
            "plugin_execution": version("plugin-execution"),
            "cpus": os.cpu_count(),
        },
    }


def print_table(result: dict[str, Any]) -> None:
    for load, rows in result["loads"].items():
        print(f"\n{load}: {result['payload_bytes']}-byte echo round trips")
        print(f"{'server':<22} {'msgs/s':>9} {'min':>9} {'max':>9} {'x bare':>7}  target")
        for name, row in rows.items():
            target = ""
            if "target_ratio" in row:
                verdict = "met" if row["target_met"] else "MISSED"
                target = f">= {row['target_ratio']:.2f}: {verdict}"
            print(
                f"{name:<22} {row['msgs_per_s']:>9.0f} {row['min']:>9.0f} {row['max']:>9.0f} "
                f"{row['ratio_to_bare']:>7.2f}  {target}"
            )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default 9)")
    parser.add_argument(
        "--messages", type=int, default=4000, help="round trips per load per round (4000)"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="connections (default 16)")
    parser.add_argument("--workers", type=int, default=2, help="pool workers (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 1600 messages")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.messages = 3, 1600
    if args.rounds < 1 or args.messages < args.concurrency or args.concurrency < 1:
        parser.error("--rounds >= 1, --concurrency >= 1 and --messages >= --concurrency")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = report(trio.run(measure, args), args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
