"""Turning a fresh process into a worker: limits, then the sandbox, then the runtime.

Shared by the spawn entry point (``__main__``) and the zygote's forked children. Everything
here runs before any plugin code is imported, while the process has a single thread (Landlock,
seccomp and capabilities apply to the calling thread and what it starts later).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_LIMITS = {
    "as": "RLIMIT_AS",
    "cpu": "RLIMIT_CPU",
    "nofile": "RLIMIT_NOFILE",
    "fsize": "RLIMIT_FSIZE",
    "nproc": "RLIMIT_NPROC",
}
_SANDBOX_EXIT = 71  # EX_OSERR: the sandbox could not be applied; no plugin code ran
#: What :func:`prepare` did ahead: "subreaper", "capabilities" (True), "landlock" (a ruleset),
#: "worker" (the runtime, not serving yet).
_prepared: dict[str, Any] = {}


def apply_limits(spec: str) -> None:
    """Apply ``as=BYTES,cpu=S,...`` as both soft and hard limits (plugin code can't raise them).

    The CPU limit's hard limit is one second above the soft one: at the soft limit the kernel
    sends SIGXCPU, which names the reason the child died; only a child that catches SIGXCPU
    and goes on gets the SIGKILL of the hard limit. No core files: a crash never dumps the
    worker's memory into its workspace.
    """
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        which = getattr(resource, _LIMITS[name])
        limit = int(value)
        hard = limit + 1 if name == "cpu" else limit
        _, current = resource.getrlimit(which)
        if current != resource.RLIM_INFINITY and hard > current:
            # Stricter already (and raising it would need a capability the child may have
            # dropped by now: see prepare): keep it.
            hard = current
            limit = min(limit, hard)
        resource.setrlimit(which, (limit, hard))


def prepare(spec: dict[str, Any], fd: int) -> None:
    """In a child forked ahead, before its execution is known: what every child of its
    backend does (``spec``: see ``sandbox.policy.SandboxPolicy.ahead``). It becomes a
    subreaper, drops its capabilities, builds the Landlock rules every child has, and makes
    (does not start) its worker runtime on socket ``fd``; :func:`serve` then does only the
    rest. A step that fails is left for :func:`serve`, which fails it the usual way.
    ``spec["trio"]``: the backend's last execution was async, so this one likely is too: run
    a trio loop once here (see :func:`_warm_loop`).

    Such a child runs one execution: its worker runs the trio loop on its reading thread
    (``Worker(loop_here=True)``), the main thread, and its allocator keeps the memory it
    frees (see :func:`_keep_freed_memory`)."""
    try:
        from ._leftovers import become_subreaper

        _prepared["subreaper"] = become_subreaper()
    except (ImportError, OSError):
        pass
    try:
        if spec.get("capabilities"):
            from ..sandbox import capabilities

            capabilities.drop_all()
            _prepared["capabilities"] = True
        if spec.get("landlock"):
            from ..sandbox import landlock

            _prepared["landlock"] = landlock.base_ruleset()
    except OSError:
        pass
    from .runtime import Worker

    # Plain objects (no thread, no read of the socket): nothing here depends on the sandbox,
    # the environment or the cwd that the execution's setup brings.
    _prepared["worker"] = Worker(fd, loop_here=True)
    _keep_freed_memory()
    _touch_ahead()
    _rehearse_import()
    if spec.get("trio") and not _setup_waiting(fd):
        _warm_loop()


_M_TRIM_THRESHOLD = -1  # mallopt's parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


def _keep_freed_memory() -> None:
    """Have glibc keep the memory this one-shot child frees, for its next allocations.

    By default the main thread's allocations of more than 128 KiB are mapped and unmapped
    one by one, or given back to the kernel when freed at the top of the heap; a thread's
    arena keeps them. With the trio loop on the main thread (see ``Worker._run_loop_here``)
    an async handler sending 4 MiB platform calls paid ~2,000 page faults per call (~8-28
    ms against 2-17 ms, measured), as a sync one on that thread always did. A child that
    lives for one execution loses nothing by keeping what it freed (up to 256 MiB at the
    heap's top; blocks under 32 MiB come from the heap). Without ctypes, the defaults."""
    try:
        from ..sandbox import _libc

        lib = _libc.libc()
        lib.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
        lib.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    except (ImportError, OSError, AttributeError):
        pass


def _touch_ahead() -> None:
    """Run, once and to no effect, the code every child runs first once its setup comes (a
    frame encoded and decoded, a thread object made but not started, the environment
    replaced): the copy-on-write faults and cold caches of that first run are then had
    here, off the execution's path (the environment's: 0.1 ms, ~20-30 faults, measured)."""
    import threading

    from ._wire import FrameDecoder, encode

    decoder = FrameDecoder()
    decoder.feed(encode("hello", {"version": 0, "pid": 0}))
    for _ in decoder:
        pass
    threading.Thread(target=None, daemon=True)
    env = dict(os.environ)  # replaced as the setup's is (the zygote's own: no secrets)
    os.environ.clear()
    os.environ.update(env)


def _rehearse_import() -> None:
    """Load a handler of ours (``_rehearsal``) the way a handler's entry is loaded (a new
    ``sys.path`` entry and its finder, the cached bytecode read and run, the handler
    wrapped), then forget it: the first run of that code in a forked child writes to
    ~60-90 of the zygote's pages (copy-on-write faults, ~0.25 ms measured), had here rather
    than on the execution's path."""
    import sys

    from ..handlers import load_handler

    here = os.path.dirname(__file__)
    try:
        load_handler("_rehearsal:handler", here)
    except Exception:  # it only saves time
        pass
    finally:
        if here in sys.path:
            sys.path.remove(here)
        sys.path_importer_cache.pop(here, None)
        sys.modules.pop("_rehearsal", None)


def _setup_waiting(fd: int) -> bool:
    """Whether the setup has come already: an execution waits for this child (back to back
    after the one before), and a warm-up now would cost it more than it saves."""
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _warm_loop() -> None:
    """Run a trio loop on this thread, to a task that does what an async execution's does to
    the loop (a cancel scope with a deadline, a checkpoint), then stop it.

    A zygote's child shares the zygote's memory copy-on-write: its first ``trio.run``
    writes to ~500 pages of it (reference counts, the allocator), a fault and a copy each:
    ~3 ms on the 2-vCPU machines the targets were set on, had here rather than on the
    async handler's path. Not for every child: a backend that runs sync handlers would pay
    it for nothing. ``trio.run`` starts no thread: this is safe before the sandbox."""
    import sys

    if "trio" not in sys.modules:  # the zygote could not import it: nor can the handler
        return
    from .threads import TrioLoop

    loop = TrioLoop(thread=False)

    async def rehearse() -> None:
        trio = loop.trio
        with trio.CancelScope(deadline=trio.current_time() + 30.0):
            await trio.lowlevel.checkpoint()
        loop.stop()

    try:
        loop.start_soon(rehearse)
        loop.run_here()
    except Exception:  # it only saves time: the child serves anyway
        pass


def apply_sandbox(spec: dict[str, Any]) -> None:
    """Apply the kernel layers ``spec`` names (see ``sandbox.policy.ChildSandbox.spec``):
    drop capabilities, then Landlock, then seccomp (less what :func:`prepare` did).
    Raises OSError if one fails."""
    if spec.get("capabilities") and not _prepared.get("capabilities"):
        from ..sandbox import capabilities

        capabilities.drop_all()
    rules = spec.get("landlock")
    base = _prepared.pop("landlock", None)
    if rules is not None:
        from ..sandbox import landlock

        landlock.restrict(**rules, base=base)
    elif base is not None:
        base.close()
    mode = spec.get("seccomp")
    if mode:
        from ..sandbox import seccomp

        seccomp.install(allow_spawning=mode == "contain", allow_inet=spec.get("seccomp_inet", True))


def serve(fd: int, limits: str = "", sandbox: dict[str, Any] | None = None) -> None:
    """Apply ``limits`` and ``sandbox``, then serve the protocol on socket ``fd``; never returns.

    A sandbox that cannot be applied ends the process (status 71, the reason on stderr)
    before any plugin code runs: a child never runs with less protection than it was given.
    """
    # Before any plugin code: what a handler starts stays below the worker, even a setsid
    # double fork, so the worker can end it (see _leftovers).
    if not _prepared.get("subreaper"):
        try:
            from ._leftovers import become_subreaper

            become_subreaper()
        except (ImportError, OSError):
            pass  # no ctypes here: the host still kills the worker's group and tree
    if limits:
        apply_limits(limits)
    if sandbox:
        try:
            apply_sandbox(sandbox)
        except OSError as exc:
            os.write(2, f"plugin_execution worker: cannot apply its sandbox: {exc}\n".encode())
            os._exit(_SANDBOX_EXIT)
    os.set_inheritable(fd, False)
    worker = _prepared.pop("worker", None)
    if worker is None:
        from .runtime import Worker

        worker = Worker(fd)
    worker.serve()
