"""The command line: ``plugin-execution run | plugins | demo | serve | doctor``.

A thin layer over the public API: it builds a :class:`PluginRegistry` from the installed
entry points plus any ``--plugin-path``, opens a backend with :func:`create_execution_backend`
and prints what comes back.

Exit statuses (stable; scripts may branch on them):

- ``0``: success.
- ``1``: the execution failed (``run`` prints ``{"ok": false, "error": {...}}`` on stdout),
  a plugin failed to load (``plugins``), a demo backend failed (``demo``), ``serve``
  found no channel to serve or could not listen, or a sandbox layer is not available on this
  machine (``doctor``).
- ``2``: usage error (bad arguments, malformed JSON, unreadable ``--plugin-path``); a message
  goes to stderr, never a traceback.
- ``130``: interrupted (Ctrl-C); whatever was running has been cancelled and cleaned up.

``serve`` runs until SIGTERM (what systemd and container runtimes send) or SIGINT (Ctrl-C):
it stops listening, closes every connection with 1001 (going away) at once, gives in-flight
executions ``--grace`` seconds to finish (then stops them), and exits 0 on SIGTERM, 130 on
SIGINT.

``run`` prints JSON on stdout, and nothing else: what a handler prints goes to stderr, and so do
its events with ``--events``. Handler outputs may contain ``bytes``, which JSON cannot carry:
they are printed as ``{"$base64": "..."}``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs
import trio

from .backends.base import ExecutionBackend
from .backends.in_process import InProcessBackend
from .errors import ExecutionError, InvalidRequestError, ManifestError
from .factory import BACKEND_TYPES, create_execution_backend
from .manifest import Permissions, PluginManifest
from .registry import PluginRegistry
from .types import ExecutionEvent, ExecutionRequest, ExecutionResult

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "main",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

PROG = "plugin-execution"
DEMO_PLUGIN = "examples.hello"
#: What ``demo`` runs on each backend: one handler of each style.
DEMO_CALLS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("greet", {"name": "demo"}),
    ("wordcount", {"text": "the quick brown fox jumps over the lazy dog the end"}),
    ("fib", {"n": 20}),
    ("countdown", {"from": 3}),
)
_OUTPUT_WIDTH = 48


class UsageError(Exception):
    """A mistake in the command line, found after argparse accepted it."""


# -- argument parsing -----------------------------------------------------------------------


def _json_value(text: str) -> Any:
    if text == "-":
        text = sys.stdin.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {_shorten(text, 60)}") from None


def _json_object(text: str) -> dict[str, Any]:
    value = _json_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


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
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in BACKEND_TYPES or name == "auto"]
    if unknown or not names:
        choices = ", ".join(t for t in BACKEND_TYPES if t != "auto")
        raise argparse.ArgumentTypeError(f"unknown backend(s) {unknown}; choose from {choices}")
    return names


def _add_plugin_path(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugin-path",
        metavar="PATH",
        action="append",
        default=[],
        type=Path,
        help="a plugin.toml file, or a directory holding one, to load on top of the installed "
        "plugins (repeatable; wins over an installed plugin with the same id)",
    )


def _add_serve_options(serve: argparse.ArgumentParser) -> None:
    """The operator's options of ``serve`` (see serve_config.py); unset ones are None so
    that a ``--config`` file can set them."""
    serve.add_argument(
        "--config", type=Path, metavar="FILE", help="a TOML file of these options (flags win)"
    )
    serve.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve wss:// with this cert")
    serve.add_argument("--tls-key", type=Path, metavar="PEM", help="the private key of --tls-cert")
    serve.add_argument(
        "--tokens-file",
        type=Path,
        metavar="FILE",
        help="require a bearer token from FILE (one per line, # comments): "
        "'Authorization: Bearer TOKEN' or ?token=TOKEN",
    )
    serve.add_argument(
        "--allow-origin",
        action="append",
        metavar="ORIGIN",
        help="a browser origin (https://app.example.com) allowed to connect besides the "
        "server's own (repeatable; '*': any); other origins get 403",
    )
    serve.add_argument(
        "--max-connections", type=int, metavar="N", help="cap on live connections (503 beyond)"
    )
    serve.add_argument(
        "--max-message-size", type=int, metavar="BYTES", help="largest client message (1 MiB)"
    )
    serve.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        help="close a connection with no message either way for this long (default 300; "
        "pings do not count)",
    )
    serve.add_argument(
        "--max-queue", type=int, metavar="N", help="the worker-pool backend's queue capacity"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run plugin handlers in-process, in worker pools or in subprocesses.",
        epilog="exit status: 0 ok, 1 execution/plugin failure, 2 usage error, 130 interrupted",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
        type=_json_value,
        metavar="JSON",
        help="the handler's input, as JSON ('-' reads it from stdin; default {})",
    )
    run.add_argument(
        "--context",
        type=_json_object,
        default={},
        metavar="JSON",
        help='the context descriptor, a JSON object (default host: "cli")',
    )
    run.add_argument("--backend", choices=BACKEND_TYPES, default="auto")
    run.add_argument("--timeout", type=_seconds, metavar="S", help="time limit in seconds")
    run.add_argument(
        "--events",
        action="store_true",
        help="show the execution's events (progress, logs, custom) on stderr as they happen",
    )
    _add_plugin_path(run)
    run.set_defaults(func=_cmd_run)

    plugins = commands.add_parser(
        "plugins",
        help="list discovered plugins, their handlers and channels",
        description="List discovered plugins and any that failed to load (exit 1 if any did).",
    )
    _add_plugin_path(plugins)
    plugins.add_argument("--json", action="store_true", help="print JSON instead of text")
    plugins.set_defaults(func=_cmd_plugins)

    bench = commands.add_parser(
        "bench",
        help="measure a handler's latency and throughput on each backend",
        description="Run one handler many times on each backend and concurrency; print p50/p99 "
        "latency and throughput (errors are counted by code, not fatal).",
    )
    bench.add_argument("plugin_id", metavar="PLUGIN_ID")
    bench.add_argument("handler_id", metavar="HANDLER_ID")
    bench.add_argument("--input", default={}, type=_json_value, metavar="JSON")
    bench.add_argument("--context", type=_json_object, default={}, metavar="JSON")
    bench.add_argument(
        "--backends",
        type=_backend_list,
        default=["in-process", "worker-pool", "subprocess"],
        metavar="LIST",
        help="comma-separated (default in-process,worker-pool,subprocess)",
    )
    bench.add_argument("--executions", type=_positive_int, default=1000, metavar="N")
    bench.add_argument(
        "--concurrency",
        type=_int_list,
        default=[1, 8, 64],
        metavar="LIST",
        help="comma-separated concurrency levels (default 1,8,64)",
    )
    bench.add_argument("--json", metavar="FILE", help="write the figures as JSON ('-': stdout)")
    bench.add_argument("--plot", metavar="FILE", help="draw them into FILE.svg or FILE.png")
    _add_plugin_path(bench)
    bench.set_defaults(func=_cmd_bench)

    demo = commands.add_parser(
        "demo",
        help=f"run the bundled {DEMO_PLUGIN} plugin on every available backend",
        description=f"Run the bundled {DEMO_PLUGIN} plugin on every available backend "
        "and print a table; exit 0 only if every available backend succeeded.",
    )
    demo.add_argument(
        "--backends",
        nargs="+",
        choices=BACKEND_TYPES,
        metavar="TYPE",
        help=f"backends to try (default: all but auto; choose from {', '.join(BACKEND_TYPES)})",
    )
    demo.set_defaults(func=_cmd_demo)

    serve = commands.add_parser(
        "serve",
        help="serve every discovered plugin's WebSocket channels",
        description="Serve the WebSocket channels of every discovered plugin with trio-websocket "
        "until interrupted; the first line printed lists the routes.",
    )
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8765; 0: any free port)")
    serve.add_argument("--backend", choices=BACKEND_TYPES, help="(default auto)")
    serve.add_argument(
        "--base-path",
        metavar="PATH",
        help="where the routes go: BASE/PLUGIN_ID/CHANNEL_PATH (default /v1/ws/plugins)",
    )
    serve.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM or SIGINT, how long in-flight executions may take to finish once "
        "every connection was closed with 1001 (default 10)",
    )
    _add_serve_options(serve)
    _add_plugin_path(serve)
    serve.set_defaults(func=_cmd_serve)

    doctor = commands.add_parser(
        "doctor",
        help="report which sandbox layers the subprocess backend can use on this machine",
        description="Detect each sandbox layer of the subprocess backend on this machine and "
        "say what it does, or why it is not available; exit 1 if any is not.",
    )
    doctor.add_argument("--json", action="store_true", help="print JSON instead of text")
    doctor.set_defaults(func=_cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        command: Callable[[argparse.Namespace], int] = args.func
        return command(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BaseException as exc:
        if not _is_interrupt(exc):
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C, possibly wrapped in exception groups by the nurseries it unwound through."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(KeyboardInterrupt)[0] is not None
    return False


# -- shared helpers -------------------------------------------------------------------------


def _registry(paths: Sequence[Path], *, strict: bool) -> PluginRegistry:
    """Installed plugins plus ``paths``; a bad path is a usage error when ``strict``."""
    registry = PluginRegistry.from_entry_points()
    for path in paths:
        try:
            registry.load_path(path, replace=True)
        except ManifestError as exc:
            if strict:
                raise UsageError(f"--plugin-path: {exc.message}") from None
            registry.load_errors.append(exc)
    return registry


def _jsonable(value: object) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$base64": base64.b64encode(bytes(value)).decode("ascii")}
    if attrs.has(type(value)):
        return attrs.asdict(value)  # type: ignore[arg-type]
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    return repr(value)


def _dumps(value: Any, *, indent: int | None = None) -> str:
    return json.dumps(value, default=_jsonable, ensure_ascii=False, indent=indent)


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _as_execution_error(exc: Exception) -> ExecutionError:
    """The ExecutionError ``exc`` is or wraps (nurseries group errors), else UNKNOWN_ERROR."""
    if isinstance(exc, ExecutionError):
        return exc
    if isinstance(exc, ExceptionGroup):
        matched, rest = exc.split(ExecutionError)
        if matched is not None and rest is None:
            return _as_execution_error(matched.exceptions[0])
    return ExecutionError(
        f"internal error: {type(exc).__name__}: {exc}",
        details={"traceback": "".join(traceback.format_exception(exc))},
    )


# -- run ------------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    registry = _registry(args.plugin_path, strict=True)
    try:
        with _prints_to_stderr():
            result = trio.run(_run, registry, args)
    except Exception as exc:
        error = _as_execution_error(exc)
    else:
        if result.ok:
            print(_dumps(_result_dict(result)))
            return EXIT_OK
        assert result.error is not None
        error = result.error
    print(_dumps({"ok": False, "error": error.to_dict()}))
    return EXIT_FAILED


@contextlib.contextmanager
def _prints_to_stderr() -> Iterator[None]:
    """Keep stdout for the JSON answer alone: while the execution runs, whatever a handler
    prints (through ``sys.stdout`` or to fd 1, in this process or a child that inherits it)
    goes to stderr."""
    sys.stdout.flush()
    saved_fd, saved_stream = os.dup(1), sys.stdout
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved_fd, 1)
        os.close(saved_fd)
        sys.stdout = saved_stream


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
                    print(_event_line(event), file=sys.stderr, flush=True)
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
    return f"[{event.kind}] {_dumps(data)}"


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


# -- plugins --------------------------------------------------------------------------------


def _cmd_plugins(args: argparse.Namespace) -> int:
    registry = _registry(args.plugin_path, strict=False)
    manifests = sorted(registry, key=lambda m: m.id)
    if args.json:
        print(
            _dumps(
                {
                    "plugins": [_manifest_dict(m) for m in manifests],
                    "errors": [e.to_dict() for e in registry.load_errors],
                },
                indent=2,
            )
        )
    else:
        _print_plugins(manifests, registry.load_errors, sys.stdout)
    return EXIT_FAILED if registry.load_errors else EXIT_OK


def _manifest_dict(manifest: PluginManifest) -> dict[str, Any]:
    return {
        "id": manifest.id,
        "version": manifest.version,
        "description": manifest.description,
        "root": manifest.root,
        "handlers": [
            {
                "id": h.id,
                "entry": h.entry,
                "timeout": h.timeout,
                "warmup": h.warmup,
                # What the handler runs with: its own permissions replace the plugin's.
                "permissions": attrs.asdict(manifest.permissions_for(h)),
                "permissions_overridden": h.permissions is not None,
            }
            for h in manifest.handlers
        ],
        "channels": [
            {"path": c.path, "entry": c.entry, "style": c.style} for c in manifest.channels
        ],
        "permissions": attrs.asdict(manifest.permissions),
    }


def _print_plugins(
    manifests: Sequence[PluginManifest], errors: Sequence[ManifestError], out: TextIO
) -> None:
    if not manifests:
        print("no plugins found", file=out)
    for manifest in manifests:
        title = f"{manifest.id} {manifest.version}"
        if manifest.description:
            title += f" - {manifest.description}"
        print(title, file=out)
        if manifest.root:
            print(f"  root: {manifest.root}", file=out)
        width = max((len(h.id) for h in manifest.handlers), default=0)
        for h in manifest.handlers:
            extra = f" (timeout {h.timeout:g} s)" if h.timeout is not None else ""
            print(f"  handler  {h.id:<{width}}  {h.entry}{extra}", file=out)
            source = "its own" if h.permissions is not None else "the plugin's"
            granted = _grants(manifest.permissions_for(h)) or "nothing beyond the defaults"
            print(f"  {'':<{width + 9}}  may: {granted} ({source} permissions)", file=out)
        for c in manifest.channels:
            print(f"  channel  {c.path}  {c.entry} ({c.style})", file=out)
    if manifests:
        print(
            "\n(every handler may also read its plugin's root and read and write its "
            "workspace; docs/permissions.md)",
            file=out,
        )
    if errors:
        print(f"\n{len(errors)} plugin(s) failed to load:", file=out)
        for error in errors:
            print(f"  {error.message}", file=out)


def _grants(permissions: Permissions) -> str:
    """The non-empty grants of ``permissions`` as ``name=value`` items, e.g.
    ``fs.read=/data/*, platform=cache, quotas.timeout=5``."""

    def flat(prefix: str, value: Any) -> Iterator[str]:
        if isinstance(value, dict):
            for key, inner in value.items():
                yield from flat(f"{prefix}.{key}" if prefix else key, inner)
        elif value not in (None, (), [], ""):
            shown = ",".join(map(str, value)) if isinstance(value, list | tuple) else value
            yield f"{prefix}={shown}"

    return "; ".join(flat("", attrs.asdict(permissions)))


# -- bench ----------------------------------------------------------------------------------


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    registry = _registry(args.plugin_path, strict=True)
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

    with _prints_to_stderr():
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
        print(_dumps(figures))
    elif args.json:
        Path(args.json).write_text(_dumps(figures, indent=2) + "\n")
    if args.plot:
        try:
            bench.plot(cells, args.plot)
        except ImportError as exc:
            raise UsageError(str(exc)) from None
    return EXIT_OK


# -- demo -----------------------------------------------------------------------------------


@attrs.frozen
class DemoRow:
    backend: str
    handler: str
    ok: bool
    output: str
    duration_ms: float | None = None
    worker_id: str | None = None


def _cmd_demo(args: argparse.Namespace) -> int:
    types: list[str] = args.backends or [t for t in BACKEND_TYPES if t != "auto"]
    registry = PluginRegistry.from_entry_points()
    if DEMO_PLUGIN not in registry:  # running from a source tree without entry points
        from .examples.manifest import manifest

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
        shown = _dumps(result.output) + (f" [{events} events]" if events else "")
    return DemoRow(kind, handler, result.ok, shown, result.duration_s * 1000, result.worker_id)


def _print_table(rows: Sequence[DemoRow], out: TextIO) -> None:
    header = ("backend", "handler", "ok", "output", "ms", "worker")
    cells = [
        (
            r.backend,
            r.handler,
            "yes" if r.ok else "NO",
            _shorten(r.output, _OUTPUT_WIDTH),
            f"{r.duration_ms:.2f}" if r.duration_ms is not None else "-",
            r.worker_id or "-",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    for row in [header, *cells]:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print(line.rstrip(), file=out)


# -- serve ----------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    from .serve_config import ConfigError, build_authorize, load_options

    try:
        options = load_options(
            {name: getattr(args, name) for name in _SERVE_OPTIONS}, config=args.config
        )
        ssl_context = options.ssl_context()
        authorize = build_authorize(options)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    args.serve = (options, ssl_context, authorize)
    args.host, args.port = options.host, options.port
    registry = _registry(args.plugin_path, strict=True)
    if not any(manifest.channels for manifest in registry):
        print(f"{PROG}: error: no discovered plugin declares a channel", file=sys.stderr)
        return EXIT_FAILED
    if not args.grace >= 0:
        raise UsageError(f"--grace must be 0 or more seconds, not {args.grace}")
    try:
        signum = trio.run(_serve, registry, args)
    except OSError as exc:  # the address is taken, or not ours to bind
        print(f"{PROG}: error: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if signum == signal.SIGINT:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


_SERVE_OPTIONS = (
    "host",
    "port",
    "backend",
    "base_path",
    "tls_cert",
    "tls_key",
    "tokens_file",
    "allow_origin",
    "max_connections",
    "max_message_size",
    "idle_timeout",
    "max_queue",
)


async def _serve(registry: PluginRegistry, args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT, then shut down in order; returns the signal.

    Connections run in a nursery of their own, so that on a signal the listener stops
    first, then the backend's shutdown closes every connection with 1001 (at once) and
    gives in-flight executions ``args.grace`` seconds.
    """
    from .channels.http import mount_health_and_metrics
    from .channels.registry import ConnectionRegistry
    from .channels.router import WebSocketRouter
    from .channels.websocket import ChannelLimits, mount_websocket_channels

    options, ssl_context, authorize = args.serve
    router = WebSocketRouter(max_message_size=options.max_message_size)
    tracked = ConnectionRegistry()
    limits = ChannelLimits(
        max_message_size=options.max_message_size,
        max_connections=options.max_connections,
        idle_timeout=options.idle_timeout,
    )
    backend_options = {} if options.max_queue is None else {"max_queue": options.max_queue}
    signum: int = signal.SIGTERM
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with (
            create_execution_backend(
                type=options.backend, registry=registry, **backend_options
            ) as backend,
            trio.open_nursery() as connections,
        ):
            routes = mount_websocket_channels(
                router,
                registry,
                backend=backend,
                connection_registry=tracked,
                base_path=options.base_path,
                authorize=authorize,
                limits=limits,
            )
            mount_health_and_metrics(router.http, backend, tracked)
            async with trio.open_nursery() as listening:
                serve = functools.partial(
                    router.serve, handler_nursery=connections, ssl_context=ssl_context
                )
                server = await listening.start(serve, args.host, args.port)
                origin = f"{options.scheme}://{args.host}:{server.port}"
                listing = ", ".join(f"{origin}{route.path}" for route in routes)
                print(
                    f"serving {len(routes)} channel route(s) with the {backend.name} "
                    f"backend: {listing}"
                )
                for route in routes:
                    print(f"  {origin}{route}")
                sys.stdout.flush()
                async for received in signals:
                    signum = received
                    break
                listening.cancel_scope.cancel()
            await backend.shutdown(drain=True, timeout=args.grace)
    return signum


# -- doctor ---------------------------------------------------------------------------------


def _cmd_doctor(args: argparse.Namespace) -> int:
    import os
    import platform

    from .sandbox import detect

    support = detect()
    machine = {
        "system": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "uid": os.getuid() if hasattr(os, "getuid") else None,
        "python": sys.version.split()[0],
    }
    if args.json:
        layers = {name: attrs.asdict(status) for name, status in support.layers.items()}
        print(_dumps({"machine": machine, "layers": layers}, indent=2))
    else:
        where = ", ".join(f"{key} {value}" for key, value in machine.items())
        print(f"sandbox layers of the subprocess backend on this machine ({where}):")
        width = max(len(name) for name in support.layers)
        for name, status in support.layers.items():
            state = "yes" if status.available else "NO"
            version = ""
            if status.version is not None and str(status.version) not in status.detail:
                what = "ABI" if name == "landlock" else "version"
                version = f" ({what} {status.version})"
            print(f"  {name:<{width}}  {state:<3}  {status.detail}{version}")
        print(
            "yes: the layer works on this machine; NO: it does not, for the reason shown. "
            "sandbox=True uses every layer marked yes; see docs/sandbox.md for what each stops."
        )
    return EXIT_OK if all(s.available for s in support.layers.values()) else EXIT_FAILED
