"""create_execution_backend: pick a backend by name, so call sites never change."""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any

from .backends.base import ExecutionBackend
from .errors import InvalidRequestError
from .registry import PluginRegistry
from .workspace import WorkspaceManager

__all__ = ["BACKEND_TYPES", "create_execution_backend"]

BACKEND_TYPES = ("auto", "in-process", "worker-pool", "subprocess", "ray")


def _backend_class(type: str) -> type[ExecutionBackend]:
    if type in ("in-process", "auto"):
        from .backends.in_process import InProcessBackend

        return InProcessBackend
    if type == "worker-pool":
        from .backends.worker_pool import WorkerPoolBackend

        return WorkerPoolBackend
    if type == "subprocess":
        from .backends.subprocess import SubprocessBackend

        return SubprocessBackend
    if type == "ray":
        from .backends.ray import RayBackend

        return RayBackend
    close = difflib.get_close_matches(str(type).replace("_", "-"), BACKEND_TYPES, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise InvalidRequestError(
        f"unknown backend type {type!r}; {hint}choose one of: {', '.join(BACKEND_TYPES)}"
    )


_COMMON = frozenset({"self", "registry", "platform", "workspace"})


def _options(cls: type[ExecutionBackend]) -> dict[str, inspect.Parameter]:
    """The keyword options ``cls`` takes: its constructor's and those it passes on with
    ``**kwargs`` to its bases' (the ones every backend has excluded)."""
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        passes_on = False
        for name, param in inspect.signature(init).parameters.items():
            if param.kind is param.VAR_KEYWORD:
                passes_on = True
            elif param.kind is not param.VAR_POSITIONAL and name not in _COMMON:
                found.setdefault(name, param)
        if not passes_on:
            break
    return found


def _unknown_option(type: str, name: str, known: dict[str, inspect.Parameter]) -> str:
    """What to tell a user who passed option ``name``, which the ``type`` backend lacks."""
    message = f"bad option for the {type} backend: unknown option {name!r}"
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    else:
        for other in ("in-process", "worker-pool", "subprocess"):
            if other != type and name in _options(_backend_class(other)):
                message += f" (it is an option of the {other} backend)"
                break
    return f"{message}; its options: {', '.join(sorted(known))} (docs/backends.md)"


def _bad_value(options: dict[str, Any], known: dict[str, inspect.Parameter]) -> str | None:
    """A number option given as something else (``max_workers="4"``), named, if any."""
    for name, value in options.items():
        annotation = str(known[name].annotation).replace(" ", "")
        if annotation not in _NUMBERS or (value is None and annotation.endswith("|None")):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{name} must be a number, got the {value.__class__.__name__} {value!r}"
    return None


_NUMBERS = frozenset({"int", "float", "int|None", "float|None"})


def create_execution_backend(
    *,
    type: str = "auto",
    registry: PluginRegistry,
    platform: Any = None,
    workspace: WorkspaceManager | str | Path | None = None,
    **backend_options: Any,
) -> ExecutionBackend:
    """Make a backend of ``type``; use it as ``async with create_execution_backend(...) as b``.

    ``auto`` picks ``in-process``. ``workspace`` is a :class:`WorkspaceManager` or a root
    directory for per-execution workspaces. ``backend_options`` go to the backend's
    constructor; an unknown option or a bad value raises :class:`InvalidRequestError`.
    """
    if not isinstance(registry, PluginRegistry):
        raise InvalidRequestError(
            f"registry must be a PluginRegistry, got {registry.__class__.__name__}"
        )
    cls = _backend_class(type)
    known = _options(cls)
    for name in backend_options:
        if name not in known:
            raise InvalidRequestError(_unknown_option(type, name, known))
    if workspace is not None and not isinstance(workspace, WorkspaceManager):
        workspace = WorkspaceManager(root=workspace)
    try:
        return cls(registry=registry, platform=platform, workspace=workspace, **backend_options)
    except (TypeError, ValueError) as exc:
        why = _bad_value(backend_options, known) or str(exc)
        raise InvalidRequestError(f"bad option for the {type} backend: {why}") from None
