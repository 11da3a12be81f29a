"""``plugin-execution demo``: the bundled example plugin on every available backend.

One handler of each style runs on each backend; a table shows what came back, and the exit
status says whether every available backend succeeded.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import attrs
import trio

from ..backends.base import ExecutionBackend
from ..errors import InvalidRequestError
from ..factory import BACKEND_TYPES, create_execution_backend
from ..registry import PluginRegistry
from ..types import ExecutionRequest, ExecutionResult
from ._common import EXIT_FAILED, EXIT_OK, PROG, backend_names, dumps, shorten

__all__ = ["DEMO_CALLS", "DEMO_PLUGIN", "DemoRow", "add_parser"]

DEMO_PLUGIN = "examples.hello"
#: What ``demo`` runs on each backend: one handler of each style.
DEMO_CALLS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("greet", {"name": "demo"}),
    ("wordcount", {"text": "the quick brown fox jumps over the lazy dog the end"}),
    ("fib", {"n": 20}),
    ("countdown", {"from": 3}),
)
_OUTPUT_WIDTH = 48


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo",
        help=f"run the bundled {DEMO_PLUGIN} plugin on every available backend",
        description=f"Run the bundled {DEMO_PLUGIN} plugin on every available backend "
        "and print a table; exit 0 only if every available backend succeeded.",
    )
    demo.add_argument(
        "--backends",
        nargs="+",
        type=_backend_names,
        metavar="TYPE",
        help="backends to try, space- or comma-separated (default: all but auto; choose from "
        f"{', '.join(BACKEND_TYPES)})",
    )
    demo.set_defaults(func=_cmd_demo)


def _backend_names(text: str) -> list[str]:
    """``in-process`` or ``in-process,subprocess`` (as ``bench --backends`` takes them)."""
    return backend_names(text, BACKEND_TYPES)


@attrs.frozen
class DemoRow:
    """One line of the demo's table: a handler's outcome on a backend."""

    backend: str
    handler: str
    ok: bool
    output: str
    duration_ms: float | None = None
    worker_id: str | None = None


def _cmd_demo(args: argparse.Namespace) -> int:
    requested = [name for names in args.backends or () for name in names]
    types = list(dict.fromkeys(requested)) or [t for t in BACKEND_TYPES if t != "auto"]
    registry = PluginRegistry.from_entry_points()
    if DEMO_PLUGIN not in registry:  # running from a source tree without entry points
        from ..examples.manifest import manifest

        registry.register(manifest)
    rows, unavailable = trio.run(_demo, registry, list(dict.fromkeys(types)))
    _print_table(rows, sys.stdout)
    for row in rows:
        if not row.ok:
            where = row.backend if row.handler == "-" else f"{row.backend}/{row.handler}"
            print(f"{where} failed: {row.output}")
    for backend, why in unavailable:
        print(f"{backend}: not available yet ({why})")
    if not rows:
        print(f"{PROG}: error: none of the requested backends is available", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if all(row.ok for row in rows) else EXIT_FAILED


async def _demo(
    registry: PluginRegistry, types: Sequence[str]
) -> tuple[list[DemoRow], list[tuple[str, str]]]:
    rows: list[DemoRow] = []
    unavailable: list[tuple[str, str]] = []
    for kind in types:
        try:
            backend = create_execution_backend(type=kind, registry=registry)
        except InvalidRequestError as exc:
            if "unknown backend" in exc.message or "missing_extra" in exc.details:
                unavailable.append((kind, exc.message))
            else:
                rows.append(DemoRow(kind, "-", False, str(exc)))
            continue
        except Exception as exc:  # the backend exists but is broken (e.g. fails to import)
            rows.append(DemoRow(kind, "-", False, f"{type(exc).__name__}: {exc}"))
            continue
        try:
            async with backend:
                for handler, input in DEMO_CALLS:
                    rows.append(await _demo_call(backend, kind, handler, input))
        except Exception as exc:
            rows.append(DemoRow(kind, "-", False, f"{type(exc).__name__}: {exc}"))
    return rows, unavailable


async def _demo_call(
    backend: ExecutionBackend, kind: str, handler: str, input: dict[str, Any]
) -> DemoRow:
    request = ExecutionRequest(
        plugin_id=DEMO_PLUGIN, handler_id=handler, input=input, context={"host": "cli"}
    )
    events = 0
    async with backend.open_execution(request) as execution:
        async for _event in execution.events:
            events += 1
        result: ExecutionResult = await execution.result(raise_errors=False)
    if result.error is not None:
        shown = str(result.error)
    else:
        shown = dumps(result.output) + (f" [{events} events]" if events else "")
    return DemoRow(kind, handler, result.ok, shown, result.duration_s * 1000, result.worker_id)


def _print_table(rows: Sequence[DemoRow], out: TextIO) -> None:
    header = ("backend", "handler", "ok", "output", "ms", "worker")
    cells = [
        (
            r.backend,
            r.handler,
            "yes" if r.ok else "NO",
            shorten(r.output, _OUTPUT_WIDTH),
            f"{r.duration_ms:.2f}" if r.duration_ms is not None else "-",
            r.worker_id or "-",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    for row in [header, *cells]:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print(line.rstrip(), file=out)
