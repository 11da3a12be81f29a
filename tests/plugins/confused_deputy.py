"""Handlers that try to make the host their confused deputy (tests/deputy).

Unlike tests/plugins/escape.py, these go *through* ``ctx``: the host does the work for them,
with its own (often root) rights, and each handler tries to make it do more than the
plugin's grants allow. Every attempt is bounded in count and time.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from collections import Counter
from typing import Any

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchanger() -> Any:
    """``exchange(a, b)``: swap two names atomically (renameat2 RENAME_EXCHANGE), or with
    two plain renames where libc lacks it."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)

    def exchange(a: str, b: str) -> None:
        flags = _RENAME_EXCHANGE
        if (
            renameat2 is not None
            and renameat2(_AT_FDCWD, a.encode(), _AT_FDCWD, b.encode(), flags) == 0
        ):
            return
        tmp = a + ".swap"
        os.rename(a, tmp)
        os.rename(b, a)
        os.rename(tmp, b)

    return exchange


class _Swapper:
    """A thread that keeps swapping ``name`` (a real directory) with a symlink to ``target``."""

    def __init__(self, workspace: str, name: str, target: str) -> None:
        self.path = os.path.join(workspace, name)
        self.other = os.path.join(workspace, name + ".link")
        os.makedirs(self.path, exist_ok=True)
        os.symlink(target, self.other)
        self.stop = threading.Event()
        self.swaps = 0
        self._exchange = _exchanger()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self._exchange(self.path, self.other)
                self.swaps += 1
            except OSError:
                time.sleep(0.0001)

    def __enter__(self) -> _Swapper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join()


def _outcome(exc: BaseException) -> str:
    """An ExecutionError's code; an OSError's type and errno name (``OSError:ELOOP``)."""
    code = getattr(exc, "code", None)
    if code:
        return str(code)
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{type(exc).__name__}:{errno.errorcode.get(exc.errno, exc.errno)}"
    return type(exc).__name__


def swap_read(ctx: Any, input: dict[str, Any]) -> dict[str, Any]:
    """Read ``d/shadow`` while ``d`` flips between a directory holding a decoy and a symlink
    to ``input["target"]`` (a directory with a ``shadow`` the plugin may not read)."""
    workspace = str(ctx.workspace)
    swapper = _Swapper(workspace, "d", input["target"])
    with open(os.path.join(swapper.path, "shadow"), "w") as f:
        f.write("decoy")
    outcomes: Counter[str] = Counter()
    leaks: list[str] = []
    deadline = time.monotonic() + input["seconds"]
    with swapper:
        for _ in range(input["attempts"]):
            if time.monotonic() > deadline:
                break
            try:
                data = ctx.fs.read("d/shadow")
            except Exception as exc:
                outcomes[_outcome(exc)] += 1
                continue
            if data == b"decoy":
                outcomes["decoy"] += 1
            else:
                outcomes["leaked"] += 1
                leaks.append(data[:40].decode("latin-1"))
    return {"outcomes": dict(outcomes), "leaks": leaks[:3], "swaps": swapper.swaps}


def swap_write(ctx: Any, input: dict[str, Any]) -> dict[str, Any]:
    """Write ``w/pwned-N.txt`` while ``w`` flips between a directory and a symlink to
    ``input["target"]`` (a directory outside every grant)."""
    workspace = str(ctx.workspace)
    swapper = _Swapper(workspace, "w", input["target"])
    outcomes: Counter[str] = Counter()
    deadline = time.monotonic() + input["seconds"]
    with swapper:
        for i in range(input["attempts"]):
            if time.monotonic() > deadline:
                break
            try:
                ctx.fs.write(f"w/sub/pwned-{i}.txt" if i % 2 else f"w/pwned-{i}.txt", "pwned")
            except Exception as exc:
                outcomes[_outcome(exc)] += 1
                continue
            outcomes["written"] += 1
    return {"outcomes": dict(outcomes), "swaps": swapper.swaps}


def read_fifo(ctx: Any, input: dict[str, Any]) -> dict[str, Any]:
    """Make ``count`` FIFOs in the workspace and ``ctx.fs.read`` them all at once (one thread
    each); return how each call ended and how long the slowest took."""
    workspace = str(ctx.workspace)
    names = [f"fifo-{i}" for i in range(input["count"])]
    for name in names:
        os.mkfifo(os.path.join(workspace, name))
    results: dict[str, str] = {}
    started = time.monotonic()

    def read(name: str) -> None:
        try:
            results[name] = repr(ctx.fs.read(name))
        except Exception as exc:
            results[name] = _outcome(exc)

    threads = [threading.Thread(target=read, args=(name,), daemon=True) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(input.get("join", 60))
    return {
        "outcomes": dict(Counter(results.values())),
        "unfinished": sum(thread.is_alive() for thread in threads),
        "seconds": time.monotonic() - started,
    }


def fs_call(ctx: Any, input: dict[str, Any]) -> Any:
    """One ``ctx.fs`` call: ``{"method": ..., "args": [...]}``; an error as its code. The
    symlinks ``input["links"]`` (``[name, target]`` pairs) are made in the workspace first."""
    for name, target in input.get("links", ()):
        os.symlink(target, os.path.join(str(ctx.workspace), name))
    try:
        return getattr(ctx.fs, input["method"])(*input.get("args", []))
    except Exception as exc:
        return {"error": _outcome(exc), "message": str(exc)}


def storage_call(ctx: Any, input: dict[str, Any]) -> Any:
    """One ``ctx.storage`` call (``put_in``: ``put(key, data, namespace=...)``); an error as
    its type, code and message."""
    try:
        if input["method"] == "put_in":
            namespace, key, data = input["args"]
            return ctx.storage.put(key, data, namespace=namespace)
        return getattr(ctx.storage, input["method"])(*input.get("args", []))
    except Exception as exc:
        return {"error": _outcome(exc), "message": str(exc), "filename": _filename(exc)}


def _filename(exc: BaseException) -> str | None:
    name = getattr(exc, "filename", None)
    return name if isinstance(name, str) else None


def fetch_call(ctx: Any, input: dict[str, Any]) -> Any:
    """``ctx.fetch(url, headers=...)``: the response's status and body, or the error."""
    try:
        response = ctx.fetch(input["url"], headers=input.get("headers"))
    except Exception as exc:
        details = getattr(exc, "details", {})
        return {"error": _outcome(exc), "message": str(exc), "details": details}
    return {"status": response.status, "body": response.text}


def link_then_write(ctx: Any, input: dict[str, Any]) -> dict[str, Any]:
    """Hard-link ``input["target"]`` (a file the plugin may read, not write) into the
    workspace, then ask the host to write through the link: how each step ended."""
    report: dict[str, Any] = {}
    link = os.path.join(str(ctx.workspace), "linked")
    try:
        os.link(input["target"], link)
        report["link"] = "made"
    except Exception as exc:
        report["link"] = _outcome(exc)
    try:
        ctx.fs.write("linked", "pwned by a hard link")
        report["write"] = "written"
    except Exception as exc:
        report["write"] = _outcome(exc)
    return report


def plant_link(ctx: Any, input: dict[str, str]) -> str:
    """Swap ``input["granted"]`` (a directory a read grant names, beneath a directory this
    plugin may write) for a symlink to ``input["target"]``, directly (no ``ctx``)."""
    granted = input["granted"]
    if os.path.isdir(granted) and not os.path.islink(granted):
        os.rename(granted, granted + ".moved")
    os.symlink(input["target"], granted)
    return os.readlink(granted)


def read_planted(ctx: Any, input: dict[str, str]) -> dict[str, str]:
    """Read ``input["path"]`` directly and through ``ctx.fs``: what each got, or the error."""
    got: dict[str, str] = {}
    try:
        with open(input["path"]) as f:
            got["direct"] = f.read()
    except OSError as exc:
        got["direct"] = type(exc).__name__
    try:
        got["ctx.fs"] = ctx.fs.read_text(input["path"])
    except Exception as exc:
        got["ctx.fs"] = getattr(exc, "code", type(exc).__name__)
    return got
