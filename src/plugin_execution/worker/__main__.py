"""Entry point of a worker child: ``python -I -m plugin_execution.worker --fd N [...]``.

Options (parsed by hand: argparse costs a fresh child several milliseconds):

- ``--fd N``: the inherited protocol socket (required);
- ``--limits as=BYTES,cpu=SECONDS,nofile=N,fsize=BYTES,nproc=N``: resource limits, applied
  (soft and hard) before any plugin code is imported;
- ``--zygote``: run as a zygote on control socket N instead (see ``worker/zygote.py``).
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    if "--zygote" in argv:
        argv = [a for a in argv if a != "--zygote"]
        zygote = True
    else:
        zygote = False
    options = dict(zip(argv[::2], argv[1::2], strict=False))
    if "--fd" not in options:
        sys.exit("usage: python -m plugin_execution.worker --fd N [--limits ...] [--zygote]")
    fd = int(options["--fd"])
    if zygote:
        from .zygote import main as zygote_main

        zygote_main(fd)
    else:
        from .bootstrap import serve

        serve(fd, options.get("--limits", ""))


if __name__ == "__main__":
    main(sys.argv[1:])
