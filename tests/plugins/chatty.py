"""Handlers that print to stdout, as careless plugins do: for the CLI's pure-JSON stdout."""

import sys


def shout(ctx: object, input: dict) -> str:
    print("a print from a sync handler")
    sys.stdout.flush()
    return "done"


async def shout_async(ctx: object, input: dict) -> dict:
    print("a print from an async handler", flush=True)
    return input


#: Terminal control sequences: set the window title, clear the screen, a C1 CSI colour,
#: write the clipboard (OSC 52). A plugin's output must never drive the operator's terminal.
ESCAPES = "\x1b]0;pwned\x07\x1b[2J\u009b31m\x1b]52;c;cHduZWQ=\x07"


def escapes(ctx: object, input: dict) -> str:
    print("printed " + ESCAPES, flush=True)
    ctx.logger.warning("logged " + ESCAPES)  # type: ignore[attr-defined]
    return "done"
