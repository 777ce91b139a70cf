"""Elections in an idle cluster, watched in the background (part of ``make bench``).

A three-node metadata cluster is started and left alone: no client writes.
Every node's term is polled every few seconds; the number of elections is
the highest term at the end minus the highest term at the start (each
election bumps the term at least once). In ``make bench`` the watch runs
*while the other sections load the machine*, which is harsher than a quiet
machine; ``python -m streambus_consensus.bench.failover --idle 600`` watches
on its own.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from ..testing.harness import LocalCluster

__all__ = ["IdleWatch"]


class IdleWatch:
    """A background idle cluster; :meth:`finish` stops it and returns the figures."""

    def __init__(self, base: Path, size: int = 3, interval: float = 2.0) -> None:
        self.cluster = LocalCluster(size, base, app="metadata",
                                    settings={"broker_session_timeout": 86400.0})
        self.interval = interval
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.leaders: list[tuple[float, str]] = []
        self.started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-idle", daemon=True)

    def start(self) -> None:
        """Start the cluster, wait for a leader and a settled term, then watch."""
        try:
            self.cluster.start()
            self.cluster.wait_for_leader(30)
            time.sleep(1.0)
            self._sample()
            self.started = time.monotonic()
            self._thread.start()
        except BaseException:
            self.cluster.close()
            raise

    def _sample(self) -> None:
        terms: dict[str, int] = {}
        for node_id in self.cluster.nodes:
            status = self.cluster.status(node_id, timeout=2.0)
            if status:
                terms[node_id] = status["term"]
                if status["state"] == "leader" and (not self.leaders
                                                    or self.leaders[-1][1] != node_id):
                    self.leaders.append((time.monotonic(), node_id))
        self.samples.append((time.monotonic(), terms))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def elapsed(self) -> float:
        """Seconds watched so far."""
        return time.monotonic() - self.started if self.started else 0.0

    def finish(self) -> dict[str, Any]:
        """Stop watching and the cluster; the figures."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        try:
            self._sample()
        finally:
            self.cluster.close()
        first = max(self.samples[0][1].values(), default=0) if self.samples else 0
        last = max(self.samples[-1][1].values(), default=0) if self.samples else 0
        unanswered = sum(1 for _, terms in self.samples if len(terms) < len(self.cluster.nodes))
        return {"seconds": round(self.elapsed(), 1), "elections": last - first,
                "leaders_seen": [n for _, n in self.leaders], "samples": len(self.samples),
                "samples_with_a_node_not_answering": unanswered}
