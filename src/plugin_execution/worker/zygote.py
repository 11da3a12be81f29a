"""The zygote: a warm helper process that forks one fresh worker child per request.

It imports the worker runtime (and trio, for async handlers) once; each fork then starts with
all of that already in memory, in ~2 ms instead of a fresh interpreter's tens of ms. Children
share nothing after the fork: each gets its own socket, session, cwd, environment and limits.

Control channel: a SOCK_SEQPACKET socket to the host, one msgpack map per message.

- host -> zygote: ``{"t": "spawn", "id", "cwd", "env", "limits", "sandbox"}`` carrying two fds
  (SCM_RIGHTS): the child's protocol socket and its stdout/stderr pipe; or
  ``{"t": "spawn", "id", "ahead": {...}}`` with the same fds: a child forked *ahead* of
  its execution, which does what every child does (``bootstrap.prepare(ahead)``), then
  reads its setup from the host on its protocol socket once it is known (see
  :func:`_read_setup`);
- zygote -> host: ``{"t": "ready", "pid"}`` once warm; ``{"t": "spawned", "id", "pid"}``
  or ``{"t": "spawn_failed", "id", "error"}``; ``{"t": "exited", "pid", "status"}`` when it
  reaps a child (``status`` as ``subprocess`` reports it: exit code, or -signal).

The zygote exits when the host closes the channel, killing whatever it still has below it.

It is a child subreaper, like its workers: what a worker's handler left running when the
worker died (a ``setsid`` double fork, say) comes to the zygote, which kills and reaps it. It
reports only its own workers' exits.
"""

from __future__ import annotations

import array
import os
import select
import signal
import socket

import msgpack

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

_MAX_MESSAGE = 1 << 20
_PR_SET_PDEATHSIG = 1
_workers: set[int] = set()  # the children this zygote forked and has not reaped yet


def _recv(ctl: socket.socket) -> tuple[dict[str, object] | None, list[int]]:
    fds = array.array("i")
    try:
        data, ancdata, _flags, _addr = ctl.recvmsg(
            _MAX_MESSAGE, socket.CMSG_SPACE(8 * fds.itemsize)
        )
    except ConnectionResetError:  # the host closed while reports to it were unread: an end
        return None, []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data:
        return None, list(fds)
    return msgpack.unpackb(data, raw=False), list(fds)


def _send(ctl: socket.socket, message: dict[str, object]) -> None:
    try:
        ctl.send(msgpack.packb(message, use_bin_type=True))
    except (BrokenPipeError, ConnectionResetError):  # the host is gone: so is the zygote
        _exit()


def _exit() -> NoReturn:
    """End the zygote, and everything still below it (workers, what dead ones left)."""
    from ._leftovers import kill_leftovers

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    kill_leftovers()
    os._exit(0)


def _status(raw: int) -> int:
    return -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)


def _reap(ctl: socket.socket) -> None:
    from ._leftovers import descendants, kill_all

    worker_died = False
    while True:
        try:
            pid, raw = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        if pid in _workers:
            _workers.discard(pid)
            status = _status(raw)
            # A worker that exits with 0 killed what its handlers left; one that died
            # otherwise (a crash, a kill) may have left orphans, which came to us.
            worker_died = worker_died or status != 0
            _send(ctl, {"t": "exited", "pid": pid, "status": status})
        # else: something a dead worker left, killed below, reaped now
    if worker_died:
        orphans = descendants(os.getpid(), skip=_workers)
        if orphans:
            kill_all(orphans)


def _read_exactly(fd: int, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _read_setup(fd: int) -> dict[str, object]:
    """In a child forked ahead: wait for its setup, the first bytes the host sends on its
    protocol socket (a 4-byte big-endian length, then a msgpack map: ``cwd``, ``env``,
    ``limits``, ``sandbox``), reading nothing past it. The host closing the socket first (the
    child was not needed after all) ends the child quietly."""
    head = _read_exactly(fd, 4)
    size = int.from_bytes(head or b"", "big")
    body = _read_exactly(fd, size) if head is not None and 0 < size <= _MAX_MESSAGE else None
    if body is None:
        os._exit(0)
    setup = msgpack.unpackb(body, raw=False)
    if not isinstance(setup, dict):
        raise TypeError("the setup is not a map")
    return setup


def _die_with(zygote: int) -> None:
    """Have the kernel SIGKILL this child when the zygote dies: a child forked ahead may
    wait a while, and must not be handed a setup (and run a plugin) once its zygote is
    gone. Without ctypes the host still kills it when it sees the zygote go."""
    try:
        from ..sandbox import _libc

        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (ImportError, OSError):
        return
    if os.getppid() != zygote:  # it died before that took effect
        os._exit(0)


def _become_worker(request: dict[str, object], sock_fd: int, out_fd: int, zygote: int) -> None:
    """In the forked child: detach from the zygote, set up, and serve. Never returns.

    A child forked ahead (``request["ahead"]``) does everything that is the same for every
    execution first (detach, close the zygote's fds), then waits for its setup."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.closerange(3, sock_fd)  # the control socket, the wake pipe, out_fd: all of them
        os.closerange(sock_fd + 1, 1 << 16)
        ahead = request.get("ahead")
        if ahead:
            _die_with(zygote)
            if isinstance(ahead, dict):
                from .bootstrap import prepare

                prepare(ahead, sock_fd)
            request = _read_setup(sock_fd)
        cwd = request.get("cwd")
        if isinstance(cwd, str):
            os.chdir(cwd)
        env = request.get("env")
        if isinstance(env, dict):
            os.environ.clear()
            os.environ.update(env)
        from .bootstrap import serve

        sandbox = request.get("sandbox")
        serve(
            sock_fd,
            str(request.get("limits") or ""),
            sandbox if isinstance(sandbox, dict) else None,
        )
    except BaseException as exc:
        os.write(2, f"zygote child failed to start: {type(exc).__name__}: {exc}\n".encode())
    finally:
        os._exit(70)


def _spawn(ctl: socket.socket, request: dict[str, object], fds: list[int]) -> None:
    if len(fds) != 2:
        for fd in fds:
            os.close(fd)
        _send(ctl, {"t": "spawn_failed", "id": request.get("id"), "error": "expected 2 fds"})
        return
    sock_fd, out_fd = fds
    zygote = os.getpid()
    try:
        pid = os.fork()
    except OSError as exc:
        _send(ctl, {"t": "spawn_failed", "id": request.get("id"), "error": str(exc)})
        pid = -1
    if pid == 0:
        _become_worker(request, sock_fd, out_fd, zygote)
    os.close(sock_fd)
    os.close(out_fd)
    if pid > 0:
        _workers.add(pid)
        _send(ctl, {"t": "spawned", "id": request.get("id"), "pid": pid})


def main(fd: int) -> None:
    """Serve spawn requests on control socket ``fd`` until the host goes away."""
    ctl = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    import gc
    import resource  # noqa: F401  (used by every child to apply its limits)

    from . import bootstrap, runtime  # noqa: F401  (warm: every child starts with them)

    try:  # warm for sandboxed children: ctypes and the layers they apply after the fork
        from ..sandbox import _libc, capabilities, landlock, seccomp  # noqa: F401

        _libc.libc()
        seccomp.warm()
    except (ImportError, OSError):
        pass
    try:
        from ._leftovers import become_subreaper

        become_subreaper()
    except (ImportError, OSError):
        pass

    try:
        import trio  # warm for async handlers

        async def _first_run() -> None:
            await trio.lowlevel.checkpoint()

        # A first trio.run does one-time set-up (lazy imports, caches): here, once, rather
        # than in every child's first async handler (~half of its loop's start, measured).
        trio.run(_first_run)
    except ImportError:
        pass
    gc.freeze()  # children inherit a frozen heap: the GC won't touch (copy) its pages
    wake = os.pipe()
    os.set_blocking(wake[1], False)
    signal.set_wakeup_fd(wake[1])
    signal.signal(signal.SIGCHLD, lambda *_: None)
    _send(ctl, {"t": "ready", "pid": os.getpid()})
    while True:
        try:
            readable, _, _ = select.select([ctl.fileno(), wake[0]], [], [])
        except InterruptedError:
            continue
        if wake[0] in readable:
            os.read(wake[0], 4096)
            _reap(ctl)
        if ctl.fileno() in readable:
            request, fds = _recv(ctl)
            if request is None:
                _exit()
            if request.get("t") == "spawn":
                _spawn(ctl, request, fds)
            else:
                for extra in fds:
                    os.close(extra)
