"""SandboxPolicy: which layers a backend uses, and what one child's sandbox is made of."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from plugin_execution import InvalidRequestError, Permissions, create_execution_backend
from plugin_execution.manifest import manifest_from_dict
from plugin_execution.sandbox import LAYERS, LayerStatus, SandboxPolicy, SandboxSupport
from plugin_execution.sandbox.policy import check_layers


def support(*available: str) -> SandboxSupport:
    """A machine that has ``available`` (plus the layers that are always there)."""
    return SandboxSupport(
        {
            name: LayerStatus(
                name,
                name in ("process", "rlimits", *available),
                f"{name} here" if name in available else f"no {name} on this test machine",
                path="/usr/bin/bwrap" if name == "bubblewrap" else None,
            )
            for name in LAYERS
        }
    )


def permissions(**data: object) -> Permissions:
    return manifest_from_dict({"id": "p", "permissions": data}).permissions


def test_check_layers() -> None:
    assert check_layers(True) is True and check_layers(False) is False
    assert check_layers(["seccomp", "landlock", "seccomp"]) == ("seccomp", "landlock")
    with pytest.raises(ValueError, match="unknown sandbox layer"):
        check_layers(["landlock", "selinux"])
    with pytest.raises(TypeError, match="must be True, False or a list"):
        check_layers("landlock")


def test_bad_sandbox_option_is_an_invalid_request() -> None:
    from plugin_execution import PluginRegistry

    with pytest.raises(InvalidRequestError, match="unknown sandbox layer"):
        create_execution_backend(type="subprocess", registry=PluginRegistry(), sandbox=["x"])


def test_true_uses_what_is_there_and_reports_the_rest() -> None:
    policy = SandboxPolicy(True, support("landlock", "seccomp"))
    assert policy.layers == ("landlock", "seccomp")
    assert policy.missing == {
        "capabilities": "no capabilities on this test machine",
        "bubblewrap": "no bubblewrap on this test machine",
    }
    report = policy.report("spawn")
    assert report["enabled"] is True
    assert report["layers"]["process"]["active"] and report["layers"]["rlimits"]["active"]
    assert report["layers"]["landlock"] == {"active": True, "detail": "landlock here"}
    assert report["layers"]["bubblewrap"] == {
        "active": False,
        "detail": "not available: no bubblewrap on this test machine",
    }
    assert report["layers"]["seccomp"] == {"active": True, "detail": "seccomp here"}


def test_a_required_layer_that_is_missing_fails() -> None:
    with pytest.raises(InvalidRequestError, match="bubblewrap: no bubblewrap") as info:
        SandboxPolicy(("landlock", "bubblewrap"), support("landlock"))
    assert info.value.details["missing"] == {"bubblewrap": "no bubblewrap on this test machine"}


def test_false_uses_nothing() -> None:
    policy = SandboxPolicy(False, support(*LAYERS))
    assert policy.layers == () and policy.missing == {}
    child = policy.for_child(Permissions(), workspace="/w", root=None, env={}, zygote=False)
    assert child.layers == ("process", "rlimits") and child.spec == {}
    assert child.command(["python"]) == ["python"]
    report = policy.report("spawn")
    assert report["enabled"] is False
    assert report["layers"]["landlock"]["detail"].startswith("not requested")


def test_child_spec_from_permissions(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    for name in ("a.csv", "b.csv", "c.txt"):
        (tmp_path / "data" / name).write_text(name)
    policy = SandboxPolicy(True, support("landlock", "seccomp", "bubblewrap"))
    child = policy.for_child(
        permissions(
            fs={"read": ["data/*.csv", "/etc/hostname"], "write": [str(tmp_path / "out")]},
            network={"connect": ["db.internal:5432", "127.0.0.1:8080"]},
        ),
        workspace="/w/x",
        root=str(tmp_path),
        env={"PATH": "/usr/bin:/bin"},
        zygote=False,
    )
    assert child.layers == ("process", "rlimits", "landlock", "bubblewrap", "seccomp")
    rules = child.spec["landlock"]
    assert rules["read"][:4] == [
        str(tmp_path),
        str(tmp_path / "data" / "a.csv"),
        str(tmp_path / "data" / "b.csv"),
        "/etc/hostname",
    ]
    assert "/etc/resolv.conf" in rules["read"]  # network granted: the resolver's files
    assert rules["write"] == ["/w/x", str(tmp_path / "out")]
    assert rules["execute"] == []
    assert rules["tcp_connect"] == [5432, 8080]
    assert child.spec["seccomp"] == "deny"
    assert child.spec["seccomp_inet"] is True  # network.connect granted: sockets may be made
    argv = child.command(["python"])
    assert argv[0] == "/usr/bin/bwrap" and argv[-2:] == ["--", "python"]
    assert "--unshare-net" not in argv  # network.connect granted


def test_any_port_and_shell_allow() -> None:
    policy = SandboxPolicy(True, support("landlock", "seccomp"))
    child = policy.for_child(
        permissions(network={"connect": ["*:*"]}, shell={"allow": ["sh"]}),
        workspace="/w",
        root=None,
        env={"PATH": "/usr/bin:/bin"},
        zygote=False,
    )
    rules = child.spec["landlock"]
    assert rules["tcp_connect"] is None  # any port: TCP is not restricted
    sh = os.path.realpath("/bin/sh")
    assert rules["execute"][0] == sh
    assert any("ld-" in path for path in rules["execute"][1:])  # the dynamic loader
    assert child.spec["seccomp"] == "contain" and "seccomp" in child.layers  # may fork


def test_no_network_socket_without_network_connect() -> None:
    policy = SandboxPolicy(True, support("seccomp"))
    for zygote in (False, True):  # the same filter, whoever starts the child
        child = policy.for_child(Permissions(), workspace="/w", root=None, env={}, zygote=zygote)
        assert child.spec["seccomp_inet"] is False


def test_zygote_children_are_not_wrapped() -> None:
    policy = SandboxPolicy(True, support("bubblewrap"))
    child = policy.for_child(Permissions(), workspace="/w", root=None, env={}, zygote=True)
    assert "bubblewrap" in child.layers  # through the zygote, which runs inside it
    assert child.command(["python"]) == ["python"]
    wrapper = policy.zygote_wrapper("/w")
    assert "--unshare-pid" not in wrapper and "--unshare-net" not in wrapper
    assert wrapper[-3:] == ["--chdir", "/", "--"]
    assert policy.report("zygote")["layers"]["bubblewrap"]["mode"].startswith("the zygote")


def test_fits_zygote(tmp_path: Path) -> None:
    policy = SandboxPolicy(True, support("bubblewrap"))
    assert policy.fits_zygote(Permissions(), None)  # before the zygote started: no view yet
    data = tmp_path / "data"
    data.mkdir()
    early = permissions(fs={"read": [str(data)]})
    policy.zygote_wrapper(str(tmp_path / "ws"), [(early, None)])
    assert policy.fits_zygote(early, None)
    assert policy.fits_zygote(permissions(fs={"read": ["/etc/hostname"]}), None)  # not hidden
    assert not policy.fits_zygote(permissions(fs={"read": [str(tmp_path)]}), None)
    assert not policy.fits_zygote(permissions(fs={"write": [str(data)]}), None)  # read-only
    assert not policy.fits_zygote(Permissions(), str(tmp_path / "plugin"))  # root hidden
    assert SandboxPolicy(True, support("landlock")).fits_zygote(early, str(tmp_path))
