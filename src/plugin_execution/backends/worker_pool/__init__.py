"""WorkerPoolBackend: executions flow through long-lived, warm, supervised worker actors.

Each worker actor is a child of a :mod:`~plugin_execution.supervisor` and owns one worker (a
process by default, or a thread). The dispatcher hands each execution to a worker with spare
capacity, or queues it (bounded: ``QueueFullError``) until one frees up (``acquire_timeout``:
``AcquireTimeoutError``). Time spent queued counts toward the execution's timeout.

Workers are grown to ``max_workers`` under load and shrunk back to ``min_workers`` after
``idle_timeout``; recycled after ``max_executions_per_worker``, ``max_worker_uptime`` or
``max_worker_memory_mb`` (RSS, measured by the health check) without failing any execution;
health-checked by ping every ``health_check_interval``. A worker that dies fails only the
executions it was running (``WorkerCrashedError``).

At no instant are more than ``max_workers`` worker processes alive, counting those starting,
stopping and started ahead for recycling (``details["workers_peak"]``). A worker killed by
the work it ran (a crash, a timeout, quota or health-check kill) is that work's failure: its
slot replaces it at once and the supervisor's restart intensity is not charged; a per-plugin
crash breaker (``_breaker``) refuses a plugin that keeps doing it. Workers failing on their
own (start-up, handshake, dying idle) are restarted by the supervisor, which gives up past
``max_restarts`` within ``restart_window``.

With ``sandbox`` on, every worker serves one plugin, in that plugin's kernel sandbox
(:mod:`.sandboxed`), and workers are placed per plugin (:mod:`.placement`).
"""

from .backend import WorkerPoolBackend

__all__ = ["WorkerPoolBackend"]
