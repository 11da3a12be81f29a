"""Handlers that try to break out of the kernel sandbox (tests/sandbox), the subprocess
backend's and the sandboxed pool's.

Each does one thing a hostile plugin would, directly through the standard library (never
through ``ctx``), and returns what it got: a sandbox that works makes each one fail. Every
attempt is bounded, so a sandbox that does not work cannot hurt the machine running the tests.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from typing import Any


def read_file(ctx: Any, input: dict[str, str]) -> str:
    with open(input["path"]) as f:
        return f.read()


def fs_read(ctx: Any, input: dict[str, str]) -> str:
    """The same, asking the host (``ctx.fs``)."""
    return ctx.fs.read_text(input["path"])


def write_file(ctx: Any, input: dict[str, str]) -> str:
    with open(input["path"], "w") as f:
        f.write(input.get("data", "escaped"))
    return input["path"]


def follow_symlink(ctx: Any, input: dict[str, str]) -> str:
    """Plant a symlink in the workspace pointing outside it, then read (or write) through it."""
    link = os.path.join(ctx.workspace, "innocent.txt")
    os.symlink(input["target"], link)
    if input.get("write"):
        with open(link, "w") as f:
            f.write("escaped")
        return "written"
    with open(link) as f:
        return f.read()


def tcp_connect(ctx: Any, input: dict[str, Any]) -> str:
    with socket.create_connection((input["host"], input["port"]), timeout=5) as sock:
        return sock.recv(100).decode()


def tcp_listen(ctx: Any, input: Any) -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        return int(sock.getsockname()[1])


def environment(ctx: Any, input: dict[str, str]) -> str | None:
    return os.environ.get(input["name"])


def fork_bomb(ctx: Any, input: dict[str, int]) -> int:
    """Fork up to ``limit`` children that each try to leave the worker's process group (a
    session of their own) and sleep ``seconds``; return how many were started."""
    started = 0
    for _ in range(input["limit"]):
        if os.fork() == 0:
            try:
                try:
                    os.setsid()
                except OSError:
                    pass  # stay in the group, then
                time.sleep(input.get("seconds", 60))
            finally:
                os._exit(0)
        started += 1
    return started


def allocate(ctx: Any, input: dict[str, int]) -> int:
    block = bytearray(input["mb"] * 1024 * 1024)
    return len(block)


def burn_cpu(ctx: Any, input: dict[str, float]) -> int:
    """Spin for up to ``seconds`` of wall time (bounded, in case no CPU limit stops it)."""
    deadline = time.monotonic() + input["seconds"]
    spins = 0
    while time.monotonic() < deadline:
        spins += 1
    return spins


def run_shell(ctx: Any, input: dict[str, str] | None) -> str:
    done = subprocess.run(
        ["/bin/sh", "-c", (input or {}).get("command", "echo escaped")],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return done.stdout.decode()


def kill_pid(ctx: Any, input: dict[str, int]) -> str:
    os.kill(input["pid"], input.get("signal", signal.SIGKILL))
    return "sent"


def write_dev_shm(ctx: Any, input: Any) -> str:
    path = f"/dev/shm/escape-{os.getpid()}-{time.monotonic_ns()}"
    with open(path, "w") as f:
        f.write("escaped")
    os.unlink(path)
    return path


def raise_limit(ctx: Any, input: Any) -> list[int]:
    """Try to lift the address-space limit back to unlimited (root could, with its caps)."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    return list(resource.getrlimit(resource.RLIMIT_AS))


def make_device(ctx: Any, input: Any) -> str:
    """Make a block device node for the first disk in the workspace (root can, by default)."""
    path = os.path.join(ctx.workspace, "disk")
    os.mknod(path, 0o600 | 0o060000, os.makedev(8, 0))
    return path


def workspace_roundtrip(ctx: Any, input: Any) -> str:
    """What a well-behaved plugin does: write and read its workspace, import stdlib modules."""
    import json

    path = ctx.workspace / "data.json"
    path.write_text(json.dumps({"ok": True}))
    return str(json.loads(path.read_text())["ok"])


# -- attempts on a warm worker (the sandboxed pool) ---------------------------------------------


def hold_secret(ctx: Any, input: dict[str, Any]) -> str:
    """Write ``secret`` into the workspace and keep the execution open ``seconds``: another
    plugin's execution tries to read it meanwhile."""
    path = ctx.workspace / "secret.txt"
    path.write_text(input["secret"])
    time.sleep(input.get("seconds", 1.0))
    return str(path)


def linger(ctx: Any, input: dict[str, Any]) -> str:
    """Leave a thread behind that acts after the execution ended: for ``seconds`` it reads
    the paths listed in ``$HOME/targets.txt`` (written later, by the test) and logs what it
    got to ``$HOME/linger.log``. Returns ``$HOME``."""
    import threading

    home = os.environ["HOME"]

    def act() -> None:
        deadline = time.monotonic() + input.get("seconds", 5.0)
        while time.monotonic() < deadline:
            try:
                with open(os.path.join(home, "targets.txt")) as f:
                    targets = f.read().split()
            except OSError:
                targets = []
            for target in targets:
                try:
                    with open(target) as f:
                        got = "read:" + f.read()
                except OSError as exc:
                    got = f"{type(exc).__name__}:{exc.errno}"
                with open(os.path.join(home, "linger.log"), "a") as log:
                    log.write(f"{target} {got}\n")
            time.sleep(0.02)

    threading.Thread(target=act, daemon=True).start()
    return home


_remembered: list[str] = []


def remember(ctx: Any, input: str) -> list[str]:
    """Keep ``input`` in the worker's memory; return all it kept (state across executions)."""
    _remembered.append(input)
    return list(_remembered)


def peek_memory(ctx: Any, input: dict[str, int]) -> dict[str, str]:
    """Read ``size`` bytes at ``address`` in process ``pid`` (the host) every way Linux
    offers: ``/proc/<pid>/mem``, ``process_vm_readv``, ``ptrace`` (``PTRACE_SEIZE``, which
    does not stop it, then detach), and take its fd 0 with ``pidfd_getfd``. What each got:
    the bytes read as text, or the errno's name."""
    import ctypes
    import errno

    pid, address, size = input["pid"], input["address"], input["size"]
    libc = ctypes.CDLL(None, use_errno=True)
    got: dict[str, str] = {}

    def failed() -> str:
        return errno.errorcode.get(ctypes.get_errno(), "?")

    try:
        with open(f"/proc/{pid}/mem", "rb") as mem:
            mem.seek(address)
            got["proc_mem"] = mem.read(size).decode(errors="replace")
    except OSError as exc:
        got["proc_mem"] = errno.errorcode.get(exc.errno or 0, "?")

    class IOVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    buffer = ctypes.create_string_buffer(size)
    local, remote = IOVec(ctypes.addressof(buffer), size), IOVec(address, size)
    iovecs = [ctypes.c_void_p, ctypes.c_ulong]
    libc.process_vm_readv.argtypes = [ctypes.c_int, *iovecs, *iovecs, ctypes.c_ulong]
    count = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    got["process_vm_readv"] = buffer.raw[:count].decode(errors="replace") if count > 0 else failed()

    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace(0x4206, pid, None, None) == 0:  # PTRACE_SEIZE
        libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
        got["ptrace"] = "attached"
    else:
        got["ptrace"] = failed()

    pidfd = libc.syscall(434, pid, 0)  # pidfd_open
    if pidfd < 0:
        got["pidfd_getfd"] = failed()
    else:
        stolen = libc.syscall(438, pidfd, 0, 0)  # pidfd_getfd
        got["pidfd_getfd"] = "took fd 0" if stolen >= 0 else failed()
        if stolen >= 0:
            os.close(stolen)
        os.close(pidfd)
    return got
