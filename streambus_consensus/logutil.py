"""Log lines that cannot flood: one line per key per interval, with a count of the rest."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["AUDIT_LOGGER", "RateLimitedLog", "audit"]


AUDIT_LOGGER = "streambus_consensus.audit"
"""The logger of audit lines: route it to a file of its own to keep a trail."""

_audit = logging.getLogger(AUDIT_LOGGER)


def audit(node_id: str, message: str, *args: Any) -> None:
    """One INFO line for a change someone asked for (membership, leadership,
    topics, brokers), logged by the node that carried it out once it is done."""
    _audit.info("%s: " + message, node_id, *args)


class RateLimitedLog:
    """Logs a message at most once per ``every`` seconds for each key.

    A peer that keeps failing the same way, or a full file table that makes
    every accept fail, would otherwise write a line per attempt. The next line
    that gets through says how many were held back. Thread-safe.

    Args:
        logger: where the lines go.
        every: seconds between two lines of the same key.
        clock: the time source (tests pass their own).
    """

    MAX_KEYS = 1024

    def __init__(self, logger: logging.Logger, every: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger, self._every, self._clock = logger, every, clock
        self._seen: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def log(self, key: str, level: int, message: str, *args: Any) -> bool:
        """Log unless ``key`` was logged less than ``every`` seconds ago; ``True`` if logged."""
        now = self._clock()
        with self._lock:
            last, held = self._seen.get(key, (now - self._every, 0))
            if now - last < self._every:
                self._seen[key] = (last, held + 1)
                return False
            if len(self._seen) >= self.MAX_KEYS:
                self._seen.clear()
            self._seen[key] = (now, 0)
        if held:
            message += f" ({held} more like it in the last {now - last:.0f}s)"
        self._logger.log(level, message, *args)
        return True
