"""The Landlock binding, in fresh children: what a restricted process can and cannot do."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from plugin_execution.sandbox import landlock

from .conftest import SUPPORT, needs, run_in_child


def test_abi_version_matches_detection() -> None:
    abi = landlock.abi_version()
    assert (abi >= 1) is SUPPORT["landlock"].available
    assert (landlock.unavailable_reason() is None) is (abi >= 1)


def test_handled_rights_grow_with_the_abi() -> None:
    assert landlock.handled_fs(1) == (1 << 13) - 1
    assert landlock.handled_fs(2) & landlock.REFER
    assert not landlock.handled_fs(2) & landlock.TRUNCATE
    assert landlock.handled_fs(3) & landlock.TRUNCATE
    assert landlock.handled_fs(5) & landlock.IOCTL_DEV
    assert not landlock.WRITE & (landlock.MAKE_CHAR | landlock.MAKE_BLOCK | landlock.EXECUTE)


@needs("landlock")
def test_files_outside_the_rules_are_refused(tmp_path: Path) -> None:
    readable, writable, other = tmp_path / "r", tmp_path / "w", tmp_path / "o"
    for directory in (readable, writable, other):
        directory.mkdir()
    (readable / "f").write_text("r")
    (other / "secret").write_text("s")
    result = run_in_child(
        """
        from plugin_execution.sandbox import landlock
        abi = landlock.restrict(read=[readable], write=[writable])
        result = {
            "abi": abi,
            "read granted": attempt(lambda: open(readable + "/f").read()),
            "read other": attempt(lambda: open(other + "/secret").read()),
            "write granted": attempt(lambda: open(writable + "/new", "w").write("x")),
            "write readable": attempt(lambda: open(readable + "/new", "w").write("x")),
            "mkdir granted": attempt(lambda: os.mkdir(writable + "/d")),
            "listdir other": attempt(lambda: os.listdir(other)),
            "stdlib import": attempt(lambda: __import__("json").dumps(1)),
            "devnull": attempt(lambda: open(os.devnull, "w").write("x")),
            "own proc": attempt(lambda: len(os.listdir("/proc/self/fd")) > 0),
            "parent proc": attempt(lambda: open(f"/proc/{os.getppid()}/environ").read()),
            "via proc root": attempt(lambda: open("/proc/self/root" + other + "/secret").read()),
            "exec": attempt(lambda: os.execv("/bin/true", ["true"])),
            "mknod": attempt(lambda: os.mknod(writable + "/dev", 0o600 | 0o060000, 0)),
        }
        """,
        readable=str(readable),
        writable=str(writable),
        other=str(other),
    )
    assert result["abi"] == landlock.abi_version()
    assert result["read granted"] == "r"
    assert result["write granted"] == 1
    assert result["mkdir granted"] is None
    assert result["stdlib import"] == "1"
    assert result["devnull"] == 1
    assert result["own proc"] is True
    for refused in (
        "read other",
        "write readable",
        "listdir other",
        "parent proc",
        "via proc root",
        "exec",
        "mknod",
    ):
        assert result[refused] == "PermissionError:EACCES", refused


@needs("landlock")
def test_execute_grants_name_files(tmp_path: Path) -> None:
    result = run_in_child(
        """
        import subprocess
        from plugin_execution.sandbox import landlock
        loaders = [p for p in ("/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1")
                   if os.path.exists(p)]
        true = os.path.realpath("/bin/true")
        landlock.restrict(read=[], write=[], execute=[true, *map(os.path.realpath, loaders)])
        result = {
            "true": attempt(lambda: subprocess.run([true]).returncode),
            "sh": attempt(lambda: subprocess.run(["/bin/sh", "-c", "true"]).returncode),
        }
        """
    )
    assert result == {"true": 0, "sh": "PermissionError:EACCES"}


@needs("landlock", abi=4)
def test_tcp_connect_only_to_granted_ports() -> None:
    with socket.socket() as allowed, socket.socket() as denied:
        for server in (allowed, denied):
            server.bind(("127.0.0.1", 0))
            server.listen()
        result = run_in_child(
            """
            import socket
            from plugin_execution.sandbox import landlock
            landlock.restrict(read=[], write=[], tcp_connect=[allowed])
            def connect(port):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                return "connected"
            def bind():
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                return "bound"
            result = [attempt(lambda: connect(allowed)), attempt(lambda: connect(denied)),
                      attempt(bind)]
            """,
            allowed=allowed.getsockname()[1],
            denied=denied.getsockname()[1],
        )
    assert result == ["connected", "PermissionError:EACCES", "PermissionError:EACCES"]


@needs("landlock", abi=4)
def test_tcp_unrestricted_when_any_port_is_granted() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        result = run_in_child(
            """
            import socket
            from plugin_execution.sandbox import landlock
            landlock.restrict(read=[], write=[], tcp_connect=None)
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            result = "connected"
            """,
            port=server.getsockname()[1],
        )
    assert result == "connected"


@needs("landlock", abi=6)
def test_signals_do_not_leave_the_sandbox() -> None:
    result = run_in_child(
        """
        import signal
        from plugin_execution.sandbox import landlock
        landlock.restrict(read=[], write=[])
        result = [attempt(lambda: os.kill(host, 0)), attempt(lambda: os.kill(os.getpid(), 0))]
        """,
        host=os.getpid(),
    )
    assert result == ["PermissionError:EPERM", None]


@needs("landlock")
def test_a_missing_path_is_skipped(tmp_path: Path) -> None:
    result = run_in_child(
        """
        from plugin_execution.sandbox import landlock
        result = landlock.restrict(read=[missing], write=[missing + "/w"]) >= 1
        """,
        missing=str(tmp_path / "missing"),
    )
    assert result is True
