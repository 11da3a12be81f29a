"""Keeping a caller's exception unwrapped when it passes through our nurseries.

A context manager that yields inside a nursery (a worker, an execution stream) would hand the
caller's own exception back wrapped in an ``ExceptionGroup``. Our background tasks never
raise into those nurseries, so a one-exception group is the caller's exception: unwrap it.
A group made only of ``trio.Cancelled`` (the body and the tasks all cancelled together) is
one cancellation: re-raise a single ``Cancelled`` so callers can ``except trio.Cancelled``.

:func:`unwrap_all_of` goes one step further where several tasks can fail the same expected
way at once (a pool's workers all failing to start): a group made only of such errors is
raised as its first one, the others noted on it. A group with anything else in it (a bug, a
cancellation) is a real multi-error and propagates whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import trio

__all__ = ["unwrap_all_of", "unwrap_single"]


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found


def _reraise_bare(error: BaseException) -> NoReturn:
    """Raise ``error`` as if the group had never wrapped it: its cause and context kept."""
    context = error.__context__
    try:
        raise error
    finally:
        error.__context__ = context
        del error, context


@contextmanager
def unwrap_single() -> Iterator[None]:
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], BaseExceptionGroup):
            _reraise_bare(group.exceptions[0])
        _, rest = group.split(trio.Cancelled)
        if rest is None:
            _reraise_bare(_first_leaf(group))
        raise


@contextmanager
def unwrap_all_of(kind: type[BaseException]) -> Iterator[None]:
    """:func:`unwrap_single`, and a group whose every exception (nested groups flattened) is
    a ``kind`` is raised as the first of them, with a note naming the others."""
    try:
        with unwrap_single():
            yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if not all(isinstance(leaf, kind) for leaf in leaves):
            raise
        first, others = leaves[0], leaves[1:]
        first.add_note(
            f"{len(others)} more at the same time: "
            + "; ".join(f"{type(other).__name__}: {other}" for other in others)
        )
        _reraise_bare(first)
