"""What this machine supports: each sandbox layer, detected at run time, with the reason when
it is not available.

:func:`detect` looks once per process (the bubblewrap probe starts a process) and caches the
answer; ``plugin-execution doctor`` prints it, and the subprocess backend reports it in
``health()``.
"""

from __future__ import annotations

import functools
import os
import sys

import attrs

from . import bubblewrap, capabilities, landlock, seccomp

__all__ = ["LAYERS", "OPTIONAL_LAYERS", "LayerStatus", "SandboxSupport", "detect"]

#: Every layer, in the order a child applies them. The first two are always on.
LAYERS = ("process", "rlimits", "capabilities", "landlock", "bubblewrap", "seccomp")
#: The layers ``sandbox=`` can choose; the others are part of every child.
OPTIONAL_LAYERS = ("capabilities", "landlock", "bubblewrap", "seccomp")


@attrs.frozen
class LayerStatus:
    """One layer on this machine: whether it can be used, and what it does or why not."""

    name: str
    available: bool
    detail: str
    version: int | str | None = None
    path: str | None = None


@attrs.frozen
class SandboxSupport:
    """The layers this machine supports, by name (see :data:`LAYERS`)."""

    layers: dict[str, LayerStatus]

    def __getitem__(self, name: str) -> LayerStatus:
        return self.layers[name]

    @property
    def available(self) -> tuple[str, ...]:
        return tuple(name for name in LAYERS if self.layers[name].available)

    @property
    def bwrap(self) -> str | None:
        """The bwrap executable, when bubblewrap is available."""
        status = self.layers["bubblewrap"]
        return status.path if status.available else None


def _process() -> LayerStatus:
    return LayerStatus(
        "process",
        True,
        "own session and process group, no inherited fds but the protocol's, "
        "environment reduced to an allow-list, cwd = the workspace",
    )


def _rlimits() -> LayerStatus:
    detail = (
        "address space, CPU seconds (SIGXCPU, SIGKILL a second later), open files, file size; "
        "a child cannot raise them"
    )
    if os.getuid() == 0:
        detail += "; RLIMIT_NPROC is never enforced for uid 0, so process counts are not capped"
    return LayerStatus("rlimits", True, detail)


def _capabilities() -> LayerStatus:
    if not sys.platform.startswith("linux"):
        return LayerStatus("capabilities", False, f"Linux only (this is {sys.platform})")
    if capabilities.has_any():
        return LayerStatus(
            "capabilities",
            True,
            "the host holds capabilities (root): every child drops them all and sets "
            "no_new_privs, so it cannot raise its limits, load modules or reconfigure the host",
        )
    return LayerStatus("capabilities", True, "the host holds none: nothing to drop")


def _landlock() -> LayerStatus:
    abi = landlock.abi_version() if sys.platform.startswith("linux") else 0
    if abi < 1:
        return LayerStatus("landlock", False, landlock.unavailable_reason() or "not available")
    parts = ["file system: read-only interpreter and plugin files, writable workspace"]
    parts.append(
        "TCP: connect only to network.connect ports, no bind"
        if abi >= 4
        else f"no TCP rules (ABI {abi} < 4)"
    )
    parts.append(
        "no signals or abstract UNIX sockets outside the sandbox"
        if abi >= 6
        else f"signals not scoped (ABI {abi} < 6)"
    )
    return LayerStatus("landlock", True, f"ABI {abi}: " + "; ".join(parts), abi)


def _bubblewrap() -> LayerStatus:
    if not sys.platform.startswith("linux"):
        return LayerStatus("bubblewrap", False, f"Linux only (this is {sys.platform})")
    path = bubblewrap.find()
    if path is None:
        return LayerStatus(
            "bubblewrap",
            False,
            "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)",
        )
    problem = bubblewrap.probe(path)
    if problem is not None:
        return LayerStatus("bubblewrap", False, problem)
    return LayerStatus(
        "bubblewrap",
        True,
        "read-only root, private /tmp and /dev; spawn: pid namespace, and a network namespace "
        "unless network.connect is granted; zygote: the zygote runs inside one mount "
        "namespace, no pid or network namespace",
        bubblewrap.version(path) or None,
        path,
    )


def _seccomp() -> LayerStatus:
    problem = seccomp.unavailable_reason()
    if problem is not None:
        return LayerStatus("seccomp", False, problem)
    return LayerStatus(
        "seccomp",
        True,
        "no fork, exec or new processes (threads allowed) unless shell.allow is granted; "
        "no network socket (UDP included) unless network.connect is granted; "
        "nothing leaves the child's process group (no setsid, setpgid)",
    )


@functools.cache
def detect() -> SandboxSupport:
    """Detect every layer (once per process; the bubblewrap probe runs a child)."""
    checks = (_process, _rlimits, _capabilities, _landlock, _bubblewrap, _seccomp)
    return SandboxSupport({status.name: status for status in (check() for check in checks)})
