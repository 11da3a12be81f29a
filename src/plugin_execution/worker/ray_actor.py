"""The worker side of the Ray backend: a Ray actor that hosts the worker runtime.

The actor connects back to the host over TCP, proves it was started by this backend (the
backend's secret token, then which start it answers), and from then on is an ordinary worker:
the same runtime as a thread worker (``worker/in_thread.py``), on the same wire protocol, on
a thread of the actor's process. Platform calls go back over the connection and are checked
and served on the host, as for every worker.

What differs from a worker on the host's machine is the filesystem: a plugin's root and an
execution's workspace are host paths. A root that does not exist on the actor's node is
looked up among the directories Ray shipped in the actor's ``runtime_env`` (``py_modules``,
by the root's directory name); a workspace whose parent does not exist here is made under
this node's temporary directory and removed after its execution.

Nothing here imports Ray: the host wraps :class:`RayWorkerActor` with ``ray.remote``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import sys
import tempfile
from typing import Any

from ._wire import FIELDS
from .execution import Executions
from .runtime import Worker

__all__ = ["PREAMBLE", "RayWorkerActor", "pack_preamble"]

#: What a connecting actor sends before the first frame: the token (32 bytes), then a JSON
#: object (its start id, node id, pid) of the length in the 2-byte big-endian prefix.
PREAMBLE = struct.Struct("!32sH")
_CONNECT_TIMEOUT_S = 30.0
_EXECUTE_FIELDS = FIELDS["execute"]


def pack_preamble(token: bytes, hello: dict[str, Any]) -> bytes:
    body = json.dumps(hello).encode()
    return PREAMBLE.pack(token, len(body)) + body


class _ActorExecutions(Executions):
    """An actor's executions: a workspace made on this node (see ``_ActorWorker``) is
    removed before the caller hears of the outcome: the host cannot remove it."""

    local_workspaces: dict[str, str]

    def _finish(self, execution_id: str, **kwargs: Any) -> None:
        local = self.local_workspaces.pop(execution_id, None)
        if local is not None:
            shutil.rmtree(local, ignore_errors=True)
        super()._finish(execution_id, **kwargs)


class _ActorWorker(Worker):
    """The worker runtime inside an actor: prints become ``log`` events (the process is the
    actor's own), host paths are mapped onto this node (see the module docstring)."""

    def __init__(self, sock: socket.socket, shipped: list[str]) -> None:
        super().__init__(sock.fileno(), in_thread=True, close=sock.close)
        self._executions = executions = _ActorExecutions(
            self.send,
            self._threads,
            self._platform,
            self._channels,
            self._exit,
            in_thread=True,
            send_message=self._writer.send_message,
        )
        self._local_workspaces: dict[str, str] = {}  # by execution id: made on this node
        executions.local_workspaces = self._local_workspaces
        self._shipped = set(shipped)
        self._roots: dict[str, str] = {}
        self._node_tmp: str | None = None

    def serve(self) -> None:
        saved = sys.stdout, sys.stderr
        sys.stdout = self._executions.stdout
        sys.stderr = self._executions.stderr
        try:
            super().serve()
        finally:
            sys.stdout, sys.stderr = saved
            if self._node_tmp is not None:  # with what abandoned executions left there
                shutil.rmtree(self._node_tmp, ignore_errors=True)

    def _dispatch(self, tag: str, msg: dict[str, Any]) -> None:
        if tag in ("execute", "warmup"):
            self._localize(msg)
        elif tag == "batch":  # each member as an execute (a malformed one: the runtime's)
            for member in msg["executes"]:
                if type(member) is dict and member.keys() == _EXECUTE_FIELDS:
                    self._localize(member)
        super()._dispatch(tag, msg)

    def _localize(self, msg: dict[str, Any]) -> None:
        """Map an ``execute``'s (or a ``warmup``'s) host paths onto this node."""
        root = msg.get("root")
        if root in self._shipped:
            msg["root"] = self._local_root(root)
        workspace = msg.get("workspace")
        if workspace and not os.path.isdir(os.path.dirname(workspace)):
            if self._node_tmp is None:
                self._node_tmp = tempfile.mkdtemp(prefix="plugin-execution-ray-")
            local = os.path.join(self._node_tmp, os.path.basename(workspace))
            self._local_workspaces[msg["execution_id"]] = local
            msg["workspace"] = local

    def _local_root(self, root: str) -> str:
        """``root`` itself when this node has it, else its copy that ``runtime_env`` shipped
        (``py_modules``: a directory on ``sys.path`` holds it under its own name)."""
        local = self._roots.get(root)
        if local is None:
            local = root
            if not os.path.isdir(root):
                name = os.path.basename(os.path.normpath(root))
                for entry in sys.path:
                    candidate = os.path.join(entry, name)
                    if entry and os.path.isdir(candidate):
                        local = candidate
                        break
            self._roots[root] = local
        return local


class RayWorkerActor:
    """One worker: :meth:`serve` connects to the host and serves until the host closes the
    connection or says ``Shutdown``. Meant to be started with ``max_restarts=0``: a lost
    actor is replaced by the pool, never restarted behind its back."""

    def serve(
        self, host: str, port: int, token: bytes, start_id: str, roots: list[str]
    ) -> dict[str, Any]:
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        sock = socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S)
        try:
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = {"start": start_id, "node_id": node_id, "pid": os.getpid()}
            sock.sendall(pack_preamble(token, hello))
        except BaseException:
            sock.close()
            raise
        _ActorWorker(sock, roots).serve()
        return {"node_id": node_id, "pid": os.getpid()}
