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

One module per command (``_run``, ``_plugins``, ``_bench``, ``_demo``, ``_serve``,
``_doctor``), each declaring its own arguments; ``_common`` holds what they share.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import _bench, _demo, _doctor, _plugins, _run, _serve
from ._common import EXIT_FAILED as EXIT_FAILED
from ._common import EXIT_INTERRUPTED as EXIT_INTERRUPTED
from ._common import EXIT_OK as EXIT_OK
from ._common import EXIT_USAGE as EXIT_USAGE
from ._common import PROG, UsageError

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "main",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run plugin handlers in-process, in worker pools or in subprocesses.",
        epilog="exit status: 0 ok, 1 execution/plugin failure, 2 usage error, 130 interrupted",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (_run, _plugins, _bench, _demo, _serve, _doctor):
        command.add_parser(commands)
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
