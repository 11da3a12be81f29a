"""When a supervisor restarts and when it gives up: backoff and restart intensity.

:class:`Policy` holds the options of ``open_supervisor``, validated. :class:`RestartIntensity`
counts restarts in the sliding ``within`` window (OTP's intensity and period): it admits a
restart with its backoff delay (:func:`backoff_delay`), or refuses it once ``max_restarts``
were made within the window, and keeps the recent failures that :class:`SupervisorError`
reports.
"""

from __future__ import annotations

from collections import deque
from random import Random

import attrs
import trio

from ._specs import AUTO_SHUTDOWNS, STRATEGIES, AutoShutdown, ChildFailure, Strategy

__all__ = ["Policy", "RestartIntensity", "backoff_delay", "drop_older"]


def backoff_delay(
    attempt: int, *, initial: float, factor: float, maximum: float, jitter: float, rng: Random
) -> float:
    """Seconds to wait before a child's ``attempt``-th restart in a row (``attempt >= 1``).

    ``min(maximum, initial * factor ** (attempt - 1))`` times a factor drawn uniformly from
    ``[1 - jitter, 1 + jitter]`` with ``rng``.
    """
    try:
        grown = initial * factor ** (attempt - 1)
    except OverflowError:  # factor ** (attempt - 1) beyond a float: far past any cap
        grown = maximum if initial else 0.0
    return min(maximum, grown) * rng.uniform(1 - jitter, 1 + jitter)


@attrs.frozen
class Policy:
    """The options of ``open_supervisor``; invalid ones raise ``ValueError``."""

    strategy: Strategy = attrs.field(validator=attrs.validators.in_(STRATEGIES))
    max_restarts: int = attrs.field(
        validator=[attrs.validators.instance_of(int), attrs.validators.ge(0)]
    )
    within: float = attrs.field(validator=attrs.validators.gt(0))
    backoff_initial: float = attrs.field(validator=attrs.validators.ge(0))
    backoff_max: float = attrs.field(validator=attrs.validators.ge(0))
    backoff_factor: float = attrs.field(validator=attrs.validators.ge(1))
    jitter: float = attrs.field(validator=[attrs.validators.ge(0), attrs.validators.le(1)])
    auto_shutdown: AutoShutdown = attrs.field(
        default="never", validator=attrs.validators.in_(AUTO_SHUTDOWNS)
    )


def drop_older(times: deque[float], cutoff: float) -> None:
    """Forget the times at or before ``cutoff`` (``times`` is in increasing order)."""
    while times and times[0] <= cutoff:
        times.popleft()


class RestartIntensity:
    """The supervisor's restarts within the last ``within`` seconds, and its recent failures."""

    def __init__(self, policy: Policy, rng: Random) -> None:
        self._policy = policy
        self._rng = rng
        self._recent: deque[float] = deque()
        self.count = 0  # restarts so far: one per handled exit
        self.failures: deque[ChildFailure] = deque(maxlen=policy.max_restarts + 1)

    def admit(self, child_restarts: deque[float]) -> float | None:
        """Count one restart of a child whose own recent restart times are
        ``child_restarts`` (updated here); its backoff delay, or None if it would exceed the
        intensity (then nothing is counted)."""
        now = trio.current_time()
        policy = self._policy
        drop_older(self._recent, now - policy.within)
        if len(self._recent) >= policy.max_restarts:
            return None
        self._recent.append(now)
        self.count += 1
        drop_older(child_restarts, now - policy.within)
        child_restarts.append(now)
        return backoff_delay(
            len(child_restarts),
            initial=policy.backoff_initial,
            factor=policy.backoff_factor,
            maximum=policy.backoff_max,
            jitter=policy.jitter,
            rng=self._rng,
        )

    def record_failure(self, child: str, exc: Exception) -> None:
        self.failures.append(ChildFailure(child, exc, trio.current_time()))

    def too_many(self, child: str) -> str:
        """Why the supervisor gives up when restarting ``child`` is not admitted."""
        policy = self._policy
        return (
            f"child {child!r} ended and restarting it would make "
            f"{len(self._recent) + 1} restarts within {policy.within:g} s, more than "
            f"max_restarts={policy.max_restarts}; the supervisor stopped all children and "
            "gave up. See .failures; fix the child or raise max_restarts / within."
        )
