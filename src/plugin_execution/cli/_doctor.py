"""``plugin-execution doctor``: which sandbox layers the sandboxed backends can use here
(the subprocess backend, the worker pool with ``sandbox=True``)."""

from __future__ import annotations

import argparse
import sys

import attrs

from ._common import EXIT_FAILED, EXIT_OK, dumps

__all__ = ["add_parser"]


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    doctor = commands.add_parser(
        "doctor",
        help="report which sandbox layers the sandboxed backends can use on this machine",
        description="Detect each sandbox layer of the sandboxed backends on this machine and "
        "say what it does, or why it is not available; exit 1 if any is not.",
    )
    doctor.add_argument("--json", action="store_true", help="print JSON instead of text")
    doctor.set_defaults(func=_cmd_doctor)


def _cmd_doctor(args: argparse.Namespace) -> int:
    import os
    import platform

    from ..sandbox import detect

    support = detect()
    machine = {
        "system": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "uid": os.getuid() if hasattr(os, "getuid") else None,
        "python": sys.version.split()[0],
    }
    if args.json:
        layers = {name: attrs.asdict(status) for name, status in support.layers.items()}
        print(dumps({"machine": machine, "layers": layers}, indent=2))
    else:
        where = ", ".join(f"{key} {value}" for key, value in machine.items())
        print(f"sandbox layers of the sandboxed backends on this machine ({where}):")
        width = max(len(name) for name in support.layers)
        for name, status in support.layers.items():
            state = "yes" if status.available else "NO"
            version = ""
            if status.version is not None and str(status.version) not in status.detail:
                what = "ABI" if name == "landlock" else "version"
                version = f" ({what} {status.version})"
            print(f"  {name:<{width}}  {state:<3}  {status.detail}{version}")
        print(
            "yes: the layer works on this machine; NO: it does not, for the reason shown. "
            "sandbox=True uses every layer marked yes; see docs/sandbox.md for what each stops."
        )
    return EXIT_OK if all(s.available for s in support.layers.values()) else EXIT_FAILED
