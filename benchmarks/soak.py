"""Chaos soak: a mix of well-behaved and misbehaving executions, plus faults from outside.

    python benchmarks/soak.py --backend worker-pool --executions 100000 --concurrency 64
    python benchmarks/soak.py --backend subprocess --executions 5000 --concurrency 16 --json

Mostly echo, with some of every fault a plugin runtime exists to contain (``os._exit``,
busy-loop timeouts, raises, memory-quota kills, exceptions that cannot be rendered, processes
left behind, caller cancellations, async sleeps), while a saboteur SIGKILLs a random worker,
SIGSTOPs one past the health check and kills the zygote. Every execution must end with exactly
one outcome of the kind it asked for; afterwards no process, fd or workspace directory may be
left, and at no instant may more workers be alive than the pool's bound. Reported per kind:
outcomes by code, **unaccounted** executions, **wrong codes**, collateral (an execution whose
worker the saboteur hit), peak live workers (sampled from /proc), leaks, throughput, p50/p99.
Exits 1 on any unaccounted execution, wrong code, leak or bound violation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import trio

from plugin_execution import ExecutionRequest, PluginRegistry, create_execution_backend

HERE = Path(__file__).resolve().parent
PROCESS_BACKENDS = ("worker-pool", "subprocess")
MARKER = f"{1000 + os.getpid() % 1000}.{random.randrange(10**6)}"  # sleep's argument
MEMORY_QUOTA_MB = 128

# kind: (handler, weight, codes it may end with). "cancelled": the caller's own scope fired.
KINDS: dict[str, tuple[str, int, frozenset[str]]] = {
    "echo": ("echo", 760, frozenset({"ok"})),
    "sleep": ("sleep", 60, frozenset({"ok"})),
    "raise": ("raise_", 40, frozenset({"HANDLER_ERROR"})),
    "bad_str": ("bad_str", 30, frozenset({"HANDLER_ERROR"})),
    "cancel": ("sleep", 30, frozenset({"cancelled"})),
    "crash": ("crash", 25, frozenset({"WORKER_CRASHED", "PLUGIN_QUARANTINED"})),
    "timeout": ("busy", 15, frozenset({"TIMEOUT", "PLUGIN_QUARANTINED"})),
    "memory": ("memory", 15, frozenset({"WORKER_CRASHED", "PLUGIN_QUARANTINED"})),
    "fork": ("fork", 25, frozenset({"ok"})),
}
IN_PROCESS_KINDS = ("echo", "sleep", "raise", "bad_str", "cancel")
# What an execution may get when the saboteur killed or stopped the worker it was on.
COLLATERAL = frozenset({"WORKER_CRASHED", "WORKER_UNHEALTHY", "TIMEOUT"})


def soak_registry() -> PluginRegistry:
    """One plugin per kind, all from ``_soak_handlers.py``, by path."""
    registry = PluginRegistry()
    for kind, (handler, _, _) in KINDS.items():
        permissions: dict[str, Any] = {}
        if kind == "memory":
            permissions = {"quotas": {"memory_mb": MEMORY_QUOTA_MB}}
        if kind == "fork":  # the subprocess sandbox refuses fork/exec without this grant
            permissions = {"shell": {"allow": ["/bin/sleep"]}}
        registry.register(
            {
                "id": f"soak.{kind}",
                "version": "1",
                "root": str(HERE),
                "permissions": permissions,
                "handlers": [{"id": handler, "entry": f"_soak_handlers:{handler}"}],
            }
        )
    return registry


# -- /proc ---------------------------------------------------------------------------------


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can read."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(b")", 1)[1].split()
        if fields[0] == b"Z":
            cmdline = "<zombie> " + cmdline
        table[int(name)] = (int(fields[1]), cmdline)
    return table


def descendants(root: int, table: dict[int, tuple[int, str]] | None = None) -> dict[int, str]:
    table = _processes() if table is None else table
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, _) in table.items():
        children[ppid].append(pid)
    found, front = {}, [root]
    while front:
        for pid in children.get(front.pop(), ()):
            found[pid] = table[pid][1]
            front.append(pid)
    return found


def zygote_pids(backend: Any, table: dict[int, tuple[int, str]]) -> set[int]:
    """The zygote's pid, and under bubblewrap the zygote's own Python process too."""
    keeper = getattr(getattr(backend, "_launcher", None), "zygote", None)
    zygote = keeper.current if keeper is not None else None
    if zygote is None:
        return set()
    pids = {zygote.pid}
    if "bwrap" in table.get(zygote.pid, (0, ""))[1]:
        pids |= {pid for pid, (ppid, _) in table.items() if ppid == zygote.pid}
    return pids


def live_workers(backend: Any) -> dict[int, str]:
    """The processes running the worker runtime for this host: Python children of the host
    or of a zygote, zygotes aside (what a handler forks is the worker's child, and runs
    ``sleep``; bubblewrap is not Python)."""
    table = _processes()
    zygotes = zygote_pids(backend, table)
    parents = {os.getpid(), *zygotes}
    return {
        pid: cmd
        for pid, cmd in descendants(os.getpid(), table).items()
        if table[pid][0] in parents
        and "plugin_execution" in cmd
        and not cmd.startswith("<zombie>")
        and pid not in zygotes
        # a zygote not yet known to the backend: started by the host, not forked by a zygote
        and not ("--zygote" in cmd and table[pid][0] == os.getpid())
    }


def leftover_sleepers() -> list[int]:
    return [pid for pid, (_, cmd) in _processes().items() if f"sleep {MARKER}" in cmd]


# -- the run -------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        kinds = IN_PROCESS_KINDS if args.backend == "in-process" else tuple(KINDS)
        if args.via == "map":  # map's requests cannot be cancelled one by one
            kinds = tuple(kind for kind in kinds if kind != "cancel")
        weights = [KINDS[k][1] for k in kinds]
        self.plan = self.rng.choices(kinds, weights, k=args.executions)
        self.outcomes: list[str | None] = [None] * args.executions
        self.extra_outcomes = 0
        self.latency_ns: list[int] = []
        self.hit_workers: set[int] = set()  # pids the saboteur killed or stopped
        self.worker_of: list[int | None] = [None] * args.executions
        self.faults_from_outside: Counter[str] = Counter()
        self.bare_exceptions: Counter[str] = Counter()
        self.peak_workers = 0
        self.peak_snapshot: dict[int, str] = {}
        self.backend_error: str | None = None

    def options(self) -> dict[str, Any]:
        if self.args.backend == "worker-pool":
            return {
                "sandbox": self.args.sandbox,
                "min_workers": 0 if self.args.sandbox else self.args.workers,
                "max_workers": self.args.workers,
                "health_check_interval": 0.5,
                "health_check_timeout": 1.0,
                "acquire_timeout": 60.0,
                "max_queue": max(100, self.args.concurrency * 2),
            }
        if self.args.backend == "subprocess":
            return {"start_method": self.args.start_method, "max_concurrent": self.args.workers}
        return {}

    def request(self, index: int) -> tuple[ExecutionRequest, float | None]:
        kind = self.plan[index]
        handler = KINDS[kind][0]
        timeout, cancel_after = 10.0, None
        payload: Any = {"i": index, "pad": "x" * 16}
        if kind == "sleep":
            payload = 0.01
        elif kind == "cancel":
            payload, cancel_after = 10.0, self.rng.uniform(0.02, 0.2)
        elif kind == "timeout":
            timeout = 0.3
        elif kind == "memory":
            payload = MEMORY_QUOTA_MB * 4
        elif kind == "fork":
            payload = {"marker": MARKER, "setsid": bool(index % 2)}
        request = ExecutionRequest(
            plugin_id=f"soak.{kind}", handler_id=handler, input=payload, timeout=timeout
        )
        return request, cancel_after

    async def caller(self, backend: Any, indices: Any) -> None:
        for index in indices:
            request, cancel_after = self.request(index)
            started = time.perf_counter_ns()
            outcome: str
            with trio.move_on_after(cancel_after or float("inf")) as scope:
                try:
                    result = await backend.execute(request, raise_errors=False)
                except Exception as exc:  # a bare exception: never allowed
                    self.bare_exceptions[type(exc).__name__] += 1
                    outcome = f"bare:{type(exc).__name__}"
                else:
                    if result.execution_id != request.execution_id:
                        outcome = "wrong-execution-id"
                    elif result.ok:
                        outcome = "ok"
                        self.latency_ns.append(time.perf_counter_ns() - started)
                    else:
                        outcome = result.error.code
                    pid = (result.metadata or {}).get("pid")
                    if result.error is not None and not pid:
                        pid = result.error.details.get("pid")
                    self.worker_of[index] = pid if isinstance(pid, int) else None
            if scope.cancelled_caught:
                outcome = "cancelled"
            if self.outcomes[index] is not None:
                self.extra_outcomes += 1
            self.outcomes[index] = outcome

    async def mapper(self, backend: Any) -> None:
        """Every execution through one ``backend.map`` (batches, on the pool)."""
        index_of: dict[str, int] = {}

        def requests() -> Any:
            for index in range(self.args.executions):
                request, _ = self.request(index)
                index_of[request.execution_id] = index
                yield request

        async with backend.map(requests(), concurrency=self.args.concurrency) as results:
            async for result in results:
                index = index_of.pop(result.execution_id, None)
                if index is None:
                    self.extra_outcomes += 1
                    continue
                self.record(index, result)

    def record(self, index: int, result: Any) -> None:
        """The outcome of execution ``index``: ok, or its error's code (and its worker)."""
        outcome = "ok" if result.ok else result.error.code
        pid = (result.metadata or {}).get("pid")
        if result.error is not None and not pid:
            pid = result.error.details.get("pid")
        self.worker_of[index] = pid if isinstance(pid, int) else None
        if self.outcomes[index] is not None:
            self.extra_outcomes += 1
        self.outcomes[index] = outcome

    async def sampler(self, backend: Any) -> None:
        while True:
            workers = await trio.to_thread.run_sync(live_workers, backend)
            if len(workers) > self.peak_workers:
                self.peak_workers, self.peak_snapshot = len(workers), workers
            await trio.sleep(0.01)

    async def saboteur(self, backend: Any) -> None:
        """Every so often, one fault from outside: SIGKILL, SIGSTOP, or kill the zygote."""
        rng = random.Random(self.args.seed + 1)
        while True:
            await trio.sleep(rng.uniform(0.5, 1.5) * self.args.fault_interval)
            fault = rng.choice(["sigkill", "sigkill", "sigstop", "zygote"])
            if self.args.backend == "subprocess" and fault == "sigstop":
                fault = "sigkill"  # a stopped child just times out; kill it instead
            if fault == "zygote":
                targets = sorted(zygote_pids(backend, _processes()))
            else:
                targets = sorted(live_workers(backend))
            if not targets:
                continue
            pid = rng.choice(targets)
            if fault == "zygote":
                self.hit_workers |= set(descendants(pid))
            try:
                os.kill(pid, signal.SIGSTOP if fault == "sigstop" else signal.SIGKILL)
            except ProcessLookupError:
                continue
            if fault != "zygote":  # (a zygote's forks die with it: counted above)
                self.hit_workers.add(pid)
            self.faults_from_outside[fault] += 1

    async def run(self) -> dict[str, Any]:
        workspace_root = tempfile.mkdtemp(prefix="soak-ws-")
        fds_before = len(os.listdir("/proc/self/fd"))
        started = time.perf_counter()
        counter = iter(range(self.args.executions))
        try:
            async with create_execution_backend(
                type=self.args.backend,
                registry=soak_registry(),
                workspace=workspace_root,
                **self.options(),
            ) as backend:
                async with trio.open_nursery() as watchers:
                    if self.args.backend in PROCESS_BACKENDS:
                        watchers.start_soon(self.sampler, backend)
                        if self.args.fault_interval > 0:
                            watchers.start_soon(self.saboteur, backend)
                    if self.args.via == "map":
                        await self.mapper(backend)
                    else:
                        async with trio.open_nursery() as callers:
                            for _ in range(self.args.concurrency):
                                callers.start_soon(self.caller, backend, counter)
                    watchers.cancel_scope.cancel()
                stats = backend.stats()
        except BaseException as exc:  # the block itself must never fail
            self.backend_error = f"{type(exc).__name__}: {exc}"
            stats = None
        elapsed = time.perf_counter() - started
        await trio.sleep(0.2)  # let the kernel finish reaping what the block killed
        return self.report(stats, elapsed, workspace_root, fds_before)

    def report(
        self, stats: Any, elapsed: float, workspace_root: str, fds_before: int
    ) -> dict[str, Any]:
        per_kind: dict[str, Counter[str]] = defaultdict(Counter)
        unaccounted = self.extra_outcomes
        wrong: Counter[str] = Counter()
        collateral = 0
        for index, (kind, outcome) in enumerate(zip(self.plan, self.outcomes, strict=True)):
            if outcome is None:
                unaccounted += 1
                per_kind[kind]["<none>"] += 1
                continue
            per_kind[kind][outcome] += 1
            if outcome in KINDS[kind][2]:
                continue
            if outcome in COLLATERAL and (
                self.worker_of[index] in self.hit_workers or self.worker_of[index] is None
            ):
                collateral += 1
            else:
                wrong[f"{kind}:{outcome}"] += 1
        leaked_processes = descendants(os.getpid())
        leftovers = leftover_sleepers()
        leaked_dirs = sorted(os.listdir(workspace_root)) if os.path.isdir(workspace_root) else []
        leaked_fds = len(os.listdir("/proc/self/fd")) - fds_before
        try:
            os.rmdir(workspace_root)
        except OSError:
            pass
        for pid in leftovers:  # clean up after a failed run, but report it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        bound = self.args.workers if self.args.backend in PROCESS_BACKENDS else 0
        latency = sorted(self.latency_ns)
        report = {
            "backend": self.args.backend,
            "executions": self.args.executions,
            "concurrency": self.args.concurrency,
            "via": self.args.via,
            "elapsed_s": round(elapsed, 3),
            "throughput_per_s": round(self.args.executions / elapsed, 1),
            "ok_p50_us": round(statistics.median(latency) / 1000, 1) if latency else None,
            "ok_p99_us": round(latency[int(0.99 * (len(latency) - 1))] / 1000, 1)
            if latency
            else None,
            "per_kind": {kind: dict(counts) for kind, counts in sorted(per_kind.items())},
            "unaccounted": unaccounted,
            "wrong_code": dict(wrong),
            "collateral": collateral,
            "bare_exceptions": dict(self.bare_exceptions),
            "faults_from_outside": dict(self.faults_from_outside),
            "peak_live_workers": self.peak_workers,
            "peak_snapshot": {str(pid): cmd[:100] for pid, cmd in self.peak_snapshot.items()},
            "worker_bound": bound,
            "leaked_processes": {str(pid): cmd for pid, cmd in leaked_processes.items()},
            "leftover_forks": leftovers,
            "leaked_fds": max(0, leaked_fds),
            "leaked_workspace_dirs": leaked_dirs,
            "backend_error": self.backend_error,
            "stats": _stats_summary(stats),
        }
        report["clean"] = not (
            unaccounted
            or wrong
            or self.bare_exceptions
            or leaked_processes
            or leftovers
            or leaked_fds > 0
            or leaked_dirs
            or self.backend_error
            or (bound and self.peak_workers > bound)
        )
        return report


def _stats_summary(stats: Any) -> dict[str, Any] | None:
    if stats is None:
        return None
    return {
        "total": stats.total,
        "ok": stats.ok,
        "failed_by_code": dict(stats.failed_by_code),
        "worker_crashes": stats.worker_crashes,
        "workers_recycled": stats.workers_recycled,
        "details": {k: v for k, v in stats.details.items() if isinstance(v, int | float | str)},
    }


def _print_text(report: dict[str, Any]) -> None:
    print(
        f"{report['backend']}: {report['executions']} executions, "
        f"concurrency {report['concurrency']}, {report['elapsed_s']} s, "
        f"{report['throughput_per_s']}/s, ok p50 {report['ok_p50_us']} us "
        f"p99 {report['ok_p99_us']} us"
    )
    for kind, counts in report["per_kind"].items():
        shown = ", ".join(f"{code} {n}" for code, n in sorted(counts.items()))
        print(f"  {kind:8} {shown}")
    for key in (
        "unaccounted",
        "wrong_code",
        "collateral",
        "bare_exceptions",
        "faults_from_outside",
        "peak_live_workers",
        "worker_bound",
        "leaked_processes",
        "leftover_forks",
        "leaked_fds",
        "leaked_workspace_dirs",
        "backend_error",
    ):
        print(f"  {key}: {report[key]}")
    print("CLEAN" if report["clean"] else "NOT CLEAN")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend", choices=("in-process", *PROCESS_BACKENDS), default="worker-pool"
    )
    parser.add_argument("--executions", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="pool size / max_concurrent")
    parser.add_argument("--start-method", choices=("spawn", "zygote"), default="zygote")
    parser.add_argument(
        "--fault-interval",
        type=float,
        default=1.0,
        help="mean seconds between faults from outside (0: none)",
    )
    parser.add_argument(
        "--via",
        choices=("execute", "map"),
        default="execute",
        help="callers of execute (cancelling some), or one backend.map of them all",
    )
    parser.add_argument(
        "--sandbox",
        action="store_true",
        help="worker-pool: the sandboxed pool (a worker per plugin, in its kernel sandbox)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    report = trio.run(Soak(args).run)
    if args.json:
        print(json.dumps(report))
    else:
        _print_text(report)
    return 0 if report["clean"] else 1


if __name__ == "__main__":
    sys.exit(main())
