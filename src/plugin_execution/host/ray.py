"""Ray actor workers, host side: the launcher of the Ray backend (``kind="ray"``).

A worker on Ray is a :class:`~plugin_execution.worker.ray_actor.RayWorkerActor` whose
``serve`` call connects back to the host over TCP. The host listens (:class:`ActorListener`)
and admits a connection only once it sent the backend's secret token: anything else is
dropped before a single frame of it is read. The admitted socket is then served by
:func:`~plugin_execution.host.process.serve_worker` like any worker's, with a child-like
:class:`ActorRun` standing in for the process: its ``wait()`` ends when the actor's
``serve`` call ends (returned, or failed: the actor died, its node was lost...), and killing
it is ``ray.kill``. Executions, events, platform calls (served and checked here, on the
host), channels, cancellation and deadlines are the protocol's, shared with every worker.

Ray's futures reach trio through a done-callback that wakes trio with
``TrioToken.run_sync_soon`` (:func:`wait_ref`): no thread per call. The data path is the TCP
connection; a Ray future is awaited only to learn that an actor's ``serve`` call ended.
"""

from __future__ import annotations

import hmac
import importlib
import itertools
import json
import os
import secrets
import signal
import socket
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import outcome
import trio

from ..errors import InvalidRequestError, WorkerCrashedError
from ..worker.ray_actor import PREAMBLE
from .process import WorkerProcess, serve_worker

__all__ = [
    "ActorListener",
    "ActorRun",
    "RayLauncher",
    "open_ray_worker",
    "ray_cause",
    "wait_ref",
]

_GREET_TIMEOUT_S = 10.0  # a connection gets this long to say who it is
_MAX_HELLO_BYTES = 4096
_KILL_CONFIRM_S = 10.0  # after ray.kill, how long the actor's end may take to be reported
_starts = itertools.count(1)
# Ray's words for an actor killed, not dead by its own doing: ray.kill, its node lost, Ray's
# memory monitor (the pool tells its own kills apart: WorkerProcess.killed).
_KILLED_FROM_OUTSIDE = ("ray.kill", "its node", "low on memory", "memory monitor")
# How Ray's memory monitor words its kills (the error is an OutOfMemoryError): "1 worker(s)
# were killed due to the node running low on memory. Memory on the node (IP: ..., ID: ...)
# was 1.84GB used / 23.54GB limit (0.078241)".
_OUT_OF_MEMORY = ("low on memory", "memory monitor")
_MAX_CAUSE = 400
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a local instance binds 127.0.0.1
_NODES_KEPT = 1024  # worker ids whose node is remembered, for results collected late
# Launchers using the Ray connection this process made (see RayLauncher._ray_kept).
_owners = 0


async def wait_ref(ref: Any) -> Any:
    """The value of a Ray ``ObjectRef``, awaited in trio; raises what ``ray.get`` would.

    The ref's future calls back on a Ray thread, which hands the outcome to this task
    through ``TrioToken.run_sync_soon``. Cancellable: the task stops waiting (the work the
    ref stands for is not cancelled).
    """
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()
    waiting = True

    def wake(result: outcome.Outcome[Any]) -> None:
        nonlocal waiting
        if waiting:
            waiting = False
            trio.lowlevel.reschedule(task, result)

    def done(future: Any) -> None:
        result = outcome.capture(future.result)
        try:
            token.run_sync_soon(wake, result)
        except trio.RunFinishedError:
            pass

    def abort(_: Any) -> trio.lowlevel.Abort:
        nonlocal waiting
        waiting = False
        return trio.lowlevel.Abort.SUCCEEDED

    ref.future().add_done_callback(done)
    return await trio.lowlevel.wait_task_rescheduled(abort)


def ray_cause(exc: BaseException) -> str:
    """The line of a Ray error that says why an actor or task failed."""
    text = str(getattr(exc, "error_msg", "") or exc)
    for line in text.splitlines():
        if "because" in line:  # less Ray's list of what commonly causes such a death
            return line.split(" Some common causes")[0].strip()[:_MAX_CAUSE]
    first = text.strip().splitlines()
    return first[0][:_MAX_CAUSE] if first else type(exc).__name__


class ActorRun:
    """A ``ChildProcess`` look-alike for an actor's ``serve`` call (see the module docstring).

    ``returncode``: 0 once the call returned (the worker was told to stop), ``-SIGKILL`` when
    Ray says the actor was killed (``ray.kill``, by the host or from elsewhere; its node lost;
    Ray's memory monitor) or the host killed it and Ray did not report its end in time, 1 when
    it died otherwise (its process exited: a crash, ``os._exit``, the kernel's OOM killer...).
    ``reason``: ``"memory_limit"`` when Ray's memory monitor killed it, as the other backends
    name their memory kills; else None.
    """

    def __init__(self, actor: Any, ref: Any, kill: Callable[[Any], None]) -> None:
        self.pid = 0  # the actor's, on its node, once it connected
        self.node_id: str | None = None
        self.returncode: int | None = None
        self.cause = ""
        self.reason: str | None = None
        self._actor = actor
        self._ray_kill = kill
        self._killed_at: float | None = None
        self._ended = trio.Event()
        self._changed = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def done(future: Any) -> None:
            result = outcome.capture(future.result)
            try:
                token.run_sync_soon(self._end_with, result)
            except trio.RunFinishedError:
                pass

        ref.future().add_done_callback(done)

    @property
    def ended(self) -> trio.Event:
        return self._ended

    def _end_with(self, result: outcome.Outcome[Any]) -> None:
        if not isinstance(result, outcome.Error):
            self._end(0, "its serve call returned")
            return
        error = result.error
        cause = ray_cause(error)
        name = type(error).__name__
        # By Ray's word, not by whether the host killed it too: a host that found the
        # connection closed kills the actor to be sure, and the crash must still read as one.
        oom = name == "OutOfMemoryError" or any(marker in cause for marker in _OUT_OF_MEMORY)
        killed = oom or any(marker in cause for marker in _KILLED_FROM_OUTSIDE)
        if oom and self.returncode is None:
            self.reason = "memory_limit"
        self._end(-signal.SIGKILL if killed else 1, f"{name}: {cause}")

    def _end(self, code: int, cause: str) -> None:
        if self.returncode is None:
            self.returncode = code
            self.cause = cause
            self._ended.set()
            self._changed.set()

    async def wait(self) -> int:
        while self.returncode is None:
            if self._killed_at is not None:
                with trio.move_on_at(self._killed_at + _KILL_CONFIRM_S):
                    await self._ended.wait()
                self._end(-signal.SIGKILL, "killed by the host; Ray did not report its end")
            else:
                if self._changed.is_set():
                    self._changed = trio.Event()
                await self._changed.wait()
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None and self._killed_at is None:
            self._killed_at = trio.current_time()
            self._changed.set()
            try:
                self._ray_kill(self._actor)
            except Exception:
                pass

    def describe_exit(self) -> tuple[str, dict[str, Any]]:
        """How the actor ended, for ``WorkerProcess``'s crash error."""
        where = f" on node {self.node_id}" if self.node_id else ""
        how = f"(a Ray actor{where}) ended: {self.cause or 'unknown cause'}"
        details: dict[str, Any] = {"node_id": self.node_id, "cause": self.cause}
        if self.reason is not None:
            details["reason"] = self.reason
        return how, details


class _Start:
    """A start waiting for its actor to connect."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.hello: dict[str, Any] = {}
        self.connected = trio.Event()


class ActorListener:
    """Where actors connect back to (one per backend): ``token`` is the backend's secret."""

    def __init__(self, token: bytes | None = None) -> None:
        self.token = token if token is not None else secrets.token_bytes(PREAMBLE.size - 2)
        self.host = ""
        self.port = 0
        #: Connections dropped: a wrong or missing token, a malformed or unknown hello.
        self.refused = 0
        self._starts: dict[str, _Start] = {}
        self._sock: trio.socket.SocketType | None = None

    async def serve(self, host: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``host`` (an ephemeral port) and admit actors until cancelled."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with trio.socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await sock.bind((host, 0))
            sock.listen(128)
            self.host, self.port = host, sock.getsockname()[1]
            self._sock = sock
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await sock.accept()
                    nursery.start_soon(self._greet, conn)

    def expect(self) -> tuple[str, _Start]:
        start_id = f"s{next(_starts)}-{secrets.token_hex(4)}"
        start = self._starts[start_id] = _Start()
        return start_id, start

    def forget(self, start_id: str) -> None:
        self._starts.pop(start_id, None)

    async def _greet(self, conn: trio.socket.SocketType) -> None:
        admitted = False
        try:
            with trio.move_on_after(_GREET_TIMEOUT_S):
                head = await _recv_exactly(conn, PREAMBLE.size)
                if head is None:
                    return
                token, size = PREAMBLE.unpack(head)
                if not hmac.compare_digest(token, self.token) or size > _MAX_HELLO_BYTES:
                    return  # not ours: not one more byte is read
                body = await _recv_exactly(conn, size)
                if body is None:
                    return
                try:
                    hello = json.loads(body)
                    start = self._starts.pop(str(hello["start"]), None)
                except (ValueError, KeyError, TypeError):
                    return
                if start is None or start.connected.is_set():
                    return
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                start.sock = socket.socket(fileno=conn.detach())
                start.hello = hello
                start.connected.set()
                admitted = True
        finally:
            if not admitted:
                self.refused += 1
                conn.close()


async def _recv_exactly(conn: trio.socket.SocketType, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = await conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


@asynccontextmanager
async def open_ray_worker(
    listener: ActorListener,
    actor_class: Any,
    *,
    options: dict[str, Any],
    roots: list[str],
    kill: Callable[[Any], None],
    start_timeout: float = 60.0,
    close_grace: float = 2.0,
) -> AsyncIterator[WorkerProcess]:
    """Start an actor of ``actor_class`` (a ``ray.remote`` class) with ``options``, wait
    for it to connect back, and yield its worker once it said ``Hello``. On exit it is shut
    down; ``kill`` (``ray.kill``) makes sure it is gone.

    Raises ``WorkerCrashedError`` if the actor cannot be started (no node has the resources
    within ``start_timeout``, its ``runtime_env`` fails, it dies) or does not connect.
    """
    start_id, start = listener.expect()
    actor = actor_class.options(**options).remote()
    try:
        ref = actor.serve.remote(listener.host, listener.port, listener.token, start_id, roots)
        run = ActorRun(actor, ref, kill)
        with trio.move_on_after(start_timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on, start.connected, nursery.cancel_scope)
                nursery.start_soon(_cancel_on, run.ended, nursery.cancel_scope)
        sock, start.sock = start.sock, None
        if sock is None:
            why = run.cause if run.ended.is_set() else f"no connection within {start_timeout:g} s"
            raise WorkerCrashedError(
                f"a Ray actor worker could not be started: {why}", details={"cause": why}
            )
        run.pid = int(start.hello.get("pid") or 0)
        run.node_id = str(start.hello.get("node_id") or "") or None
        async with serve_worker(  # it owns the socket from here on
            run,
            sock,
            None,
            kill=run.kill,
            spin_ok=False,  # its answers come over TCP from another process, often a node
            start_timeout=start_timeout,
            close_grace=close_grace,
        ) as worker:
            yield worker
    finally:
        listener.forget(start_id)
        if start.sock is not None:  # connected as the start gave up
            start.sock.close()
        try:
            kill(actor)  # done with it, whatever state it is in
        except Exception:
            pass


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _ray() -> Any:
    """The ``ray`` module (an optional extra: typed loosely, so the project type-checks with
    or without it installed)."""
    return importlib.import_module("ray")


def _loopback_ray() -> Any:
    """Import Ray so that a local instance it starts binds 127.0.0.1 only.

    Ray decides this once, as it is imported, from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
    (``"0"``: loopback). Set before the import it is enough; when the process imported Ray
    earlier, the constant it computed then is set the same way.
    """
    os.environ[_LOOPBACK_ENV] = "0"
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    return ray


class RayLauncher:
    """Starts workers as Ray actors: a :class:`~plugin_execution.host.handle.WorkerLauncher`
    of kind ``"ray"``, for ``WorkerPoolBackend(launcher=...)``.

    :meth:`run` keeps what the actors share: the connection to Ray (a local instance on
    loopback when ``address`` is None, started for the run and shut down after it; else the
    cluster at ``address``, left running; or the process's own, when it called ``ray.init``)
    and the listener the actors connect back to. :meth:`open` starts one actor with the
    options given here and yields its worker. ``roots``: the plugin roots to ship with the
    job's ``runtime_env`` (``py_modules``), read as Ray is connected to.
    """

    kind = "ray"

    def __init__(
        self,
        *,
        address: str | None = None,
        num_cpus: float = 1.0,
        resources: dict[str, float] | None = None,
        runtime_env: dict[str, Any] | None = None,
        scheduling_strategy: str | None = None,
        roots: Callable[[], list[str]] | None = None,
        listen_host: str | None = None,
        start_timeout: float = 60.0,
        close_grace: float = 2.0,
        ray_init: dict[str, Any] | None = None,
        local_cpus: int = 1,
    ) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.resources = dict(resources or {})
        self.runtime_env = dict(runtime_env or {})
        self.scheduling_strategy = scheduling_strategy
        self.listen_host = listen_host
        self.start_timeout = start_timeout
        self.close_grace = close_grace
        self._roots = roots
        self._shipped: list[str] = []
        self._ray_init = dict(ray_init or {})
        self._local_cpus = local_cpus
        self._listener = ActorListener()
        self._actor_class: Any = None
        self._up = trio.Event()
        #: The node of each worker started, by worker id (the last ``_NODES_KEPT``).
        self.nodes: OrderedDict[str, str | None] = OrderedDict()

    @property
    def connections_refused(self) -> int:
        return self._listener.refused

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Connect to Ray and listen for actors until cancelled; started once both are up
        (:meth:`open` waits for that too)."""
        try:
            async with self._ray_kept() as (ray, local):
                from ..worker.ray_actor import RayWorkerActor

                host = self.listen_host or ("127.0.0.1" if local else _node_address(ray))
                async with trio.open_nursery() as nursery:
                    await nursery.start(self._listener.serve, host)
                    self._actor_class = ray.remote(RayWorkerActor)
                    self._up.set()
                    task_status.started()
        finally:
            self._actor_class = None
            self._up.set()  # (open() then says the launcher is not running)

    @asynccontextmanager
    async def _ray_kept(self) -> AsyncIterator[tuple[Any, bool]]:
        """Use the process's Ray connection, or make one; yield Ray and whether its nodes
        are all this machine's loopback (then the actors connect back to 127.0.0.1)."""
        global _owners
        ray = _loopback_ray() if self.address is None and "ray" not in sys.modules else _ray()
        if ray.is_initialized() and not _owners:
            if self._roots is not None:
                raise InvalidRequestError(
                    "ship_plugins needs the backend to connect to Ray itself (Ray ships local "
                    "directories only for a whole job); this process called ray.init already: "
                    "pass runtime_env={'py_modules': [plugin roots]} to that call instead"
                )
            yield ray, _is_local(ray)
            return
        if not ray.is_initialized():
            options: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "configure_logging": False,
            }
            if self.address is None:
                ray = _loopback_ray()
                options["_node_ip_address"] = "127.0.0.1"
                options["num_cpus"] = self._local_cpus
            else:
                options["address"] = self.address
            options.update(self._ray_init)
            if self._roots is not None:  # the job's runtime_env: Ray uploads local directories
                job_env = dict(options.get("runtime_env") or {})
                shipped = list(job_env.get("py_modules", []))
                self._shipped = [root for root in self._roots() if root not in shipped]
                options["runtime_env"] = {**job_env, "py_modules": shipped + self._shipped}
            await trio.to_thread.run_sync(lambda: ray.init(**options))
        _owners += 1
        try:
            yield ray, _is_local(ray) or self.address is None
        finally:
            _owners -= 1
            if not _owners:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(ray.shutdown)

    def _actor_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "num_cpus": self.num_cpus,
            "max_restarts": 0,  # a lost actor is the pool's to replace, not Ray's to restart
            "max_task_retries": 0,
            "max_concurrency": 1,
        }
        if self.resources:
            options["resources"] = self.resources
        if self.scheduling_strategy is not None:
            options["scheduling_strategy"] = self.scheduling_strategy
        if self.runtime_env:
            options["runtime_env"] = self.runtime_env
        return options

    @asynccontextmanager
    async def open(self) -> AsyncIterator[WorkerProcess]:
        """Start an actor; yield its worker once it connected and said ``Hello``; on exit
        it is shut down and killed. Raises ``WorkerCrashedError`` when it fails to start."""
        with trio.move_on_after(self.start_timeout):
            await self._up.wait()  # connected to Ray, listening
        if self._actor_class is None:
            raise WorkerCrashedError("no Ray actor can be started: the Ray launcher is not running")
        import ray

        async with open_ray_worker(
            self._listener,
            self._actor_class,
            options=self._actor_options(),
            roots=self._shipped,
            kill=lambda actor: ray.kill(actor, no_restart=True),
            start_timeout=self.start_timeout,
            close_grace=self.close_grace,
        ) as worker:
            assert isinstance(worker.process, ActorRun)
            self.nodes[worker.worker_id] = worker.process.node_id
            while len(self.nodes) > _NODES_KEPT:
                self.nodes.popitem(last=False)
            yield worker

    def health_details(self) -> dict[str, Any]:
        return {"address": self.address, "connections_refused": self._listener.refused}


def _is_local(ray: Any) -> bool:
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    except Exception:
        return False
    return bool(nodes) and all(n.get("NodeManagerAddress") == "127.0.0.1" for n in nodes)


def _node_address(ray: Any) -> str:
    try:
        return str(importlib.import_module("ray.util").get_node_ip_address())
    except Exception:
        return socket.gethostbyname(socket.gethostname())
