"""``plugin-execution serve``: every discovered plugin's WebSocket channels, for operators.

Runs until SIGTERM (what systemd and container runtimes send) or SIGINT (Ctrl-C): it stops
listening, closes every connection with 1001 (going away) at once, gives in-flight executions
``--grace`` seconds to finish (then stops them), and exits 0 on SIGTERM, 130 on SIGINT. The
operator's options (TLS, tokens, origins, limits) are read by :mod:`..serve_config`.
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
from pathlib import Path

import trio

from ..factory import BACKEND_TYPES, create_execution_backend
from ..registry import PluginRegistry
from ._common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    PROG,
    UsageError,
    add_plugin_path,
    load_registry,
)

__all__ = ["add_parser"]


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    _add_operator_options(serve)
    add_plugin_path(serve)
    serve.set_defaults(func=_cmd_serve)


def _add_operator_options(serve: argparse.ArgumentParser) -> None:
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


def _cmd_serve(args: argparse.Namespace) -> int:
    from ..serve_config import ConfigError, build_authorize, load_options

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
    registry = load_registry(args.plugin_path, strict=True)
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
    from ..channels.http import mount_health_and_metrics
    from ..channels.registry import ConnectionRegistry
    from ..channels.router import WebSocketRouter
    from ..channels.websocket import ChannelLimits, mount_websocket_channels

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
