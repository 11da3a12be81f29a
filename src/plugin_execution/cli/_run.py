"""``plugin-execution run``: one handler, its result (or error) as JSON on stdout.

stdout carries the JSON answer and nothing else: what the handler prints goes to stderr, and
so do its events with ``--events``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import trio

from ..backends.base import ExecutionBackend
from ..backends.in_process import InProcessBackend
from ..factory import BACKEND_TYPES, create_execution_backend
from ..registry import PluginRegistry
from ..types import ExecutionEvent, ExecutionRequest, ExecutionResult
from ._common import (
    EXIT_FAILED,
    EXIT_OK,
    PROG,
    add_plugin_path,
    as_execution_error,
    dumps,
    json_object,
    json_value,
    load_registry,
    printable,
    prints_to_stderr,
)

__all__ = ["add_parser"]


def _seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = commands.add_parser(
        "run",
        help="run one handler and print its result as JSON",
        description="Run one handler and print its result (or its error) as JSON on stdout.",
    )
    run.add_argument("plugin_id", metavar="PLUGIN_ID")
    run.add_argument("handler_id", metavar="HANDLER_ID")
    run.add_argument(
        "--input",
        default={},
        type=json_value,
        metavar="JSON",
        help="the handler's input, as JSON ('-' reads it from stdin; default {})",
    )
    run.add_argument(
        "--context",
        type=json_object,
        default={},
        metavar="JSON",
        help='the context descriptor, a JSON object (default host: "cli")',
    )
    run.add_argument(
        "--backend",
        choices=BACKEND_TYPES,
        default="auto",
        help="where to run it (default auto: in-process; docs/backends.md)",
    )
    run.add_argument(
        "--timeout",
        type=_seconds,
        metavar="S",
        help="time limit in seconds (default: the handler's, else 30)",
    )
    run.add_argument(
        "--events",
        action="store_true",
        help="show the execution's events (progress, logs, custom) on stderr as they happen",
    )
    add_plugin_path(run)
    run.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    registry = load_registry(args.plugin_path, strict=True)
    try:
        with prints_to_stderr():
            result = trio.run(_run, registry, args)
    except Exception as exc:
        error = as_execution_error(exc)
    else:
        if result.ok:
            print(dumps(_result_dict(result)))
            return EXIT_OK
        assert result.error is not None
        error = result.error
    print(dumps({"ok": False, "error": error.to_dict()}))
    return EXIT_FAILED


async def _run(registry: PluginRegistry, args: argparse.Namespace) -> ExecutionResult:
    request = ExecutionRequest(
        plugin_id=args.plugin_id,
        handler_id=args.handler_id,
        input=args.input,
        context={"host": "cli", **args.context},
        timeout=args.timeout,
    )
    async with create_execution_backend(type=args.backend, registry=registry) as backend:
        if args.events:
            async with backend.open_execution(request) as execution:
                async for event in execution.events:
                    print(printable(_event_line(event)), file=sys.stderr, flush=True)
                result = await execution.result(raise_errors=False)
        else:
            result = await backend.execute(request, raise_errors=False)
        abandoned = _abandoned_threads(backend)
        if abandoned:
            assert isinstance(backend, InProcessBackend)
            print(
                f"{PROG}: the handler's thread is still running (a sync handler cannot be "
                f"stopped, only abandoned); waiting up to {backend.thread_grace:g} s "
                "(thread_grace) for it to return",
                file=sys.stderr,
            )
    if abandoned and _abandoned_threads(backend):
        print(f"{PROG}: exiting with the handler's thread still running", file=sys.stderr)
    return result


def _abandoned_threads(backend: ExecutionBackend) -> int:
    """Sync-handler threads of an in-process backend still running after their execution."""
    if not isinstance(backend, InProcessBackend):
        return 0
    return int(backend.stats().details.get("threads_running", 0))


def _event_line(event: ExecutionEvent) -> str:
    """One event as a line for a person: ``[progress] 2/5``, ``[log] stdout text``, or
    ``[kind] {json}`` for a custom event."""
    data = event.data
    if event.kind == "progress" and isinstance(data, dict):
        return f"[progress] {data.get('done')}/{data.get('total')}"
    if event.kind == "log" and isinstance(data, dict):  # ctx.logger, or a captured print
        source = data.get("level") or data.get("stream") or ""
        return f"[log] {source} {data.get('message', '')}".replace("  ", " ")
    return f"[{event.kind}] {dumps(data)}"


def _result_dict(result: ExecutionResult) -> dict[str, Any]:
    return {
        "ok": True,
        "execution_id": result.execution_id,
        "output": result.output,
        "duration_s": result.duration_s,
        "backend": result.backend,
        "worker_id": result.worker_id,
        "metadata": result.metadata,
    }
