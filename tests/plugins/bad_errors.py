"""Handlers that fail in ways that are hard to report (tests/test_error_reporting.py).

``raise_sync`` / ``raise_async`` raise the exception ``CASES[input["case"]]()`` builds; the
other handlers fail while being loaded or warmed up, or say who runs them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from plugin_execution.errors import ValidationError

HUGE = 10 * 1024 * 1024


class StrRaises(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")


class StrAndReprRaise(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ is broken")


class StrRaisesSystemExit(Exception):
    """Rendering it raises what would end a process."""

    def __str__(self) -> str:
        raise SystemExit(9)

    def __repr__(self) -> str:
        raise KeyboardInterrupt


class StrNotAString(Exception):
    def __str__(self) -> Any:
        return 42


class OwnBaseException(BaseException):
    """Neither Exception nor one of Python's own BaseExceptions."""


class _NoSource:
    """A module loader whose source lookup raises: ``traceback`` fails on its frames."""

    def get_source(self, name: str) -> str:
        raise RuntimeError("source lookup is broken")


def _raise_from_sourceless_frame() -> BaseException:
    scope: dict[str, Any] = {"__name__": "sourceless", "__loader__": _NoSource()}
    code = "def fail():\n    raise ValueError('raised where no source can be found')\n"
    exec(compile(code, "/nonexistent/sourceless.py", "exec"), scope)
    try:
        scope["fail"]()
    except ValueError as exc:
        return exc
    raise AssertionError("unreachable")


def _cyclic_context() -> BaseException:
    first, second = ValueError("first"), ValueError("second")
    first.__context__ = second
    second.__context__ = first
    return first


def _cause_that_cannot_render() -> BaseException:
    exc = ValueError("the outer error renders")
    exc.__cause__ = StrAndReprRaise()
    return exc


def _sourceless_cause() -> BaseException:
    exc = ValueError("the outer error renders")
    exc.__cause__ = _raise_from_sourceless_frame()
    return exc


def _bad_details() -> BaseException:
    return ValidationError(
        "details that cannot be sent",
        details={"object": object(), "huge": "y" * HUGE, "set": {1, 2}, 3: "int key"},
    )


def _group() -> BaseException:
    return ExceptionGroup("several", [StrAndReprRaise(), ValueError("plain")])


def _recursion(depth: int = 0) -> BaseException:
    try:
        return _recursion(depth + 1)
    except RecursionError as exc:
        return exc


CASES: dict[str, Callable[[], BaseException]] = {
    "str_raises": StrRaises,
    "str_and_repr_raise": StrAndReprRaise,
    "str_raises_system_exit": StrRaisesSystemExit,
    "str_not_a_string": StrNotAString,
    "unserialisable_args": lambda: ValueError(object(), {1, 2}, lambda: None),
    "huge_message": lambda: ValueError("x" * HUGE),
    "huge_args": lambda: ValueError(b"\0" * HUGE),
    "system_exit": lambda: SystemExit(3),
    "keyboard_interrupt": KeyboardInterrupt,
    "generator_exit": GeneratorExit,
    "own_base_exception": lambda: OwnBaseException("mine"),
    "sourceless_frame": _raise_from_sourceless_frame,
    "sourceless_cause": _sourceless_cause,
    "cause_that_cannot_render": _cause_that_cannot_render,
    "cyclic_context": _cyclic_context,
    "group": _group,
    "recursion": _recursion,
    "bad_details": _bad_details,
}


def raise_sync(ctx: Any, input: dict[str, str]) -> None:
    raise CASES[input["case"]]()


async def raise_async(ctx: Any, input: dict[str, str]) -> None:
    raise CASES[input["case"]]()


def pid(ctx: Any, input: Any) -> int:
    return os.getpid()


class BadWarmup:
    """A class handler whose warm-up hook raises an exception that cannot be rendered."""

    def warmup(self) -> None:
        raise StrRaisesSystemExit()

    def execute(self, ctx: Any, input: Any) -> str:
        return "ran"
