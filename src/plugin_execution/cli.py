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

``run`` prints JSON on stdout. Handler outputs may contain ``bytes``, which JSON cannot carry:
they are printed as ``{"$base64": "..."}``.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs
import trio

from .backends.base import ExecutionBackend
from .errors import ExecutionError, InvalidRequestError, ManifestError
from .factory import BACKEND_TYPES, create_execution_backend
from .manifest import PluginManifest
from .registry import PluginRegistry
from .types import ExecutionRequest, ExecutionResult

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
        required=True,
        type=_json_value,
        metavar="JSON",
        help="the handler's input, as JSON ('-' reads it from stdin)",
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
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument(
        "--port", type=int, default=8765, help="port to bind (default 8765; 0: any free port)"
    )
    serve.add_argument("--backend", choices=BACKEND_TYPES, default="auto")
    serve.add_argument(
        "--base-path",
        default="/v1/ws/plugins",
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


async def _run(registry: PluginRegistry, args: argparse.Namespace) -> ExecutionResult:
    request = ExecutionRequest(
        plugin_id=args.plugin_id,
        handler_id=args.handler_id,
        input=args.input,
        context={"host": "cli", **args.context},
        timeout=args.timeout,
    )
    async with create_execution_backend(type=args.backend, registry=registry) as backend:
        return await backend.execute(request, raise_errors=False)


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
            {"id": h.id, "entry": h.entry, "timeout": h.timeout, "warmup": h.warmup}
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
        for c in manifest.channels:
            print(f"  channel  {c.path}  {c.entry} ({c.style})", file=out)
    if errors:
        print(f"\n{len(errors)} plugin(s) failed to load:", file=out)
        for error in errors:
            print(f"  {error.message}", file=out)


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
            if "unknown backend" in exc.message:
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


async def _serve(registry: PluginRegistry, args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT, then shut down in order; returns the signal.

    Connections run in a nursery of their own, so that on a signal the listener stops
    first, then the backend's shutdown closes every connection with 1001 (at once) and
    gives in-flight executions ``args.grace`` seconds.
    """
    from .channels.router import WebSocketRouter
    from .channels.websocket import mount_websocket_channels

    router = WebSocketRouter()
    signum: int = signal.SIGTERM
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with (
            create_execution_backend(type=args.backend, registry=registry) as backend,
            trio.open_nursery() as connections,
        ):
            routes = mount_websocket_channels(
                router, registry, backend=backend, base_path=args.base_path
            )
            async with trio.open_nursery() as listening:
                serve = functools.partial(router.serve, handler_nursery=connections)
                server = await listening.start(serve, args.host, args.port)
                origin = f"ws://{args.host}:{server.port}"
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
            version = f" [{status.version}]" if status.version is not None else ""
            print(f"  {name:<{width}}  {state:<3}  {status.detail}{version}")
        print("sandbox=True uses every layer marked yes; see docs/sandbox.md for what each stops.")
    return EXIT_OK if all(s.available for s in support.layers.values()) else EXIT_FAILED
