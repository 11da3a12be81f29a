"""WorkerLimits: the resource limits a worker child applies to itself.

A value with no dependencies, so that whoever starts a worker (the backends, the platform's
``shell`` service) can name limits without importing the machinery that starts one.
"""

from __future__ import annotations

__all__ = ["WorkerLimits"]


class WorkerLimits:
    """Resource limits applied by the child to itself before it imports plugin code."""

    __slots__ = ("address_space_mb", "cpu_s", "file_size_mb", "open_files", "processes")

    def __init__(
        self,
        *,
        address_space_mb: int | None = None,
        cpu_s: float | None = None,
        open_files: int | None = None,
        file_size_mb: int | None = None,
        processes: int | None = None,
    ) -> None:
        self.address_space_mb = address_space_mb
        self.cpu_s = cpu_s
        self.open_files = open_files
        self.file_size_mb = file_size_mb
        self.processes = processes

    def to_arg(self) -> str:
        parts = []
        if self.address_space_mb:
            parts.append(f"as={self.address_space_mb * 1024 * 1024}")
        if self.cpu_s:
            parts.append(f"cpu={max(1, int(self.cpu_s + 0.999))}")
        if self.open_files:
            parts.append(f"nofile={self.open_files}")
        if self.file_size_mb:
            parts.append(f"fsize={self.file_size_mb * 1024 * 1024}")
        if self.processes:
            parts.append(f"nproc={self.processes}")
        return ",".join(parts)
