"""Grows its worker's memory and keeps it: for the pool's memory-recycling test."""

import os

_kept: list[bytearray] = []


def keep(ctx: object, input: dict[str, int]) -> int:
    if input["mb"]:
        block = bytearray(input["mb"] * 1024 * 1024)
        block[::4096] = b"\x01" * len(block[::4096])  # touch every page: real RSS
        _kept.append(block)
    return os.getpid()
