"""RayBackend: the worker pool, with its workers placed on a Ray cluster as actors.

Everything of the pool stays: the supervisor, the queue (``QueueFullError``,
``AcquireTimeoutError``), growth and shrinking, recycling, health checks, the restart
strategy and the crash breaker. Only where a worker runs changes: the pool's launcher is a
:class:`~plugin_execution.host.ray.RayLauncher`, whose workers are Ray actors (see
``host/ray.py`` and ``worker/ray_actor.py``) that connect back to this host over TCP and speak
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
import math
import os
from typing import Any

from ..errors import InvalidRequestError
from ..host.ray import RayLauncher
from ..types import ExecutionResult
from .job import Job
from .worker_pool import WorkerPoolBackend

__all__ = ["RayBackend", "ray_available"]

_MISSING = "the ray backend needs Ray: pip install 'plugin-execution[ray]'"


def ray_available() -> bool:
    """Whether Ray can be imported (without importing it: see ``host.ray._loopback_ray``)."""
    return importlib.util.find_spec("ray") is not None


class RayBackend(WorkerPoolBackend):
    """The worker pool over Ray actors. See the module docstring.

    Options: those of :class:`WorkerPoolBackend` but ``kind``, ``memory_mb``,
    ``open_files`` and ``env`` (an actor's process is Ray's; use ``runtime_env``), plus:
    ``address`` [None: a local instance on loopback] | ``"auto"`` | ``"host:port"``;
    ``num_cpus`` [1] and ``resources`` [none] each actor reserves; ``runtime_env`` [none]
    for the actors; ``scheduling_strategy`` [Ray's default]: ``"SPREAD"`` places the actors
    on as many nodes as it can; ``ship_plugins`` [False]: add the plugins' roots to the
    job's ``runtime_env`` (``py_modules``) as the backend connects to Ray, so plugin code
    found only on the driver's disk runs on every node; ``listen_host``: where actors connect
    back to [127.0.0.1 for a local instance, else this node's address as Ray sees it];
    ``start_timeout`` [60 s] for an actor to be placed, start and connect; ``ray_init``: more
    keyword arguments for ``ray.init`` (a local instance's ``num_cpus``, say).
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
        if num_cpus < 0:
            raise ValueError(f"num_cpus must be >= 0, not {num_cpus}")
        max_workers = kwargs.get("max_workers") or os.cpu_count() or 2
        launcher = RayLauncher(
            address=address,
            num_cpus=num_cpus,
            resources=resources,
            runtime_env=runtime_env,
            scheduling_strategy=scheduling_strategy,
            roots=self._roots if ship_plugins else None,
            listen_host=listen_host,
            start_timeout=start_timeout,
            ray_init=ray_init,
            # A local instance: room for max_workers actors, or the machine's CPUs.
            local_cpus=max(os.cpu_count() or 1, max_workers) * max(math.ceil(num_cpus), 1),
        )
        super().__init__(launcher=launcher, **kwargs)
        self._ray = launcher
        self.address = address
        self.ship_plugins = ship_plugins

    def _roots(self) -> list[str]:
        roots = {m.root for m in self.registry if getattr(m, "root", None)}
        return sorted(os.fspath(root) for root in roots if root)

    async def _run(self, job: Job) -> ExecutionResult:
        result = await super()._run(job)
        if result.worker_id is not None:
            result.metadata["node_id"] = self._ray.nodes.get(result.worker_id)
        return result

    # -- observing ------------------------------------------------------------------------

    def _stats_details(self) -> dict[str, Any]:
        return {**super()._stats_details(), **self._ray.health_details()}
