"""``plugin-execution bench``: one handler's latency and throughput on each backend.

The measuring is :mod:`plugin_execution.bench`; this module reads the options and writes the
table, the JSON figures and the plot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ExecutionError
from ..factory import BACKEND_TYPES
from ..types import ExecutionRequest
from ._common import (
    EXIT_OK,
    UsageError,
    add_plugin_path,
    backend_names,
    dumps,
    json_object,
    json_value,
    load_registry,
    prints_to_stderr,
)

__all__ = ["add_parser"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    return [_positive_int(part.strip()) for part in text.split(",") if part.strip()]


def _backend_list(text: str) -> list[str]:
    return backend_names(text, [t for t in BACKEND_TYPES if t != "auto"])


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = commands.add_parser(
        "bench",
        help="measure a handler's latency and throughput on each backend",
        description="Run one handler many times on each backend and concurrency; print p50/p99 "
        "latency and throughput (errors are counted by code, not fatal).",
    )
    bench.add_argument("plugin_id", metavar="PLUGIN_ID")
    bench.add_argument("handler_id", metavar="HANDLER_ID")
    bench.add_argument(
        "--input",
        default={},
        type=json_value,
        metavar="JSON",
        help="the input of every execution, as JSON (default {})",
    )
    bench.add_argument(
        "--context",
        type=json_object,
        default={},
        metavar="JSON",
        help='the context descriptor, a JSON object (default host: "cli")',
    )
    bench.add_argument(
        "--backends",
        type=_backend_list,
        default=["in-process", "worker-pool", "subprocess"],
        metavar="LIST",
        help="comma-separated, e.g. in-process,subprocess (default "
        "in-process,worker-pool,subprocess)",
    )
    bench.add_argument(
        "--executions",
        type=_positive_int,
        default=1000,
        metavar="N",
        help="executions per backend and concurrency (default 1000)",
    )
    bench.add_argument(
        "--concurrency",
        type=_int_list,
        default=[1, 8, 64],
        metavar="LIST",
        help="comma-separated concurrency levels (default 1,8,64)",
    )
    bench.add_argument("--json", metavar="FILE", help="write the figures as JSON ('-': stdout)")
    bench.add_argument("--plot", metavar="FILE", help="draw them into FILE.svg or FILE.png")
    add_plugin_path(bench)
    bench.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .. import bench

    registry = load_registry(args.plugin_path, strict=True)
    try:  # a typo is a usage error here, not N failed executions
        registry.resolve(args.plugin_id, args.handler_id)
    except ExecutionError as exc:
        raise UsageError(exc.message) from None

    def request() -> ExecutionRequest:
        return ExecutionRequest(
            plugin_id=args.plugin_id,
            handler_id=args.handler_id,
            input=args.input,
            context={"host": "cli", **args.context},
        )

    with prints_to_stderr():
        cells = bench.run_bench(
            registry,
            request,
            backends=args.backends,
            concurrency=args.concurrency,
            executions=args.executions,
        )
    bench.render_table(cells, sys.stdout)
    figures = {
        "plugin_id": args.plugin_id,
        "handler_id": args.handler_id,
        "cells": [cell.to_dict() for cell in cells],
    }
    if args.json == "-":
        print(dumps(figures))
    elif args.json:
        Path(args.json).write_text(dumps(figures, indent=2) + "\n")
    if args.plot:
        try:
            bench.plot(cells, args.plot)
        except ImportError as exc:
            raise UsageError(str(exc)) from None
    return EXIT_OK
