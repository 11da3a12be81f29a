"""The host side of the worker protocol: the host's handles on its workers.

The mirror of :mod:`plugin_execution.worker` (the child side). One concept per module:

- :mod:`.handle`: the interfaces backends use, ``WorkerHandle`` and ``WorkerLauncher``
  (types only);
- :mod:`.connection`: the socket: framing, non-blocking writes, reading and polling;
- :mod:`.calls`: the requests in flight: executions, deadlines, pings, platform calls;
- :mod:`.process`: ``WorkerProcess``, the handle (lifecycle: kill, reap, stderr, why it
  died), ``serve_worker`` and ``open_worker_process``;
- :mod:`.launchers`: what starts handles of one kind (process, thread);
- :mod:`.zygote`: the warm helper that forks worker processes, and its keeper;
- :mod:`.thread`: workers on threads of the host;
- :mod:`.child`, :mod:`.limits`: leaf types (what a worker's process is; its rlimits).

A new kind of worker that speaks the protocol over a stream socket needs no new handle:
``serve_worker(child, host_socket, stderr, kill=...)`` serves it (see :mod:`.process`).
"""

from .child import ChildProcess as ChildProcess
from .handle import ExitCause as ExitCause
from .handle import WorkerHandle as WorkerHandle
from .handle import WorkerLauncher as WorkerLauncher
from .launchers import ProcessLauncher as ProcessLauncher
from .launchers import ThreadLauncher as ThreadLauncher
from .limits import WorkerLimits as WorkerLimits
from .process import WorkerProcess as WorkerProcess
from .process import open_worker_process as open_worker_process
from .process import serve_worker as serve_worker

__all__ = [
    "ChildProcess",
    "ExitCause",
    "ProcessLauncher",
    "ThreadLauncher",
    "WorkerHandle",
    "WorkerLauncher",
    "WorkerLimits",
    "WorkerProcess",
    "open_worker_process",
    "serve_worker",
]
