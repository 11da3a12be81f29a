"""plugin-execution for asyncio applications (FastAPI, Starlette, aiohttp...).

The same backends and the same API as :mod:`plugin_execution`, awaited from asyncio: trio
runs as a guest on the asyncio loop (``trio.lowlevel.start_guest_run``), one guest run shared
by every backend of the loop. See docs/asyncio.md.

Public names are defined in private modules and re-exported here, explicitly.
"""

from __future__ import annotations

from ._backend import AsyncioBackend as AsyncioBackend
from ._backend import Execution as Execution
from ._backend import ExecutionEvents as ExecutionEvents
from ._backend import MapResults as MapResults
from ._backend import create_execution_backend as create_execution_backend
from ._channels import ASGIChannels as ASGIChannels

__all__ = [
    "ASGIChannels",
    "AsyncioBackend",
    "Execution",
    "ExecutionEvents",
    "MapResults",
    "create_execution_backend",
]
