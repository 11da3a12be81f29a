"""The one cattrs converter for everything that crosses a process boundary.

A msgpack preconf converter: fast, carries ``bytes`` natively, and never pickles data that
came from a plugin. ``ExecutionError`` travels as its ``to_dict()`` form.
"""

from __future__ import annotations

from typing import Any, TypeVar

import cattrs.preconf.msgpack

from .errors import ExecutionError

__all__ = ["converter", "dumps", "loads"]

T = TypeVar("T")

converter = cattrs.preconf.msgpack.make_converter()
converter.register_unstructure_hook(ExecutionError, lambda err: err.to_dict())
converter.register_structure_hook(ExecutionError, lambda data, _: ExecutionError.from_dict(data))


def dumps(obj: Any) -> bytes:
    """Serialize an attrs value (or plain data) to msgpack bytes."""
    return converter.dumps(obj)


def loads(data: bytes, cls: type[T]) -> T:
    """Deserialize msgpack bytes produced by :func:`dumps` into ``cls``."""
    return converter.loads(data, cls)
