"""What a supervisor is given and what it reports: child specs, snapshots, failures, errors.

Plain frozen values, validated at the edge (:class:`ChildSpec`); the supervisor's machinery
lives in the other modules of this package.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal

import attrs

__all__ = [
    "AUTO_SHUTDOWNS",
    "STRATEGIES",
    "AutoShutdown",
    "ChildCounts",
    "ChildFailure",
    "ChildInfo",
    "ChildSpec",
    "ChildState",
    "DynamicChild",
    "RestartType",
    "Strategy",
    "SupervisorError",
]

Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
RestartType = Literal["permanent", "transient", "temporary"]
ChildState = Literal["starting", "running", "restarting", "stopping", "terminated"]
AutoShutdown = Literal["never", "any_significant", "all_significant"]

STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")
RESTART_TYPES = ("permanent", "transient", "temporary")
AUTO_SHUTDOWNS = ("never", "any_significant", "all_significant")


@attrs.frozen
class ChildSpec:
    """How to run one child.

    ``start`` is an async callable; if it has a ``task_status`` parameter it is started with
    :meth:`trio.Nursery.start` semantics and counts as started once it calls
    ``task_status.started()``. ``restart``: ``"permanent"`` children are always restarted,
    ``"transient"`` ones only after raising, ``"temporary"`` ones never. ``shutdown_timeout``
    is how long stopping the child waits for it to finish after cancelling it (0: no time at
    all, OTP's ``brutal_kill``). A ``significant`` child (transient or temporary only) ends its
    supervisor when it ends on its own, as the supervisor's ``auto_shutdown`` says.
    """

    name: str = attrs.field(
        validator=attrs.validators.and_(
            attrs.validators.instance_of(str), attrs.validators.min_len(1)
        )
    )
    start: Callable[..., Awaitable[object]] = attrs.field(validator=attrs.validators.is_callable())
    restart: RestartType = attrs.field(
        default="permanent", validator=attrs.validators.in_(RESTART_TYPES)
    )
    shutdown_timeout: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    significant: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    def __attrs_post_init__(self) -> None:
        if self.significant and self.restart == "permanent":
            raise ValueError(
                f"child {self.name!r}: a significant child must be 'transient' or 'temporary' "
                "(a permanent child never ends on its own, so it could never end its supervisor)"
            )


@attrs.frozen
class ChildInfo:
    """A snapshot of one child: ``started_at`` is the ``trio.current_time()`` of its last start.

    ``restarts`` counts the restarts the supervisor made, not :meth:`Supervisor.restart_child`.
    """

    name: str
    restart: RestartType
    state: ChildState
    restarts: int
    started_at: float | None


@attrs.frozen
class ChildCounts:
    """What :meth:`Supervisor.count_children` reports.

    ``specs``: children held (any state); ``active``: children running; ``terminated``: children
    stopped by ``terminate_child`` whose spec is kept; ``overdue``: instances still running after
    their ``shutdown_timeout`` passed (including those of children since removed).
    """

    specs: int
    active: int
    terminated: int
    overdue: int


@attrs.frozen
class ChildFailure:
    """A child raised ``exception`` at ``trio.current_time()`` ``at``."""

    child: str
    exception: Exception
    at: float


@attrs.frozen
class DynamicChild:
    """A child started by :meth:`DynamicSupervisor.start_child`: its name and started value."""

    name: str
    value: object


class SupervisorError(Exception):
    """The supervisor gave up: restarts exceeded ``max_restarts`` within ``within`` seconds, or
    a child to restart was still running long after it was cancelled.

    ``failures`` holds the most recent child failures, oldest first.
    """

    def __init__(self, message: str, failures: tuple[ChildFailure, ...]) -> None:
        super().__init__(message)
        self.failures = failures
