"""Turning a fresh process into a worker: limits first, then the runtime.

Shared by the spawn entry point (``__main__``) and the zygote's forked children.
"""

from __future__ import annotations

import os

_LIMITS = {
    "as": "RLIMIT_AS",
    "cpu": "RLIMIT_CPU",
    "nofile": "RLIMIT_NOFILE",
    "fsize": "RLIMIT_FSIZE",
    "nproc": "RLIMIT_NPROC",
}


def apply_limits(spec: str) -> None:
    """Apply ``as=BYTES,cpu=S,...`` as both soft and hard limits (plugin code can't raise them)."""
    import resource

    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        limit = int(value)
        resource.setrlimit(getattr(resource, _LIMITS[name]), (limit, limit))


def serve(fd: int, limits: str = "") -> None:
    """Apply ``limits`` and serve the protocol on socket ``fd``; never returns."""
    if limits:
        apply_limits(limits)
    os.set_inheritable(fd, False)

    from .runtime import Worker

    Worker(fd).serve()
