"""Permission checks: does a handler's :class:`~plugin_execution.manifest.Permissions` grant
this path, variable, URL, command, plugin or platform service?

Pure functions and one :class:`Grants` object per (permissions, plugin root), compiled once
and cached. Nothing here raises ``PermissionDeniedError``: the platform session does that,
so that every denial is also counted and logged in one place.

The grammar of the grant entries themselves (URL, ``host:port`` and service patterns) is in
:mod:`plugin_execution.grant_patterns`, which manifests are validated with; its names are
re-exported here.

Paths are compared after resolution (:func:`resolve_path`): ``..``, symlinks and repeated
slashes are resolved first, so no spelling of a path reaches outside what was granted. URL
paths are compared after percent-decoding, and dot segments in them are refused.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import unicodedata
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .grant_patterns import PLATFORM_SERVICES as PLATFORM_SERVICES
from .grant_patterns import UrlPattern as UrlPattern
from .grant_patterns import parse_connect_pattern as parse_connect_pattern
from .grant_patterns import parse_service_grant as parse_service_grant
from .grant_patterns import parse_url_pattern as parse_url_pattern

if TYPE_CHECKING:
    from .manifest import Permissions

__all__ = [
    "PLATFORM_SERVICES",
    "Grants",
    "PathProblem",
    "UrlPattern",
    "confined_grants",
    "confined_root",
    "grants_for",
    "parse_connect_pattern",
    "parse_service_grant",
    "parse_url_pattern",
    "resolve_path",
]

_GLOB_CHARS = frozenset("*?[")


# -- paths --------------------------------------------------------------------------------


class PathProblem(ValueError):
    """A path that is refused before any permission is looked at (NUL, look-alikes)."""


def resolve_path(path: str, base: str) -> str:
    """``path`` made absolute (relative to ``base``), with ``..``, ``.``, repeated slashes and
    symlinks resolved, as the kernel would resolve it now.

    Raises :class:`PathProblem` for a NUL byte, a path whose symlinks keep being replaced
    while it is resolved, a chain of symlinks too long to resolve, and for characters that Unicode
    compatibility normalisation (NFKC) turns into ``/`` or ``.`` segments: a path like
    ``"\\uff0e\\uff0e/x"`` is harmless to the kernel but may be read as ``../x`` by the next
    tool it is handed to, so it is refused rather than guessed at.
    """
    if not isinstance(path, str):
        raise PathProblem(f"a path must be a string, got {type(path).__name__}")
    if "\x00" in path:
        raise PathProblem("a path must not contain a NUL character")
    if not path.isascii():
        folded = unicodedata.normalize("NFKC", path)
        if folded.count("/") != path.count("/") or _dot_segments(folded) != _dot_segments(path):
            raise PathProblem(
                "the path holds characters that normalise to '/' or '.' (look-alikes)"
            )
    for _ in range(3):
        try:
            resolved = os.path.realpath(os.path.join(base, path))
            break
        except OSError:  # a symlink replaced between realpath's lstat and readlink
            continue
        except RecursionError:  # realpath recurses once per symlink: a chain of ~1000
            raise PathProblem("too many levels of symbolic links") from None
    else:
        raise PathProblem("the path kept changing while it was resolved")
    if resolved.startswith("//"):  # POSIX leaves '//' implementation-defined; Linux: '/'
        resolved = "/" + resolved.lstrip("/")
    return resolved


def _dot_segments(path: str) -> int:
    return sum(1 for part in path.split("/") if part in (".", ".."))


def _glob_regex(pattern: str) -> str:
    """A path glob as a regex: ``**`` crosses ``/``, ``*`` and ``?`` do not."""
    out = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", i + 2)
            if end == -1:
                out.append(re.escape(char))
            else:
                body = pattern[i + 1 : end]
                negate = body.startswith("!")
                body = re.escape(body[1:] if negate else body)
                out.append(f"[{'^/' if negate else ''}{body}]")
                i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def _absolute(patterns: Iterable[str], root: str | None) -> list[str]:
    """Grant patterns made absolute (relative ones are relative to the plugin's root, and
    mean nothing without one) and normalised."""
    paths = []
    for pattern in patterns:
        if not os.path.isabs(pattern):
            if root is None:
                continue
            pattern = os.path.join(root, pattern)
        paths.append(os.path.normpath(pattern))
    return paths


def _location(path: str) -> str:
    """Where ``path`` is: its parent resolved, not the path itself (whoever may write the
    parent may swap the last name for a symlink)."""
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else os.path.realpath(path)


def _writable(writes: list[str]) -> list[tuple[int, str]]:
    """The directories the plugin may write (its write grants without glob characters, by
    index), each where it is and where it resolves to."""
    return [
        (i, where)
        for i, path in enumerate(writes)
        if not _GLOB_CHARS & set(path)
        for where in {os.path.realpath(path), _location(path)}
    ]


def _literal_length(segments: list[str]) -> int:
    """How many leading ``segments`` of a path are literal (have no glob characters)."""
    literal = 0
    while literal < len(segments) and not _GLOB_CHARS & set(segments[literal]):
        literal += 1
    return literal


def _planted(pattern: str, writable: list[tuple[int, str]], own: int | None = None) -> bool:
    """Whether ``pattern`` (absolute) goes through a directory of ``writable`` (but its own
    entry, ``own``): one a name of it is looked up in, as it resolves now: those above the
    last name of a plain path; those down to the literal part of a glob."""
    segments = pattern.split("/")
    literal = _literal_length(segments)
    for end in range(1, min(literal, len(segments) - 1) + 1):
        where = os.path.realpath("/".join(segments[:end]) or "/")
        if any(i != own and _under(where, w) for i, w in writable):
            return True
    return False


def confined_grants(
    read: Iterable[str], write: Iterable[str], root: str | None
) -> tuple[list[str], list[str]]:
    """``fs.read`` and ``fs.write`` as absolute patterns, less every grant whose path goes
    through a directory the plugin may write (a write grant without glob characters).

    Such a grant adds nothing to the directory's own (which covers everything under it),
    except through what is there when the grant is resolved, and that is the plugin's to
    change: a plugin that may write ``/shared`` and read ``/shared/data/**`` could swap
    ``shared/data`` for a symlink to ``/`` and have the host (and the kernel's rules of its
    next child) resolve the read grant to the whole disk. Dropped, it cannot. The host's
    checks and the sandbox's rules take their grants from here (and the plugin's root from
    :func:`confined_root`)."""
    reads, writes = _absolute(read, root), _absolute(write, root)
    writable = _writable(writes)
    if not writable:
        return reads, writes
    return (
        [p for p in reads if not _planted(p, writable)],
        [p for i, p in enumerate(writes) if not _planted(p, writable, i)],
    )


def confined_root(root: str | None, write: Iterable[str]) -> str | None:
    """The plugin's ``root`` resolved, or None when its path goes through a directory the
    plugin may write (see :func:`confined_grants`): what it resolves to is then the
    plugin's choice, and the write grant lets it read that directory anyway."""
    if root is None:
        return None
    root = os.path.normpath(root)
    writable = _writable(_absolute(write, root))
    return None if writable and _planted(root, writable) else os.path.realpath(root)


def _path_grants(patterns: Iterable[str], root: str | None) -> list[tuple[str, str]]:
    """``(prefix, regex body)`` of each path grant: the resolved literal directory part of
    the pattern (where a walk to a matching path starts) and the regex of the whole. Literal
    prefixes are resolved (a grant of ``/tmp/x`` follows ``/tmp``'s symlink, as the requests
    it is compared with do); relative grants are relative to the plugin's root, and mean
    nothing without one."""
    grants = []
    for pattern in _absolute(patterns, root):
        segments = pattern.split("/")
        literal = _literal_length(segments)
        prefix = os.path.realpath("/".join(segments[:literal]) or "/")
        rest = "/".join(segments[literal:])
        if rest:
            body = re.escape(prefix.rstrip("/")) + "/" + _glob_regex(rest)
        else:
            body = re.escape(prefix.rstrip("/"))
        grants.append((prefix, body))
    return grants


def _compile_paths(grants: list[tuple[str, str]]) -> re.Pattern[str] | None:
    """One regex for a list of path grants. A grant covers what it matches and everything
    under it."""
    if not grants:
        return None
    return re.compile(f"(?:{'|'.join(body for _, body in grants)})(?:/.*)?", re.DOTALL)


def _anchors(grants: list[tuple[str, str]]) -> list[tuple[str, re.Pattern[str]]]:
    """Each grant's prefix with its own regex, longest prefix first."""
    compiled = [(prefix, re.compile(f"(?:{body})(?:/.*)?", re.DOTALL)) for prefix, body in grants]
    return sorted(compiled, key=lambda grant: len(grant[0]), reverse=True)


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


# -- grants ---------------------------------------------------------------------------------


class Grants:
    """One handler's permissions, compiled for fast checks. Get it from :func:`grants_for`.

    Checks return bool and take resolved values: a path from :func:`resolve_path`, a URL's
    lower-cased scheme and host, its effective port and its decoded path.
    """

    def __init__(self, permissions: Permissions, root: str | None) -> None:
        self.permissions = permissions
        self.root = confined_root(root or None, permissions.fs.write)
        reads, writes = confined_grants(permissions.fs.read, permissions.fs.write, root or None)
        read = _path_grants(reads, self.root)
        write = _path_grants(writes, self.root)
        self._read = _compile_paths(read)
        self._write = _compile_paths(write)
        self._read_anchors = _anchors(read + write)
        self._write_anchors = _anchors(write)
        self._env = permissions.env.read
        self._urls = [parse_url_pattern(p) for p in permissions.network.fetch]
        self._services: dict[str, list[str | None]] = {}
        for entry in permissions.platform:
            service, namespace = parse_service_grant(entry)
            self._services.setdefault(service, []).append(namespace)

    def fs_read(self, path: str, workspace: str | None) -> bool:
        """Readable: the workspace, the plugin's own root, and ``fs.read`` / ``fs.write``."""
        if workspace is not None and _under(path, workspace):
            return True
        if self.root is not None and _under(path, self.root):
            return True
        return any(
            grant is not None and grant.fullmatch(path) is not None
            for grant in (self._read, self._write)
        )

    def fs_write(self, path: str, workspace: str | None) -> bool:
        """Writable: the workspace and ``fs.write``; never the plugin's own root by default."""
        if workspace is not None and _under(path, workspace):
            return True
        return self._write is not None and self._write.fullmatch(path) is not None

    def fs_anchor(self, path: str, workspace: str | None, *, write: bool) -> str | None:
        """The directory a granted ``path`` is reached from: the workspace, the plugin's root
        (reading), or the literal directory part of the most specific grant that matches it.
        None when nothing grants ``path``. The host walks from here to ``path`` without
        following symlinks (see ``platform/_fdwalk.py``), so the walk stays inside the
        grant that allowed it."""
        if workspace is not None and _under(path, workspace):
            return workspace
        if not write and self.root is not None and _under(path, self.root):
            return self.root
        for prefix, grant in self._write_anchors if write else self._read_anchors:
            if grant.fullmatch(path) is not None:
                return prefix
        return None

    def env(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self._env)

    def url(self, scheme: str, host: str, port: int, path: str) -> bool:
        return any(p.matches(scheme, host, port, path) for p in self._urls)

    def invoke(self, plugin_id: str) -> bool:
        return any(fnmatch.fnmatchcase(plugin_id, p) for p in self.permissions.invoke.allow)

    def command(self, names: Iterable[str]) -> bool:
        """``names``: the command as asked for and the executable it resolves to."""
        allowed = self.permissions.shell.allow
        return any(name in allowed for name in names)

    def service(self, service: str, namespace: str, own: str) -> bool:
        """``namespace`` is what the call names (a cache namespace, an event topic); ``own``
        the plugin's private one: the bare service name grants it and ``own/...`` below it.
        ``service:pattern`` grants the namespaces matching pattern."""
        for granted in self._services.get(service, ()):
            if granted is None:
                if namespace == own or namespace.startswith(own + "/"):
                    return True
            elif fnmatch.fnmatchcase(namespace, granted):
                return True
        return False

    @property
    def services(self) -> frozenset[str]:
        return frozenset(self._services)


@functools.lru_cache(maxsize=1024)
def grants_for(permissions: Permissions, root: str | None) -> Grants:
    """The compiled :class:`Grants` of ``permissions`` (cached: manifests are immutable)."""
    return Grants(permissions, root)
