"""``ctx.storage``: blobs (bytes) under keys like ``"reports/2024/q1.pdf"``, namespaced per
plugin, kept under a host directory.

The service checks the grant and the key; a :class:`StorageBackend` keeps the bytes. The
default, :class:`FileStorage`, writes one file per key under ``root/<namespace>/``,
atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import os
import tempfile
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ..errors import InvalidRequestError
from . import _args

if TYPE_CHECKING:
    from .session import PlatformSession

__all__ = ["FileStorage", "StorageBackend", "StorageService", "check_key"]


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
    return key


class FileStorage:
    """Blobs as files under ``root``: ``root/<namespace>/<key>``. Blocking file work runs in
    a worker thread. ``root=None`` uses a private temporary directory, removed by
    :meth:`aclose` (so those blobs last as long as the platform)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self._owned = root is None
        self._root = Path(root) if root is not None else None

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
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".put-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise

        await trio.to_thread.run_sync(write)

    async def get(self, namespace: str, key: str) -> bytes | None:
        path = self._path(namespace, key)

        def read() -> bytes | None:
            try:
                return path.read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None

        return await trio.to_thread.run_sync(read)

    async def delete(self, namespace: str, key: str) -> bool:
        path = self._path(namespace, key)
        try:
            path.unlink()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return False
        return True

    async def list(self, namespace: str, prefix: str) -> list[str]:
        base = self.root / namespace

        def walk() -> list[str]:
            keys = []
            for directory, _dirs, files in os.walk(base):
                rel = os.path.relpath(directory, base)
                for name in files:
                    if name.startswith(".put-"):
                        continue
                    key = name if rel == "." else f"{rel}/{name}"
                    if key.startswith(prefix):
                        keys.append(key)
            return sorted(keys)

        return await trio.to_thread.run_sync(walk)

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
        if not session.grants.service("storage", ns, session.plugin_id):
            grant = "storage" if ns == session.plugin_id else f"storage:{ns}"
            session.deny(f"platform.{grant}", f"storage namespace {ns}")
        return ns

    async def put(
        self, session: PlatformSession, key: Any, data: Any, namespace: Any = None
    ) -> None:
        ns = self._namespace(session, namespace)
        blob = _args.data_bytes(data, "data")
        if len(blob) > self.max_bytes:
            raise InvalidRequestError(f"a blob is limited to {self.max_bytes} bytes")
        await self.backend.put(ns, check_key(key), blob)

    async def get(
        self, session: PlatformSession, key: Any, default: Any = None, namespace: Any = None
    ) -> Any:
        ns = self._namespace(session, namespace)
        blob = await self.backend.get(ns, check_key(key))
        return default if blob is None else blob

    async def exists(self, session: PlatformSession, key: Any, namespace: Any = None) -> bool:
        ns = self._namespace(session, namespace)
        return await self.backend.get(ns, check_key(key)) is not None

    async def delete(self, session: PlatformSession, key: Any, namespace: Any = None) -> bool:
        ns = self._namespace(session, namespace)
        return await self.backend.delete(ns, check_key(key))

    async def list(
        self, session: PlatformSession, prefix: Any = "", namespace: Any = None
    ) -> list[str]:
        ns = self._namespace(session, namespace)
        if type(prefix) is not str:
            raise InvalidRequestError("prefix must be a string")
        return await self.backend.list(ns, prefix)
