"""Importing a handler entry and calling it the same way whatever its shape.

A handler is ``async def run(ctx, input)``, ``def run(ctx, input)``, or a class / object with
``execute(ctx, input)`` and optional ``warmup()`` / ``describe()``. When the input parameter
is annotated with an attrs class, the input is structured into it with cattrs; an attrs
output is unstructured back to plain data.

Standard library only at import time: worker children load this module at start-up, and
cattrs is imported only for handlers that declare typed input or output.
"""

from __future__ import annotations

import builtins
import importlib
import sys

from .errors import (
    HandlerContractError,
    HandlerNotFoundError,
    ValidationError,
    format_traceback,
    safe_text,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Handler", "import_entry", "load_handler"]

_CO_COROUTINE = 0x80
_CO_VARARGS = 0x04
_CO_VARKEYWORDS = 0x08


def import_entry(entry: str, root: str | None = None) -> Any:
    """Import ``"pkg.module:attr.path"``, with the plugin's ``root`` on ``sys.path``.

    Raises :class:`HandlerNotFoundError` naming the entry and why it failed to import.
    """
    module_name, _, attr_path = entry.partition(":")
    if not module_name or not attr_path:
        raise HandlerNotFoundError(
            f"entry {entry!r} is not of the form 'package.module:attribute'",
            details={"entry": entry},
        )
    if root and root not in sys.path:
        sys.path.insert(0, root)
    try:
        obj: Any = importlib.import_module(module_name)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):  # in-process, it may be the user's Ctrl-C
            raise
        raise HandlerNotFoundError(
            f"entry {entry!r}: module {module_name!r} failed to import: "
            f"{type(exc).__name__}: {safe_text(exc)}{_where(exc, module_name, root)}",
            details={"entry": entry, "traceback": format_traceback(exc)},
        ) from None
    for name in attr_path.split("."):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise HandlerNotFoundError(
                f"entry {entry!r}: {module_name!r} has no attribute {attr_path!r}",
                details={"entry": entry},
            ) from None
    return obj


def _where(exc: BaseException, module_name: str, root: str | None) -> str:
    """Where the entry's own module was looked for, when that is what was not found."""
    missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    if not missing or not (module_name + ".").startswith(missing + "."):
        return ""  # found, or what is missing is something the plugin imports
    if root is None:
        return (
            "; the plugin has no root: give its manifest one (the directory holding "
            f"{missing.partition('.')[0]!r}), or install the plugin"
        )
    return f"; it is not under the plugin's root {root}"


def _is_async(fn: Any) -> bool:
    """``inspect.iscoroutinefunction`` without importing inspect (~13 ms in a fresh child)."""
    while True:
        if getattr(fn, "_is_coroutine_marker", None) is not None:
            return True
        inner = getattr(fn, "__func__", None) or getattr(fn, "func", None)  # method / partial
        if inner is None:
            break
        fn = inner
    code = getattr(fn, "__code__", None)
    return code is not None and bool(code.co_flags & _CO_COROUTINE)


def _signature_problem(fn: Any) -> str | None:
    """Why ``fn(ctx, input)`` cannot be called, shown as ``takes (ctx)``; None when it can.

    Read from the code object, without ``inspect`` (~13 ms in a fresh child); a callable
    whose code we cannot see (a builtin, a partial) is given the benefit of the doubt.
    """
    func = getattr(fn, "__func__", fn)  # a bound method's function
    offset = 1 if getattr(fn, "__self__", None) is not None else 0
    if not hasattr(func, "__code__") and not hasattr(fn, "__name__"):  # an object with __call__
        func, offset = type(fn).__call__, 1
    code = getattr(func, "__code__", None)
    if code is None:
        return None
    flags = code.co_flags
    positional = code.co_varnames[offset : code.co_argcount]
    keyword_only = code.co_varnames[code.co_argcount : code.co_argcount + code.co_kwonlyargcount]
    defaults = getattr(func, "__defaults__", None) or ()
    kwdefaults = getattr(func, "__kwdefaults__", None) or {}
    required = len(positional) - len(defaults)
    fits = (len(positional) >= 2 or bool(flags & _CO_VARARGS)) and required <= 2
    if fits and all(name in kwdefaults for name in keyword_only):
        return None
    shown = list(positional)
    extra = code.co_argcount + code.co_kwonlyargcount
    if flags & _CO_VARARGS:
        shown.append("*" + code.co_varnames[extra])
        extra += 1
    elif keyword_only:
        shown.append("*")
    shown += keyword_only
    if flags & _CO_VARKEYWORDS:
        shown.append("**" + code.co_varnames[extra])
    return f"takes ({', '.join(shown)})"


def _attrs_annotation(fn: Any, param_index: int | None) -> Any:
    """The attrs class annotating ``fn``'s parameter (or return, when None), if any."""
    annotations = getattr(fn, "__annotations__", None)
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    if not annotations or code is None:
        return None
    if param_index is None:
        name = "return"
    else:
        offset = 1 if hasattr(fn, "__self__") else 0
        names = code.co_varnames[offset : code.co_argcount]
        if len(names) <= param_index:
            return None
        name = names[param_index]
    hint = annotations.get(name)
    if isinstance(hint, str):
        hint = _resolve_name(hint, getattr(fn, "__globals__", {}))
    return hint if hasattr(hint, "__attrs_attrs__") else None


def _resolve_name(hint: str, namespace: dict[str, Any]) -> Any:
    """Resolve a string annotation that can name an attrs class: ``Name`` or ``mod.Name``.

    Anything else (``dict[str, Any]``, ``X | None``) is not an attrs class, and a name missing
    at run time (imported under TYPE_CHECKING) cannot be one we could build. Avoiding
    ``typing.get_type_hints`` keeps ``typing`` (~5 ms) out of a fresh worker child.
    """
    head, *rest = hint.strip().split(".")
    if not head.isidentifier() or not all(part.isidentifier() for part in rest):
        return None
    obj = namespace.get(head, getattr(builtins, head, None))
    for part in rest:
        obj = getattr(obj, part, None)
    return obj


class Handler:
    """A loaded handler entry, normalised to ``call(ctx, input)``.

    ``is_async`` tells whether ``call`` returns a coroutine (await it in the event loop) or
    runs synchronously (run it off the loop: in a thread or a worker process).
    """

    __slots__ = ("_execute", "_input_type", "_output_type", "_target", "entry", "is_async")

    def __init__(self, entry: str, target: Any) -> None:
        self.entry = entry
        if isinstance(target, type):
            try:
                target = target()
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt):
                    raise
                raise HandlerContractError(
                    f"entry {entry!r}: handler class could not be instantiated without "
                    f"arguments: {type(exc).__name__}: {safe_text(exc)}",
                    details={"entry": entry},
                ) from None
        execute = getattr(target, "execute", None)
        if callable(execute):
            call = execute
        elif callable(target):
            call = target
        else:
            kind = type(target).__name__
            article = "an" if kind[:1].lower() in "aeiou" else "a"
            raise HandlerContractError(
                f"entry {entry!r} is {article} {kind}, not a handler: expected a "
                "function (ctx, input) or an object with execute(ctx, input)",
                details={"entry": entry},
            )
        problem = _signature_problem(call)
        if problem is not None:
            raise HandlerContractError(
                f"entry {entry!r}: the handler {problem}, but it is called with (ctx, input): "
                "give it those two parameters (others need defaults)",
                details={"entry": entry},
            )
        self._target = target
        self._execute = call
        self.is_async = _is_async(call)
        self._input_type = _attrs_annotation(call, 1)
        self._output_type = _attrs_annotation(call, None)

    def call(self, ctx: Any, input: Any) -> Any:
        """Call the handler; a coroutine when :attr:`is_async`."""
        if self._input_type is not None:
            input = self._structure_input(input)
        return self._execute(ctx, input)

    def plain_output(self, output: Any) -> Any:
        """The handler's return value as plain data (attrs outputs are unstructured)."""
        if self._output_type is not None and hasattr(type(output), "__attrs_attrs__"):
            from .converter import converter

            return converter.unstructure(output)
        return output

    def warmup(self) -> Any:
        """Call the handler's ``warmup()`` hook if it has one (may return a coroutine)."""
        hook = getattr(self._target, "warmup", None)
        return hook() if callable(hook) else None

    def describe(self) -> Any:
        hook = getattr(self._target, "describe", None)
        return hook() if callable(hook) else None

    def _structure_input(self, input: Any) -> Any:
        from collections.abc import Mapping

        import cattrs

        from .converter import converter

        if not isinstance(input, Mapping):  # cattrs would blame the first field instead
            name = self._input_type.__name__
            raise ValidationError(
                f"input does not match {name}: expected a mapping of {name}'s fields, got "
                f"{type(input).__name__} @ input",
                details={"field": "input"},
            )

        try:
            return converter.structure(input, self._input_type)
        except Exception as exc:
            problems = cattrs.transform_error(exc, path="input")
            raise ValidationError(
                f"input does not match {self._input_type.__name__}: " + "; ".join(problems),
                details={"field": problems[0].rpartition(" @ ")[2] if problems else None},
            ) from None


def load_handler(entry: str, root: str | None = None) -> Handler:
    """Import ``entry`` and wrap it; raises HandlerNotFoundError / HandlerContractError."""
    return Handler(entry, import_entry(entry, root))
