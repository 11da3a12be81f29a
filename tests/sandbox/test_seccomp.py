"""The seccomp filter: assembled by hand, checked instruction by instruction and in a child."""

from __future__ import annotations

import struct

import pytest

from plugin_execution.sandbox import seccomp

from .conftest import needs, run_in_child


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_the_program_is_well_formed(machine: str) -> None:
    program = seccomp.spawn_filter(machine)
    assert len(program) % 8 == 0
    insns = [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    for index, (code, jt, jf, _k) in enumerate(insns):
        if code & 0x07 == 0x05:  # a jump: both targets inside the program, forward only
            assert index + 1 + max(jt, jf) < len(insns)
    returns = {k for code, _jt, _jf, k in insns if code == 0x06}
    assert returns == {0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38}  # allow, EPERM, ENOSYS
    assert insns[-1] == (0x06, 0, 0, 0x00050000 | 1)  # falling off the end is impossible


@needs("seccomp")
def test_no_new_processes_but_threads_work() -> None:
    result = run_in_child(
        """
        import subprocess, threading
        from plugin_execution.sandbox import seccomp
        seccomp.deny_spawning()
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
        }
        """
    )
    assert result["thread"] == [True]
    for denied in ("fork", "subprocess", "posix_spawn", "exec"):
        assert result[denied] == "PermissionError:EPERM", denied
    assert result["system"] == 127 << 8  # the shell could not be started


@needs("seccomp")
def test_trio_runs_under_the_filter() -> None:
    result = run_in_child(
        """
        import trio
        from plugin_execution.sandbox import seccomp
        seccomp.deny_spawning()
        async def main():
            return await trio.to_thread.run_sync(lambda: "from a thread")
        result = trio.run(main)
        """
    )
    assert result == "from a thread"
