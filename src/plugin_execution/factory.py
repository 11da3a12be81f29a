"""create_execution_backend: pick a backend by name, so call sites never change."""

from __future__ import annotations

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
    raise InvalidRequestError(
        f"unknown backend type {type!r}; choose one of: {', '.join(BACKEND_TYPES)}"
    )


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
    if workspace is not None and not isinstance(workspace, WorkspaceManager):
        workspace = WorkspaceManager(root=workspace)
    try:
        return cls(registry=registry, platform=platform, workspace=workspace, **backend_options)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"bad option for the {type} backend: {exc}") from None
