"""ChildProcess: what the host needs of a started worker's process, whatever started it.

A ``trio.Process``, a zygote's :class:`~plugin_execution.host.zygote.ZygoteChild`, a thread
standing in for a process (:mod:`~plugin_execution.host.thread`), or a sandbox wrapper's
adopted process all fit. A leaf module: the sandbox names the type without importing the host.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["ChildProcess"]


class ChildProcess(Protocol):
    """What a worker needs of its process: a ``trio.Process``, a zygote's child, or a
    stand-in for a worker that is no process of its own (its ``pid`` is then None).

    A stand-in for a worker that is no child of the host (a Ray actor, see
    :mod:`~plugin_execution.host.ray`) may also have ``describe_exit() -> (how, details)``:
    how it ended, in words and details for its crash error (its own exit status is then
    only the host's summary: ``-SIGKILL`` for killed from outside, else ``1`` or ``0``)."""

    @property
    def pid(self) -> int | None: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...
