"""``has_children``, the check a worker makes after every execution, on real processes.

Run in a fresh interpreter (a subreaper, as a worker is): the test process itself must not
become one, or it would inherit every orphan of the suite.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import errno, os, threading, time
    from plugin_execution.worker import _leftovers

    def check(label):
        assert not _leftovers.has_children(), label
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        assert _leftovers.has_children(), label  # alive
        os.kill(pid, 9)
        while _leftovers.has_children():  # a zombie counts until it is reaped
            pid_, _ = os.waitpid(pid, os.WNOHANG)
            if pid_:
                break
            time.sleep(0.001)
        assert not _leftovers.has_children(), label
        # A child of another thread is this process's child too.
        forked = []
        thread = threading.Thread(target=lambda: forked.append(os.fork() or os._exit(0)))
        thread.start()
        thread.join()
        assert _leftovers.has_children(), label
        os.waitpid(forked[0], 0)
        assert not _leftovers.has_children(), label

    check("os.waitid")  # not a subreaper yet: the plain path
    assert _leftovers.become_subreaper()
    assert _leftovers._waitid is not None
    check("ctypes")
    # A failure other than "no child" (a seccomp filter's EPERM, say): as os.waitid says.
    waitid, info, _ = _leftovers._waitid
    _leftovers._waitid = (lambda *args: -1, info, lambda: errno.EPERM)
    check("ctypes refused")
    print("ok")
    """
)


def test_has_children_sees_live_and_zombie_children_of_every_thread_on_each_path() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip() == "ok", done.stderr
