"""Handlers that print to stdout, as careless plugins do: for the CLI's pure-JSON stdout."""

import sys


def shout(ctx: object, input: dict) -> str:
    print("a print from a sync handler")
    sys.stdout.flush()
    return "done"


async def shout_async(ctx: object, input: dict) -> dict:
    print("a print from an async handler", flush=True)
    return input
