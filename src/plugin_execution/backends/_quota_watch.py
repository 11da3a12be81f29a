"""Per-execution quotas on a shared, long-lived worker process, enforced from the host.

A pool worker serves many executions, so an rlimit (what the subprocess backend uses) cannot
be set for one execution and lifted for the next. Instead, while an execution with
``quotas.memory_mb`` or ``quotas.cpu_s`` runs, the host samples the worker in ``/proc``: its
resident memory, and the CPU time it used since the execution started. Past a quota the worker
is killed (its actor replaces it) and the execution fails with ``WorkerCrashedError``,
``details["reason"]`` ``memory_limit`` or ``cpu_limit``, as on the subprocess backend.

Sampling is not a hard limit: a spike shorter than the interval can slip through, and the CPU
time is the whole worker's (with ``max_concurrency_per_worker=1`` that is this execution's).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import trio

from .._groups import unwrap_single
from ..errors import WorkerCrashedError
from ..host.handle import WorkerHandle
from ..manifest import Quotas

if TYPE_CHECKING:
    from ..types import ExecutionResult
    from .job import Job

__all__ = ["SAMPLE_INTERVAL_S", "execute_watched", "watch_quotas"]

SAMPLE_INTERVAL_S = 0.05
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


def _worker_pid(pid: int) -> int:
    """The worker's own pid: ``pid`` itself, or, when ``pid`` is bubblewrap's (a sandboxed
    pool worker), the process bwrap runs (through its pid namespace's init, if any)."""
    for _ in range(3):
        try:
            with open(f"/proc/{pid}/comm", "rb") as comm:
                if comm.read().strip() != b"bwrap":
                    return pid
            with open(f"/proc/{pid}/task/{pid}/children", "rb") as children:
                pids = children.read().split()
        except OSError:
            return pid
        if len(pids) != 1:
            return pid
        pid = int(pids[0])
    return pid


async def watch_quotas(proc: WorkerHandle, quotas: Quotas) -> None:
    """Sample ``proc`` until cancelled; kill it when it goes over ``quotas``.

    Run it next to the execution and cancel it when the execution ends. Returns early if
    the worker is gone, or is no process of its own (a thread: nothing to sample).
    """
    pid = proc.pid
    if pid is None:
        return
    pid = _worker_pid(pid)
    try:
        cpu_start = _cpu_seconds(pid)
    except (OSError, IndexError, ValueError):
        return
    memory = quotas.memory_mb * 1024 * 1024 if quotas.memory_mb is not None else None
    while proc.alive:
        await trio.sleep(SAMPLE_INTERVAL_S)
        try:
            rss = _rss_bytes(pid)
            cpu = _cpu_seconds(pid) - cpu_start
        except (OSError, IndexError, ValueError):
            return  # the process is gone; its reader reports how
        if memory is not None and rss > memory:
            proc.kill(
                WorkerCrashedError(
                    f"the execution went over its memory quota ({quotas.memory_mb} MB; the "
                    f"worker's resident memory was {rss / 2**20:.0f} MB) and its worker was "
                    "replaced",
                    details={"reason": "memory_limit", "quota_mb": quotas.memory_mb},
                )
            )
            return
        if quotas.cpu_s is not None and cpu > quotas.cpu_s:
            proc.kill(
                WorkerCrashedError(
                    f"the execution went over its CPU time quota ({quotas.cpu_s:g} s) and its "
                    "worker was replaced",
                    details={"reason": "cpu_limit", "quota_s": quotas.cpu_s},
                )
            )
            return


async def execute_watched(
    proc: WorkerHandle,
    job: Job,
    quotas: Quotas,
    *,
    backend: str,
    workspace: str,
    cancel_grace: float,
) -> ExecutionResult:
    """Execute ``job`` on ``proc`` with its plugin's memory / CPU ``quotas`` sampled from the
    host meanwhile (:func:`watch_quotas`): a shared worker cannot take per-execution rlimits."""
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_quotas, proc, quotas)
            try:
                return await proc.execute(
                    job, backend=backend, workspace=workspace, cancel_grace=cancel_grace
                )
            finally:
                nursery.cancel_scope.cancel()
