"""A per-plugin crash breaker: a plugin whose executions keep killing their workers is
refused fast for a cool-down, instead of costing a worker start per call.

Each plugin has a circuit. It is *closed* (executions run) until ``threshold`` executions in
a row ended with their worker dead or killed (a crash, a timeout or quota kill, a failed
health check); an execution that ends any other way resets the count. Then it is *open* for
``cooldown`` seconds: every execution of the plugin fails at once with
:class:`~plugin_execution.errors.PluginQuarantinedError`. After the cool-down it is
*half-open*: one trial execution runs (others are still refused while it does); if it
leaves its worker alive the circuit closes, if it kills it the circuit opens again.

Times come from ``trio.current_time()``, so a ``MockClock`` drives them in tests.
"""

from __future__ import annotations

from typing import Any

import trio

from ..errors import PluginQuarantinedError

__all__ = ["CrashBreaker"]


class _Circuit:
    __slots__ = ("kills", "open_until", "probing")

    def __init__(self) -> None:
        self.kills = 0  # worker-killing executions in a row
        self.open_until: float | None = None  # None: closed; past it: half-open
        self.probing = False  # the half-open trial is running


class CrashBreaker:
    """The circuits of every plugin that killed a worker lately.

    ``threshold`` None or 0 turns the breaker off. Only plugins with kills on record hold
    a circuit, so its memory is bounded by the plugins that misbehave.
    """

    def __init__(self, threshold: int | None, cooldown: float) -> None:
        if threshold is not None and threshold < 0:
            raise ValueError(f"crash_breaker_threshold must be >= 0 or None, not {threshold}")
        if cooldown < 0:
            raise ValueError(f"crash_breaker_cooldown must be >= 0, not {cooldown}")
        self.threshold = threshold or 0
        self.cooldown = cooldown
        self.trips = 0
        self.refused = 0
        self._circuits: dict[str, _Circuit] = {}

    def admit(self, plugin_id: str) -> bool:
        """Let an execution of ``plugin_id`` run, or raise ``PluginQuarantinedError``.

        Returns True when it is the half-open trial: pass that to :meth:`record`.
        """
        circuit = self._circuits.get(plugin_id)
        if circuit is None or circuit.open_until is None:
            return False
        left = circuit.open_until - trio.current_time()
        if left <= 0 and not circuit.probing:
            circuit.probing = True
            return True
        self.refused += 1
        when = f"for {left:.1f} s more" if left > 0 else "until a trial execution ends"
        raise PluginQuarantinedError(
            f"plugin {plugin_id!r} is quarantined {when}: {self.threshold} executions in a row "
            "killed their worker (crash, kill or timeout); fix the plugin, or tune "
            "crash_breaker_threshold / crash_breaker_cooldown",
            plugin_id=plugin_id,
            details={"retry_after_s": max(0.0, left), "threshold": self.threshold},
        )

    def record(self, plugin_id: str, killed: bool | None, *, trial: bool = False) -> None:
        """How an admitted execution ended: ``killed`` its worker, or not, or None when it
        never ran (refused, queued out, cancelled early): no verdict either way."""
        if not self.threshold:
            return
        circuit = self._circuits.get(plugin_id)
        if trial and circuit is not None:
            circuit.probing = False
        if killed is None:
            return
        if not killed:
            if circuit is not None and (trial or circuit.open_until is None):
                del self._circuits[plugin_id]  # closed, nothing on record
            elif circuit is not None:
                circuit.kills = 0
            return
        if circuit is None:
            circuit = self._circuits[plugin_id] = _Circuit()
        circuit.kills += 1
        if trial or (circuit.open_until is None and circuit.kills >= self.threshold):
            circuit.open_until = trio.current_time() + self.cooldown
            circuit.kills = 0
            self.trips += 1

    def quarantined(self) -> dict[str, float]:
        """The plugins refused now, with the seconds left (0: half-open, trial pending)."""
        now = trio.current_time()
        return {
            plugin_id: max(0.0, circuit.open_until - now)
            for plugin_id, circuit in self._circuits.items()
            if circuit.open_until is not None
        }

    def details(self) -> dict[str, Any]:
        """For ``stats().details`` / ``health().details``."""
        return {
            "enabled": bool(self.threshold),
            "threshold": self.threshold,
            "cooldown_s": self.cooldown,
            "quarantined": self.quarantined(),
            "trips": self.trips,
            "refused": self.refused,
        }
