"""A handler that writes to stderr at the fd level, then dies without answering."""

import os


def run(ctx: object, input: object) -> None:
    os.write(2, b"last words before the crash\n")
    os._exit(9)
