"""RayBackend: the worker pool, with its workers placed on a Ray cluster as actors.

Everything of the pool stays: the supervisor, the queue (``QueueFullError``,
``AcquireTimeoutError``), growth and shrinking, recycling, health checks, the restart
strategy and the crash breaker. Only where a worker runs changes: each is a Ray actor (see
``host_ray`` and ``worker/ray_actor``) that connects back to this host over TCP and speaks
the worker protocol there, so platform calls and their permission checks run here, on the
driver, never on the remote side. Results carry ``metadata["node_id"]``; a worker lost with
its node (or killed, or crashed) fails its in-flight executions with ``WorkerCrashedError``
naming the cause and the node, and the pool starts a replacement wherever Ray places it.

With no ``address`` the backend starts a local Ray instance for its block, listening on
loopback only, and shuts it down at the end; with ``address="auto"`` or a cluster's address
it connects to that cluster and leaves it running (the driver only disconnects). A process
that already called ``ray.init`` is used as it is.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio

from ..errors import InvalidRequestError
from ..host_ray import ActorListener, ActorRun, open_ray_worker
from ..process import WorkerProcess
from ..types import ExecutionResult
from .base import Job
from .worker_pool import WorkerPoolBackend

__all__ = ["RayBackend", "ray_available"]

_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a local instance binds 127.0.0.1
_MISSING = "the ray backend needs Ray: pip install 'plugin-execution[ray]'"
_NODES_KEPT = 1024  # worker ids whose node is remembered, for results collected late
# Instances of Ray this process started, per backend using it (see _ray_kept).
_owners = 0


def ray_available() -> bool:
    """Whether Ray can be imported (without importing it: see :func:`_loopback_ray`)."""
    return importlib.util.find_spec("ray") is not None


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


class RayBackend(WorkerPoolBackend):
    """The worker pool over Ray actors. See the module docstring.

    Options: those of :class:`WorkerPoolBackend` but ``kind``, ``memory_mb``,
    ``open_files`` and ``env`` (an actor's process is Ray's; use ``runtime_env``), plus:
    ``address`` [None: a local instance on loopback] | ``"auto"`` | ``"host:port"``;
    ``num_cpus`` [1] and ``resources`` [none] each actor reserves; ``runtime_env`` [none]
    for the actors; ``scheduling_strategy`` [Ray's default]: ``"SPREAD"`` places the actors
    on as many nodes as it can; ``ship_plugins`` [False]: add the plugins' roots to the
    actors' ``runtime_env`` (``py_modules``), so plugin code found only on the driver's disk
    runs on every node; ``listen_host``: where actors connect back to [127.0.0.1 for a local
    instance, else this node's address as Ray sees it]; ``start_timeout`` [60 s] for an
    actor to be placed, start and connect; ``ray_init``: more keyword arguments for
    ``ray.init`` (a local instance's ``num_cpus``, say).
    """

    name = "ray"

    def __init__(
        self,
        *,
        address: str | None = None,
        num_cpus: float = 1.0,
        resources: dict[str, float] | None = None,
        runtime_env: dict[str, Any] | None = None,
        scheduling_strategy: str | None = None,
        ship_plugins: bool = False,
        listen_host: str | None = None,
        start_timeout: float = 60.0,
        ray_init: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not ray_available():
            raise InvalidRequestError(_MISSING, details={"missing_extra": "ray"})
        for option in ("kind", "memory_mb", "open_files", "env"):
            if option in kwargs:
                raise ValueError(f"{option!r} is not an option of the ray backend")
        super().__init__(kind="thread", **kwargs)  # (no zygote; quotas are not sampled)
        if num_cpus < 0:
            raise ValueError(f"num_cpus must be >= 0, not {num_cpus}")
        self.address = address
        self.num_cpus = num_cpus
        self.resources = dict(resources or {})
        self.runtime_env = dict(runtime_env or {})
        self.scheduling_strategy = scheduling_strategy
        self.ship_plugins = ship_plugins
        self.listen_host = listen_host
        self.start_timeout = start_timeout
        self._ray_init = dict(ray_init or {})
        self._listener = ActorListener()
        self._actor_class: Any = None
        self._nodes: OrderedDict[str, str | None] = OrderedDict()

    # -- lifecycle ------------------------------------------------------------------------

    async def _open(self, stack: AsyncExitStack) -> None:
        local = await stack.enter_async_context(self._ray_kept())
        import ray

        from ..worker.ray_actor import RayWorkerActor

        self._actor_class = ray.remote(RayWorkerActor)
        host = self.listen_host or ("127.0.0.1" if local else _node_address())
        nursery = await stack.enter_async_context(trio.open_nursery())
        await nursery.start(self._listener.serve, host)
        stack.callback(nursery.cancel_scope.cancel)  # (left before the nursery exits)
        await super()._open(stack)

    @asynccontextmanager
    async def _ray_kept(self) -> AsyncIterator[bool]:
        """Use the process's Ray connection, or make one for the block; yield whether it is
        a local instance (its actors run on this machine)."""
        global _owners
        if self.address is None and "ray" not in sys.modules:
            ray = _loopback_ray()
        else:
            import ray
        if ray.is_initialized() and not _owners:
            if self.ship_plugins:
                raise InvalidRequestError(
                    "ship_plugins needs the backend to connect to Ray itself (Ray ships local "
                    "directories only for a whole job); this process called ray.init already: "
                    "pass runtime_env={'py_modules': [plugin roots]} to that call instead"
                )
            yield _is_local(ray)
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
                options["num_cpus"] = max(os.cpu_count() or 1, self.max_workers) * max(
                    self.num_cpus, 1
                )
            else:
                options["address"] = self.address
            options.update(self._ray_init)
            if self.ship_plugins:  # the job's runtime_env: Ray uploads local directories
                job_env = dict(options.get("runtime_env") or {})
                shipped = list(job_env.get("py_modules", []))
                shipped += [root for root in self._roots() if root not in shipped]
                options["runtime_env"] = {**job_env, "py_modules": shipped}
            await trio.to_thread.run_sync(lambda: ray.init(**options))
        _owners += 1
        try:
            yield _is_local(ray) or self.address is None
        finally:
            _owners -= 1
            if not _owners:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(ray.shutdown)

    # -- workers --------------------------------------------------------------------------

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

    def _roots(self) -> list[str]:
        roots = {m.root for m in self.registry if getattr(m, "root", None)}
        return sorted(os.fspath(root) for root in roots if root)

    @asynccontextmanager
    async def _open_worker(self, *, slot_held: bool = False) -> AsyncIterator[WorkerProcess]:
        """Start an actor worker once a slot is free (as the pool's own ``_open_worker``)."""
        import ray

        if not slot_held:
            await self._take_process_slot()
        try:
            async with open_ray_worker(
                self._listener,
                self._actor_class,
                options=self._actor_options(),
                roots=self._roots() if self.ship_plugins else [],
                kill=lambda actor: ray.kill(actor, no_restart=True),
                start_timeout=self.start_timeout,
            ) as proc:
                assert isinstance(proc.process, ActorRun)
                self._nodes[proc.worker_id] = proc.process.node_id
                while len(self._nodes) > _NODES_KEPT:
                    self._nodes.popitem(last=False)
                proc.spin_ok = False  # its answer comes over TCP from another process
                yield proc
        finally:
            self._process_slots.release()

    async def _run(self, job: Job) -> ExecutionResult:
        result = await super()._run(job)
        if result.worker_id is not None:
            result.metadata["node_id"] = self._nodes.get(result.worker_id)
        return result

    # -- observing ------------------------------------------------------------------------

    def _stats_details(self) -> dict[str, Any]:
        return {**super()._stats_details(), "connections_refused": self._listener.refused}

    def _health_details(self) -> dict[str, Any]:
        return {**super()._health_details(), "kind": "ray", "address": self.address}


def _is_local(ray: Any) -> bool:
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    except Exception:
        return False
    return bool(nodes) and all(n.get("NodeManagerAddress") == "127.0.0.1" for n in nodes)


def _node_address() -> str:
    import ray.util

    try:
        address: Any = ray.util.get_node_ip_address
        return str(address())
    except Exception:
        return socket.gethostbyname(socket.gethostname())
