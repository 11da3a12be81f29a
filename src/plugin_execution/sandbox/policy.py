"""SandboxPolicy: which layers a backend's children run under, and what each child may touch.

The host turns a plugin's :class:`~plugin_execution.manifest.Permissions` into a
:class:`ChildSandbox` per execution: the plain-data ``spec`` that the child's bootstrap applies
to itself before it imports plugin code (capabilities, Landlock, seccomp), and the ``bwrap``
command line its interpreter is started under. Globs in ``fs.read`` / ``fs.write`` are expanded
here, when the execution starts: Landlock rules name existing files, so a file created later
that would match a glob is not covered, and a path that does not exist is skipped.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..errors import InvalidRequestError
from ..permissions import confined_grants, confined_root
from . import bubblewrap, capabilities
from .support import OPTIONAL_LAYERS, SandboxSupport

if TYPE_CHECKING:
    import trio

    from ..manifest import Permissions

__all__ = ["ChildSandbox", "SandboxPolicy", "check_layers"]

#: Read by the resolver and TLS when a plugin may connect out (``network.connect``).
NETWORK_READ = (
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/host.conf",
    "/etc/services",
    "/etc/ssl",
    "/etc/pki",
    "/etc/ca-certificates",
    "/usr/share/ca-certificates",
)
#: Where the dynamic loader lives: running any allowed program needs it executable too.
_LOADERS = ("/lib64/ld-*.so*", "/lib/ld-*.so*", "/lib/*-linux-*/ld-*.so*", "/usr/lib/ld-*.so*")
_GLOB_CHARS = frozenset("*?[")


def check_layers(sandbox: object) -> bool | tuple[str, ...]:
    """Validate the ``sandbox=`` option: ``True`` (every layer available), ``False`` (none
    beyond the process and rlimits layers) or the names of the layers required."""
    if isinstance(sandbox, bool):
        return sandbox
    if isinstance(sandbox, str) or not isinstance(sandbox, Iterable):
        raise TypeError(
            f"sandbox must be True, False or a list of layers from {OPTIONAL_LAYERS}, "
            f"not {sandbox!r}"
        )
    names = tuple(dict.fromkeys(sandbox))
    unknown = [name for name in names if name not in OPTIONAL_LAYERS]
    if unknown:
        raise ValueError(f"unknown sandbox layer(s) {unknown}; choose from {OPTIONAL_LAYERS}")
    return names


class ChildSandbox:
    """The sandbox of one child: what its bootstrap applies, and how it is started."""

    def __init__(self, layers: tuple[str, ...], spec: dict[str, Any], wrapper: list[str]):
        #: the layers this child runs under, in the order they apply
        self.layers = layers
        #: plain data for ``bootstrap.serve``: keys ``capabilities`` (bool), ``landlock`` (its
        #: rules), ``seccomp`` (``"deny"`` new processes, or ``"contain"`` them in the group),
        #: ``seccomp_inet`` (whether network sockets may be made)
        self.spec = spec
        self._wrapper = wrapper

    def command(self, argv: list[str]) -> list[str]:
        """The command line that starts ``argv`` (a spawned child) inside the sandbox."""
        return [*self._wrapper, *argv]

    def adopt(self, process: trio.Process) -> trio.Process | bubblewrap.WrappedProcess:
        """The child as the host should see it (bwrap's status turned into the child's)."""
        return bubblewrap.WrappedProcess(process) if self._wrapper else process


class SandboxPolicy:
    """The layers a subprocess backend uses on this machine, and how they apply to a child.

    ``requested``: ``True`` uses every layer ``support`` has and records why the others are
    missing (``health()`` and ``doctor`` report them); a tuple of layer names requires each:
    one that is missing raises :class:`InvalidRequestError`; ``False`` uses none of them.
    """

    def __init__(self, requested: bool | tuple[str, ...], support: SandboxSupport) -> None:
        self.support = support
        self.requested = requested
        wanted = OPTIONAL_LAYERS if requested is True else requested or ()
        self.missing = {
            name: support[name].detail for name in wanted if not support[name].available
        }
        if self.missing and requested is not True:
            raise InvalidRequestError(
                "sandbox layer(s) not available on this machine: "
                + "; ".join(f"{name}: {why}" for name, why in self.missing.items()),
                details={"missing": self.missing},
            )
        self.layers = tuple(name for name in wanted if name not in self.missing)
        # Only a host that holds capabilities (root) passes them on to be dropped.
        self._drop_capabilities = "capabilities" in self.layers and capabilities.has_any()
        #: what the zygote's mount namespace shows, once it runs under bubblewrap
        self._zygote_view: tuple[list[str], list[str]] | None = None

    def __contains__(self, layer: str) -> bool:
        return layer in self.layers

    # -- one child ----------------------------------------------------------------------------

    def ahead(self) -> dict[str, Any]:
        """What every child applies whatever its execution, as plain data for
        ``bootstrap.prepare``: a child forked ahead of its execution does it while it waits
        (keys: ``capabilities``, ``landlock``, both bools)."""
        return {"capabilities": self._drop_capabilities, "landlock": "landlock" in self}

    def for_child(
        self,
        permissions: Permissions,
        *,
        workspace: str,
        root: str | None,
        env: dict[str, str],
        zygote: bool,
    ) -> ChildSandbox:
        """The sandbox of one execution's child. ``zygote``: forked by a zygote (bubblewrap,
        if used, wraps the zygote itself: see :meth:`zygote_wrapper`)."""
        spec: dict[str, Any] = {}
        layers = ["process", "rlimits"]
        read, granted_write = _paths(permissions, root)
        write = [workspace, *granted_write]
        connect = _ports(permissions.network.connect)
        shell = permissions.shell.allow
        if self._drop_capabilities:
            spec["capabilities"] = True
            layers.append("capabilities")
        if "landlock" in self:
            spec["landlock"] = {
                "read": read,
                "write": write,
                "execute": _executables(shell, env.get("PATH", os.defpath)),
                "tcp_connect": None if connect is None else sorted(connect),
            }
            layers.append("landlock")
        wrapper: list[str] = []
        if "bubblewrap" in self:
            layers.append("bubblewrap")
            if not zygote:
                wrapper = bubblewrap.command(
                    [],
                    bwrap=self.support.bwrap or "bwrap",
                    workspace=workspace,
                    read=[*_interpreter_paths(), *read],
                    write=write[1:],
                    network=bool(permissions.network.connect),
                    pid_namespace=True,
                )
        if "seccomp" in self:
            # "deny": no new processes; "contain" (shell.allow): they may be started, but
            # never leave the process group the host kills
            spec["seccomp"] = "contain" if shell else "deny"
            # without network.connect no network socket at all (UDP included), the same
            # for a zygote's children, which share its network namespace, as for spawned ones
            spec["seccomp_inet"] = bool(permissions.network.connect)
            layers.append("seccomp")
        return ChildSandbox(tuple(layers), spec, wrapper)

    def zygote_wrapper(
        self, workspaces: str, plugins: Iterable[tuple[Permissions, str | None]] = ()
    ) -> list[str]:
        """The bwrap command prefix for a zygote whose children lease workspaces under
        ``workspaces``; empty without bubblewrap.

        The zygote runs in one mount namespace that all its children share, made now:
        read-only root, private /tmp and /dev, ``workspaces`` writable, and what ``plugins``
        (permissions, root) may read and write bound in. No pid namespace (the zygote reports
        its children's pids, which the host signals: they must be the host's pids) and no
        network namespace (network grants differ per child; Landlock applies them per child).
        A plugin whose files this view does not show is run by :meth:`fits_zygote`'s caller
        in a spawned child instead.
        """
        if "bubblewrap" not in self:
            self._zygote_view = None
            return []
        read: list[str] = []
        write = [workspaces]
        for permissions, root in plugins:
            plugin_read, plugin_write = _paths(permissions, root)
            read += plugin_read
            write += plugin_write
        read, write = list(dict.fromkeys(read)), list(dict.fromkeys(write))
        self._zygote_view = (read, write)
        return bubblewrap.command(
            [],
            bwrap=self.support.bwrap or "bwrap",
            workspace=workspaces,
            read=[*_interpreter_paths(), *read],
            write=write[1:],
            network=True,
            pid_namespace=False,
            chdir="/",  # each child changes to its own workspace
        )

    def fits_zygote(self, permissions: Permissions, root: str | None) -> bool:
        """Whether a child forked by the zygote sees every file ``permissions`` grant: its
        mount namespace was fixed when the zygote started (always true without bubblewrap)."""
        if self._zygote_view is None:
            return True
        bound_read, bound_write = self._zygote_view
        read, write = _paths(permissions, root)
        return all(
            bubblewrap.visible(path, read=bound_read, write=bound_write, network=True)
            for path in read
        ) and all(_inside(path, bound_write) for path in write)

    # -- reporting ----------------------------------------------------------------------------

    def report(self, start_method: str) -> dict[str, Any]:
        """Each layer: active or not, and what it does or why not (for ``health()``)."""
        layers: dict[str, dict[str, Any]] = {}
        for name, status in self.support.layers.items():
            if name in ("process", "rlimits") or name in self.layers:
                active, detail = True, status.detail
            elif not status.available:
                active, detail = False, f"not available: {status.detail}"
            else:
                active, detail = False, "not requested (the backend's sandbox option)"
            layers[name] = {"active": active, "detail": detail}
        if "bubblewrap" in self.layers:
            layers["bubblewrap"]["mode"] = (
                "per child: mount, pid, IPC, UTS namespaces (+ network unless granted)"
                if start_method == "spawn"
                else "the zygote: one mount, IPC and UTS namespace shared by its children; "
                "no pid or network namespace"
            )
        return {"enabled": bool(self.layers), "layers": layers, "missing": self.missing}


def _paths(permissions: Permissions, root: str | None) -> tuple[list[str], list[str]]:
    """What ``permissions`` let a child read (its root first) and write, as existing paths."""
    reads, writes = confined_grants(permissions.fs.read, permissions.fs.write, root)
    read = _expand(reads, root)
    if root is not None and confined_root(root, permissions.fs.write) is not None:
        read.insert(0, root)  # else a write grant covers it, which the plugin may not swap
    if permissions.network.connect:
        read.extend(NETWORK_READ)
    return read, _expand(writes, root)


def _inside(path: str, directories: Iterable[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in directories)


def _expand(patterns: Iterable[str], root: str | None) -> list[str]:
    """Grant patterns as existing paths: relative to ``root``; globs expanded now."""
    paths: list[str] = []
    for pattern in patterns:
        if not os.path.isabs(pattern):
            if root is None:
                continue  # relative grants mean nothing without a plugin root
            pattern = os.path.join(root, pattern)
        if _GLOB_CHARS & set(pattern):
            paths.extend(sorted(glob.glob(pattern, recursive=True)))
        else:
            paths.append(os.path.normpath(pattern))
    return paths


def _ports(patterns: Iterable[str]) -> set[int] | None:
    """TCP ports in ``host:port`` patterns; None when one allows any port (``host:*``)."""
    ports: set[int] = set()
    for pattern in patterns:
        port = pattern.rpartition(":")[2]
        if not port.isdigit():
            return None
        ports.add(int(port))
    return ports


def _executables(commands: Iterable[str], path: str) -> list[str]:
    """The files a child may execute: the allowed commands, the interpreters of scripts among
    them, and the dynamic loader (the kernel opens it for execution too)."""
    found: list[str] = []
    for name in commands:
        resolved = shutil.which(name, path=path) if "/" not in name else name
        if resolved is None or not os.path.exists(resolved):
            continue
        found.append(os.path.realpath(resolved))
        interpreter = _shebang(resolved)
        if interpreter is not None:
            found.append(os.path.realpath(interpreter))
    if found:
        for pattern in _LOADERS:
            found.extend(os.path.realpath(p) for p in glob.glob(pattern))
    return list(dict.fromkeys(found))


def _shebang(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            first = f.readline(256)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].split()
    return os.fsdecode(words[0]) if words else None


def _interpreter_paths() -> list[str]:
    """What a child's interpreter reads, as the host sees it (for bubblewrap's binds)."""
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable)]
    paths.extend(entry for entry in sys.path if os.path.isabs(entry))
    return list(dict.fromkeys(paths))
