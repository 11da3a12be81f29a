"""plugin-execution: run plugin handlers for trio applications.

The public API is re-exported here, explicitly. Names load on first use (PEP 562): a worker
child imports ``plugin_execution.worker`` through this package and must not pay for trio,
attrs and cattrs when the handler it runs needs none of them.
"""

from __future__ import annotations

import importlib

from ._version import __version__ as __version__

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs a fresh child ~5 ms
if TYPE_CHECKING:
    from typing import Any

    from .backends.base import ExecutionBackend as ExecutionBackend
    from .backends.in_process import InProcessBackend as InProcessBackend
    from .backends.ray import RayBackend as RayBackend
    from .backends.subprocess import SubprocessBackend as SubprocessBackend
    from .backends.worker_pool import WorkerPoolBackend as WorkerPoolBackend
    from .channels.channel import Channel as Channel
    from .channels.channel import ChannelClosed as ChannelClosed
    from .channels.events import WSInput as WSInput
    from .channels.events import WSSender as WSSender
    from .channels.events import envelope as envelope
    from .channels.registry import ConnectionInfo as ConnectionInfo
    from .channels.registry import ConnectionRegistry as ConnectionRegistry
    from .channels.router import HandshakeRejected as HandshakeRejected
    from .channels.router import WebSocketRouter as WebSocketRouter
    from .channels.websocket import ChannelLimits as ChannelLimits
    from .channels.websocket import ChannelRoute as ChannelRoute
    from .channels.websocket import mount_websocket_channels as mount_websocket_channels
    from .context import ExecutionContext as ExecutionContext
    from .errors import AbortedError as AbortedError
    from .errors import AcquireTimeoutError as AcquireTimeoutError
    from .errors import BackendClosedError as BackendClosedError
    from .errors import ExecutionError as ExecutionError
    from .errors import ExecutionTimeoutError as ExecutionTimeoutError
    from .errors import HandlerContractError as HandlerContractError
    from .errors import HandlerError as HandlerError
    from .errors import HandlerNotFoundError as HandlerNotFoundError
    from .errors import InvalidRequestError as InvalidRequestError
    from .errors import ManifestError as ManifestError
    from .errors import PermissionDeniedError as PermissionDeniedError
    from .errors import PluginNotFoundError as PluginNotFoundError
    from .errors import PluginQuarantinedError as PluginQuarantinedError
    from .errors import QueueFullError as QueueFullError
    from .errors import ValidationError as ValidationError
    from .errors import WorkerCrashedError as WorkerCrashedError
    from .errors import WorkerUnhealthyError as WorkerUnhealthyError
    from .errors import WorkspaceError as WorkspaceError
    from .factory import create_execution_backend as create_execution_backend
    from .manifest import ChannelSpec as ChannelSpec
    from .manifest import HandlerSpec as HandlerSpec
    from .manifest import Permissions as Permissions
    from .manifest import PluginManifest as PluginManifest
    from .manifest import Quotas as Quotas
    from .manifest import load_manifest as load_manifest
    from .platform import CacheBackend as CacheBackend
    from .platform import EventBus as EventBus
    from .platform import FileStorage as FileStorage
    from .platform import MemoryCache as MemoryCache
    from .platform import Platform as Platform
    from .platform import StorageBackend as StorageBackend
    from .platform_client import FetchResponse as FetchResponse
    from .platform_client import ShellResult as ShellResult
    from .registry import PluginRegistry as PluginRegistry
    from .run_many import MapResults as MapResults
    from .streaming import Execution as Execution
    from .supervisor import ChildCounts as ChildCounts
    from .supervisor import ChildSpec as ChildSpec
    from .supervisor import DynamicChild as DynamicChild
    from .supervisor import DynamicSupervisor as DynamicSupervisor
    from .supervisor import Supervisor as Supervisor
    from .supervisor import SupervisorError as SupervisorError
    from .supervisor import open_dynamic_supervisor as open_dynamic_supervisor
    from .supervisor import open_supervisor as open_supervisor
    from .types import ExecutionEvent as ExecutionEvent
    from .types import ExecutionRequest as ExecutionRequest
    from .types import ExecutionResult as ExecutionResult
    from .types import ExecutionStats as ExecutionStats
    from .types import HealthStatus as HealthStatus
    from .types import LatencySummary as LatencySummary
    from .workspace import WorkspaceLease as WorkspaceLease
    from .workspace import WorkspaceManager as WorkspaceManager

_EXPORTS: dict[str, str] = {
    "ExecutionBackend": "backends.base",
    "InProcessBackend": "backends.in_process",
    "RayBackend": "backends.ray",
    "SubprocessBackend": "backends.subprocess",
    "WorkerPoolBackend": "backends.worker_pool",
    "Channel": "channels.channel",
    "ChannelClosed": "channels.channel",
    "WSInput": "channels.events",
    "WSSender": "channels.events",
    "envelope": "channels.events",
    "ConnectionInfo": "channels.registry",
    "ConnectionRegistry": "channels.registry",
    "HandshakeRejected": "channels.router",
    "WebSocketRouter": "channels.router",
    "ChannelLimits": "channels.websocket",
    "ChannelRoute": "channels.websocket",
    "mount_websocket_channels": "channels.websocket",
    "ExecutionContext": "context",
    "AbortedError": "errors",
    "AcquireTimeoutError": "errors",
    "BackendClosedError": "errors",
    "ExecutionError": "errors",
    "ExecutionTimeoutError": "errors",
    "HandlerContractError": "errors",
    "HandlerError": "errors",
    "HandlerNotFoundError": "errors",
    "InvalidRequestError": "errors",
    "ManifestError": "errors",
    "PermissionDeniedError": "errors",
    "PluginNotFoundError": "errors",
    "PluginQuarantinedError": "errors",
    "QueueFullError": "errors",
    "ValidationError": "errors",
    "WorkerCrashedError": "errors",
    "WorkerUnhealthyError": "errors",
    "WorkspaceError": "errors",
    "create_execution_backend": "factory",
    "ChannelSpec": "manifest",
    "HandlerSpec": "manifest",
    "Permissions": "manifest",
    "PluginManifest": "manifest",
    "Quotas": "manifest",
    "load_manifest": "manifest",
    "CacheBackend": "platform",
    "EventBus": "platform",
    "FileStorage": "platform",
    "MemoryCache": "platform",
    "Platform": "platform",
    "StorageBackend": "platform",
    "FetchResponse": "platform_client",
    "ShellResult": "platform_client",
    "PluginRegistry": "registry",
    "MapResults": "run_many",
    "Execution": "streaming",
    "ChildCounts": "supervisor",
    "ChildSpec": "supervisor",
    "DynamicChild": "supervisor",
    "DynamicSupervisor": "supervisor",
    "Supervisor": "supervisor",
    "SupervisorError": "supervisor",
    "open_dynamic_supervisor": "supervisor",
    "open_supervisor": "supervisor",
    "ExecutionEvent": "types",
    "ExecutionRequest": "types",
    "ExecutionResult": "types",
    "ExecutionStats": "types",
    "HealthStatus": "types",
    "LatencySummary": "types",
    "WorkspaceLease": "workspace",
    "WorkspaceManager": "workspace",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'plugin_execution' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
