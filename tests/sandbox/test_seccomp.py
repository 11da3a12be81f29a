"""The seccomp filter: assembled by hand, checked instruction by instruction and in a child."""

from __future__ import annotations

import struct

import pytest

from plugin_execution.sandbox import seccomp

from .conftest import needs, run_in_child


@pytest.mark.parametrize("allow_inet", [False, True])
@pytest.mark.parametrize("allow_spawning", [False, True])
@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_the_program_is_well_formed(machine: str, allow_spawning: bool, allow_inet: bool) -> None:
    program = seccomp.spawn_filter(machine, allow_spawning=allow_spawning, allow_inet=allow_inet)
    assert len(program) % 8 == 0
    insns = [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    for index, (code, jt, jf, _k) in enumerate(insns):
        if code & 0x07 == 0x05:  # a jump: both targets inside the program, forward only
            assert index + 1 + max(jt, jf) < len(insns)
    returns = {k for code, _jt, _jf, k in insns if code == 0x06}
    assert {0x7FFF0000, 0x00050000 | 1} <= returns <= {0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38}
    assert insns[-1] == (0x06, 0, 0, 0x00050000 | 1)  # falling off the end is impossible


@needs("seccomp")
def test_no_new_processes_but_threads_work() -> None:
    result = run_in_child(
        """
        import subprocess, threading
        from plugin_execution.sandbox import seccomp
        seccomp.install()
        ran = []
        thread = threading.Thread(target=lambda: ran.append(True))
        thread.start()
        thread.join()
        result = {
            "thread": ran,
            "fork": attempt(os.fork),
            "subprocess": attempt(lambda: subprocess.run(["/bin/true"])),
            "posix_spawn": attempt(lambda: os.posix_spawn("/bin/true", ["true"], {})),
            "exec": attempt(lambda: os.execv("/bin/true", ["true"])),
            "system": os.system("true"),
            "setsid": attempt(os.setsid),
            "setpgid": attempt(lambda: os.setpgid(0, 0)),
        }
        """
    )
    assert result["thread"] == [True]
    for denied in ("fork", "subprocess", "posix_spawn", "exec", "setsid", "setpgid"):
        assert result[denied] == "PermissionError:EPERM", denied
    assert result["system"] == 127 << 8  # the shell could not be started


@needs("seccomp")
def test_trio_runs_under_the_filter() -> None:
    result = run_in_child(
        """
        import trio
        from plugin_execution.sandbox import seccomp
        seccomp.install()
        async def main():
            return await trio.to_thread.run_sync(lambda: "from a thread")
        result = trio.run(main)
        """
    )
    assert result == "from a thread"


@needs("seccomp")
def test_contain_allows_processes_but_keeps_them_in_the_group() -> None:
    result = run_in_child(
        """
        import subprocess
        from plugin_execution.sandbox import seccomp
        os.setpgid(0, 0)  # a group of our own, as a worker child has, before the filter
        seccomp.install(allow_spawning=True)
        group = os.getpgid(0)
        child = subprocess.run(["/bin/sh", "-c", "ps -o pgid= -p $$"], capture_output=True)
        result = {
            "shell": child.returncode,
            "same group": int(child.stdout) == group,
            "new session": attempt(
                lambda: subprocess.run(["/bin/true"], start_new_session=True).returncode
            ),
        }
        pid = os.fork()
        if pid == 0:
            try:
                os.setsid()
                os._exit(0)
            except PermissionError:
                os._exit(13)
        result["setsid in a child"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        """
    )
    assert result["shell"] == 0 and result["same group"] is True
    assert result["new session"] == "PermissionError:EPERM"  # the child's setsid, reported
    assert result["setsid in a child"] == 13


@needs("seccomp")
def test_no_network_socket_unless_allowed() -> None:
    code = """
        import socket
        from plugin_execution.sandbox import _libc, seccomp
        seccomp.install(allow_inet=allow_inet)
        def make(family, kind):
            return lambda: socket.socket(family, kind).close() or "made"
        result = {
            "udp": attempt(make(socket.AF_INET, socket.SOCK_DGRAM)),
            "tcp6": attempt(make(socket.AF_INET6, socket.SOCK_STREAM)),
            "unix": attempt(make(socket.AF_UNIX, socket.SOCK_STREAM)),
            "pair": attempt(lambda: [s.close() for s in socket.socketpair()] and "made"),
            # io_uring could make sockets where no filter sees them: never set up
            "io_uring": attempt(lambda: _libc.syscall(425, 1, bytes(120))),
        }
        """
    denied = run_in_child(code, allow_inet=False)
    assert denied == {
        "udp": "PermissionError:EPERM",
        "tcp6": "PermissionError:EPERM",
        "unix": "made",  # the worker's own protocol and trio's wake-up need these
        "pair": "made",
        "io_uring": "PermissionError:EPERM",
    }
    allowed = run_in_child(code, allow_inet=True)
    assert allowed.pop("io_uring") == "PermissionError:EPERM"
    assert set(allowed.values()) == {"made"}
