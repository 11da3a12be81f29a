"""The dynamic supervisor: many children of one template spec (OTP's ``simple_one_for_one``).

A thin layer over a :class:`~._supervisor.Supervisor` run ``one_for_one`` and unordered: it
names the children and starts each from the template with its own arguments.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from random import Random

import attrs

from ._policy import Policy
from ._specs import ChildCounts, ChildFailure, ChildInfo, ChildSpec, DynamicChild
from ._supervisor import Supervisor, supervising

__all__ = ["DynamicSupervisor", "open_dynamic_supervisor"]


class DynamicSupervisor:
    """Many children of one template spec (OTP's ``simple_one_for_one``, Elixir's
    ``DynamicSupervisor``). Made by :func:`open_dynamic_supervisor`, not directly.

    Children restart ``one_for_one``; on exit they are all stopped at once, each given the
    template's ``shutdown_timeout``.
    """

    def __init__(self, core: Supervisor, template: ChildSpec) -> None:
        self._core = core
        self._template = template
        self._numbers = itertools.count(1)

    @property
    def template(self) -> ChildSpec:
        """The spec every child is made from."""
        return self._template

    @property
    def restart_count(self) -> int:
        """Restarts so far (see :attr:`Supervisor.restart_count`)."""
        return self._core.restart_count

    @property
    def failures(self) -> tuple[ChildFailure, ...]:
        """The most recent failures, oldest first (see :attr:`Supervisor.failures`)."""
        return self._core.failures

    def children(self) -> tuple[ChildInfo, ...]:
        """The children, in start order."""
        return self._core.children()

    def count_children(self) -> ChildCounts:
        """How many children there are (see :class:`ChildCounts`)."""
        return self._core.count_children()

    async def start_child(self, *args: object, name: str | None = None) -> DynamicChild:
        """Start a child running ``template.start(*args)``; return its name and started value.

        ``name`` defaults to ``"<template name>-<n>"``, the first free ``n`` counting up.
        Started, cancelled and failing before ``started()`` as :meth:`Supervisor.start_child`,
        which raises what this raises.
        """
        if name is None:
            name = self._free_name()
        spec = attrs.evolve(
            self._template, name=name, start=functools.partial(self._template.start, *args)
        )
        return DynamicChild(name, await self._core.start_child(spec))

    async def terminate_child(self, name: str) -> None:
        """Stop a child and remove it (a dynamic child's spec is never kept).

        Cancellation and the ``shutdown_timeout`` as :meth:`Supervisor.terminate_child`; the
        child is removed either way. Raises ``KeyError`` for an unknown name.
        """
        await self._core._remove(name)

    def _free_name(self) -> str:
        while True:
            name = f"{self._template.name}-{next(self._numbers)}"
            if not self._core._name_in_use(name):
                return name


@asynccontextmanager
async def open_dynamic_supervisor(
    template: ChildSpec,
    *,
    max_restarts: int = 3,
    within: float = 5.0,
    backoff_initial: float = 0.05,
    backoff_max: float = 2.0,
    backoff_factor: float = 2.0,
    jitter: float = 0.1,
    random: Random | None = None,
) -> AsyncIterator[DynamicSupervisor]:
    """Open a supervisor of many children made from one ``template`` spec.

    Each :meth:`DynamicSupervisor.start_child` call starts one more child running
    ``template.start(*args)`` under its own name, with the template's restart type and
    ``shutdown_timeout``; children restart ``one_for_one`` within the same intensity and
    backoff as :func:`open_supervisor`, which raises what this raises. When the block exits,
    all children are cancelled at once (no order among them), each given its
    ``shutdown_timeout``, and the block waits for every one. Raises ``ValueError`` on entry for
    invalid arguments or a significant template.
    """
    if template.significant:
        raise ValueError(
            f"template {template.name!r} is significant; a dynamic supervisor has no "
            "auto_shutdown (use open_supervisor)"
        )
    policy = Policy(
        "one_for_one", max_restarts, within, backoff_initial, backoff_max, backoff_factor, jitter
    )
    async with supervising(policy, random, ordered=False) as supervisor:
        yield DynamicSupervisor(supervisor, template)
