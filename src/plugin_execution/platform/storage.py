"""``ctx.storage``: blobs (bytes) under keys like ``"reports/2024/q1.pdf"``, namespaced per
plugin, kept under a host directory.

The service checks the grant and the key; a :class:`StorageBackend` keeps the bytes. The
default, :class:`FileStorage`, writes one file per key under ``root/<namespace>/``,
atomically (a temporary file renamed into place).

A key names at most :data:`MAX_KEY_PARTS` levels of ``/``, each at most 255 UTF-8 bytes (a
file name's limit), and a namespace at most :data:`MAX_NAMESPACE_PARTS`, so a plugin cannot
make the host create deep directory chains; deleting
a key removes the directories it leaves empty. Errors name the key, never the host's storage
path, and each call ends at the execution's deadline.
"""

from __future__ import annotations

import os
import tempfile
import unicodedata
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import trio

from ..errors import InvalidRequestError
from . import _args

if TYPE_CHECKING:
    from .session import PlatformSession

T = TypeVar("T")

__all__ = [
    "MAX_KEY_PARTS",
    "MAX_NAMESPACE_PARTS",
    "FileStorage",
    "StorageBackend",
    "StorageService",
    "check_key",
]

#: How many ``/``-separated parts a storage key may have (its directory depth on disk).
MAX_KEY_PARTS = 16
#: How many ``/``-separated parts a storage namespace may have (``plugin.id/sub``...).
MAX_NAMESPACE_PARTS = 4
_NAME_MAX = 255
_STORAGE_THREADS = 8  # FileStorage's own bound, apart from trio's default thread limiter


class StorageBackend(Protocol):
    """Where blobs live. Keys are already checked: relative, ``/``-separated, no dot segments."""

    async def put(self, namespace: str, key: str, data: bytes) -> None: ...

    async def get(self, namespace: str, key: str) -> bytes | None: ...

    async def delete(self, namespace: str, key: str) -> bool: ...

    async def list(self, namespace: str, prefix: str) -> list[str]: ...


def check_key(value: Any) -> str:
    """A storage key: relative, ``/``-separated, no empty, ``.`` or ``..`` segments, no NUL,
    and no look-alike characters that normalise into any of those."""
    key = _args.text(value, "storage key", limit=1024)
    folded = unicodedata.normalize("NFKC", key)
    for form in {key, folded}:
        if form.startswith("/") or any(part in ("", ".", "..") for part in form.split("/")):
            raise InvalidRequestError(
                f"storage key {key!r} must be relative, '/'-separated, without empty, '.' "
                "or '..' parts"
            )
    if folded.count("/") != key.count("/"):
        raise InvalidRequestError(f"storage key {key!r} holds look-alikes of '/'")
    parts = key.split("/")
    if len(parts) > MAX_KEY_PARTS:
        raise InvalidRequestError(
            f"storage key {key[:80]!r}... has {len(parts)} '/'-separated parts; "
            f"at most {MAX_KEY_PARTS} are allowed"
        )
    if any(len(part.encode("utf-8", "surrogatepass")) > _NAME_MAX for part in parts):
        raise InvalidRequestError(
            f"each '/'-separated part of a storage key is at most {_NAME_MAX} UTF-8 bytes"
        )
    return key


class ListTooLong(Exception):
    """A key listing passed its byte limit (see :meth:`FileStorage.list`)."""


#: What each key of a listing counts against the transfer limit besides its characters.
_LIST_ITEM_BYTES = 8


class FileStorage:
    """Blobs as files under ``root``: ``root/<namespace>/<key>``. Blocking file work runs in
    a worker thread. ``root=None`` uses a private temporary directory, removed by
    :meth:`aclose` (so those blobs last as long as the platform)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self._owned = root is None
        self._root = Path(root) if root is not None else None
        self._threads = trio.CapacityLimiter(_STORAGE_THREADS)

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self._threads)

    @property
    def root(self) -> Path:
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="plugin-storage-"))
        return self._root

    def _path(self, namespace: str, key: str) -> Path:
        base = os.path.realpath(self.root / namespace)
        path = os.path.realpath(os.path.join(base, key))
        if not path.startswith(base + "/"):  # a symlink planted under the root
            raise InvalidRequestError(f"storage key {key!r} resolves outside its namespace")
        return Path(path)

    async def put(self, namespace: str, key: str, data: bytes) -> None:
        path = self._path(namespace, key)

        def write() -> None:
            for attempt in range(3):
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                try:
                    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".put-")
                    break
                except FileNotFoundError:  # a delete pruned the empty directory meanwhile
                    if attempt == 2:
                        raise
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise

        await self._in_thread(write)

    async def get(self, namespace: str, key: str) -> bytes | None:
        path = self._path(namespace, key)

        def read() -> bytes | None:
            try:
                return path.read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None

        return await self._in_thread(read)

    async def delete(self, namespace: str, key: str) -> bool:
        path = self._path(namespace, key)
        namespace_dir = self.root / namespace

        def unlink() -> bool:
            base = Path(os.path.realpath(namespace_dir))
            try:
                path.unlink()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return False
            for parent in path.parents:  # the directories the key leaves empty
                if parent == base or base not in parent.parents:
                    break
                try:
                    parent.rmdir()
                except OSError:
                    break
            return True

        return await self._in_thread(unlink)

    async def list(self, namespace: str, prefix: str, *, max_bytes: int | None = None) -> list[str]:
        """The keys under ``prefix``, sorted. ``max_bytes``: past that many bytes of keys the
        walk stops and :class:`ListTooLong` is raised (nothing more is held)."""
        base = self.root / namespace
        limit = max_bytes if max_bytes is not None else float("inf")

        def walk() -> list[str]:
            keys = []
            size = 0
            for directory, _dirs, files in os.walk(base):
                rel = os.path.relpath(directory, base)
                for name in files:
                    if name.startswith(".put-"):
                        continue
                    key = name if rel == "." else f"{rel}/{name}"
                    if key.startswith(prefix):
                        size += len(key) + _LIST_ITEM_BYTES
                        if size > limit:
                            raise ListTooLong
                        keys.append(key)
            return sorted(keys)

        return await self._in_thread(walk)

    def close(self) -> None:
        """Remove the temporary root, if this storage made one."""
        if self._owned and self._root is not None:
            import shutil

            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None


class StorageService:
    """Host side of ``ctx.storage``: grant ``platform = ["storage"]`` (the plugin's own
    namespace) or ``"storage:NAME-PATTERN"`` (shared namespaces)."""

    def __init__(self, backend: StorageBackend, max_bytes: int) -> None:
        self.backend = backend
        self.max_bytes = max_bytes

    def _namespace(self, session: PlatformSession, namespace: Any) -> str:
        ns = _args.namespace(namespace, session.plugin_id)
        parts = ns.split("/")
        if len(parts) > MAX_NAMESPACE_PARTS or any(part in ("", ".") for part in parts):
            raise InvalidRequestError(
                f"a storage namespace has at most {MAX_NAMESPACE_PARTS} '/'-separated parts, "
                f"none empty or '.': {ns[:80]!r}"
            )
        if not session.grants.service("storage", ns, session.plugin_id):
            grant = "storage" if ns == session.plugin_id else f"storage:{ns}"
            session.deny(f"platform.{grant}", f"storage namespace {ns}")
        return ns

    async def _call(
        self, session: PlatformSession, key: str, call: Callable[[], Awaitable[T]]
    ) -> T:
        """Run a backend call under the execution's deadline. An ``OSError`` is raised
        again naming the key only: its own message and filename hold the host's path."""
        failed: OSError | None = None
        with trio.move_on_at(session.deadline) as scope:
            try:
                return await call()
            except OSError as exc:
                failed = exc
        if failed is not None:
            # raised outside the except block, so the host's error is not its __context__
            raise OSError(failed.errno, failed.strerror or "storage error", f"storage key {key}")
        assert scope.cancelled_caught
        raise session.past_deadline(f"ctx.storage on {key!r}")

    async def put(
        self, session: PlatformSession, key: Any, data: Any, namespace: Any = None
    ) -> None:
        ns = self._namespace(session, namespace)
        blob = _args.data_bytes(data, "data")
        if len(blob) > self.max_bytes:
            raise InvalidRequestError(f"a blob is limited to {self.max_bytes} bytes")
        name = check_key(key)
        await self._call(session, name, lambda: self.backend.put(ns, name, blob))

    async def get(
        self, session: PlatformSession, key: Any, default: Any = None, namespace: Any = None
    ) -> Any:
        ns = self._namespace(session, namespace)
        name = check_key(key)
        blob = await self._call(session, name, lambda: self.backend.get(ns, name))
        return default if blob is None else blob

    async def exists(self, session: PlatformSession, key: Any, namespace: Any = None) -> bool:
        ns = self._namespace(session, namespace)
        name = check_key(key)
        return await self._call(session, name, lambda: self.backend.get(ns, name)) is not None

    async def delete(self, session: PlatformSession, key: Any, namespace: Any = None) -> bool:
        ns = self._namespace(session, namespace)
        name = check_key(key)
        return await self._call(session, name, lambda: self.backend.delete(ns, name))

    async def list(
        self, session: PlatformSession, prefix: Any = "", namespace: Any = None
    ) -> list[str]:
        ns = self._namespace(session, namespace)
        if type(prefix) is not str:
            raise InvalidRequestError("prefix must be a string")
        backend = self.backend
        if isinstance(backend, FileStorage):
            listing = partial(backend.list, ns, prefix, max_bytes=self.max_bytes)
        else:
            listing = partial(backend.list, ns, prefix)
        try:
            keys = await self._call(session, prefix or "prefix ''", listing)
        except ListTooLong:
            keys = None
        if keys is None or sum(len(key) + _LIST_ITEM_BYTES for key in keys) > self.max_bytes:
            raise InvalidRequestError(
                f"the keys under prefix {prefix[:80]!r} pass the {self.max_bytes}-byte limit of a "
                "transfer (max_transfer_bytes): list a narrower prefix"
            )
        return keys
