"""An Erlang/OTP-style supervisor built on a trio nursery.

``open_supervisor()`` is an async context manager yielding a :class:`Supervisor`. Children are
described by :class:`ChildSpec` and started with :meth:`Supervisor.start_child`; each runs as a
task in the supervisor's nursery, in a cancel scope of its own. When a child returns or raises,
its restart type decides whether it comes back, the strategy decides which siblings restart with
it, and the restart intensity (``max_restarts`` within ``within`` seconds) decides when the
supervisor gives up with :class:`SupervisorError`. Restarts wait an exponential, jittered
backoff (:func:`backoff_delay`), and never start a child while its previous instance is still
running. When the block exits, children are stopped in reverse start order and none is left
running. ``open_dynamic_supervisor()`` is the template form (OTP's ``simple_one_for_one``):
many children of one spec. See ``docs/supervisor.md``.

The public names are defined in private modules, one concept each, and re-exported here:
``_specs`` (specs, snapshots, errors), ``_policy`` (backoff and restart intensity),
``_children`` (the children held and their runs), ``_runner`` (starting and stopping one
run), ``_supervisor`` (the static supervisor and its restart strategies), ``_dynamic`` (the
template form).
"""

from __future__ import annotations

from ._dynamic import DynamicSupervisor as DynamicSupervisor
from ._dynamic import open_dynamic_supervisor as open_dynamic_supervisor
from ._policy import backoff_delay as backoff_delay
from ._specs import AutoShutdown as AutoShutdown
from ._specs import ChildCounts as ChildCounts
from ._specs import ChildFailure as ChildFailure
from ._specs import ChildInfo as ChildInfo
from ._specs import ChildSpec as ChildSpec
from ._specs import ChildState as ChildState
from ._specs import DynamicChild as DynamicChild
from ._specs import RestartType as RestartType
from ._specs import Strategy as Strategy
from ._specs import SupervisorError as SupervisorError
from ._supervisor import Supervisor as Supervisor
from ._supervisor import open_supervisor as open_supervisor

__all__ = [
    "AutoShutdown",
    "ChildCounts",
    "ChildFailure",
    "ChildInfo",
    "ChildSpec",
    "ChildState",
    "DynamicChild",
    "DynamicSupervisor",
    "RestartType",
    "Strategy",
    "Supervisor",
    "SupervisorError",
    "backoff_delay",
    "open_dynamic_supervisor",
    "open_supervisor",
]
