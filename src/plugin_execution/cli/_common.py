"""What every command shares: exit statuses, usage errors, the registry, JSON output.

Kept apart from the commands so that each command module depends on this one only, never on
another command.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from ..errors import ExecutionError, ManifestError
from ..registry import PluginRegistry

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "PROG",
    "UsageError",
    "add_plugin_path",
    "as_execution_error",
    "dumps",
    "json_object",
    "json_value",
    "load_registry",
    "prints_to_stderr",
    "shorten",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

PROG = "plugin-execution"


class UsageError(Exception):
    """A mistake in the command line, found after argparse accepted it."""


# -- arguments ------------------------------------------------------------------------------


def backend_names(text: str, choices: Sequence[str]) -> list[str]:
    """An argparse type's body: ``in-process`` or ``in-process,subprocess``, each one of
    ``choices``."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in choices]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown backend(s) {unknown}; choose from {', '.join(choices)}"
        )
    return names


def json_value(text: str) -> Any:
    """An argparse type: JSON text (``-``: read from stdin)."""
    if text == "-":
        text = sys.stdin.read()
        if not text.strip():
            raise argparse.ArgumentTypeError("'-' reads JSON from stdin, and stdin was empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {shorten(text, 60)}") from None


def json_object(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object."""
    value = json_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}")
    return value


def add_plugin_path(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugin-path",
        metavar="PATH",
        action="append",
        default=[],
        type=Path,
        help="a plugin.toml file, or a directory holding one, to load on top of the installed "
        "plugins (repeatable; wins over an installed plugin with the same id)",
    )


def load_registry(paths: Sequence[Path], *, strict: bool) -> PluginRegistry:
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


# -- output ---------------------------------------------------------------------------------


def _jsonable(value: object) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$base64": base64.b64encode(bytes(value)).decode("ascii")}
    if attrs.has(type(value)):
        return attrs.asdict(value)  # type: ignore[arg-type]
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    return repr(value)


def dumps(value: Any, *, indent: int | None = None) -> str:
    """``value`` as JSON; bytes as ``{"$base64": ...}``, attrs classes as dicts."""
    return json.dumps(value, default=_jsonable, ensure_ascii=False, indent=indent)


#: What a terminal may act on: C0 controls but tab and newline, DEL and the C1 controls.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` for a person's terminal: its control characters (but tab and newline)
    shown as ``\\xNN`` escapes, so what a plugin wrote (a log line, a print, an event)
    cannot drive the terminal: set its title, clear it, colour it, write the clipboard."""
    return _CONTROLS.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def as_execution_error(exc: Exception) -> ExecutionError:
    """The ExecutionError ``exc`` is or wraps (nurseries group errors), else UNKNOWN_ERROR."""
    if isinstance(exc, ExecutionError):
        return exc
    if isinstance(exc, ExceptionGroup):
        matched, rest = exc.split(ExecutionError)
        if matched is not None and rest is None:
            return as_execution_error(matched.exceptions[0])
    return ExecutionError(
        f"internal error: {type(exc).__name__}: {exc}",
        details={"traceback": "".join(traceback.format_exception(exc))},
    )


@contextlib.contextmanager
def prints_to_stderr() -> Iterator[None]:
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
