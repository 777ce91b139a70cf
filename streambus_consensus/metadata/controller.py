"""Controller duties that only the leader performs: broker liveness.

Brokers heartbeat (every ~2 s). The leader keeps the time of each broker's
last heartbeat **in memory**, never in the log, as KRaft's active controller
does. A broker that misses ``session_timeout`` is fenced through the log
(removed from every ISR, its partitions get new leaders, epochs bumped); a
fenced broker that heartbeats again with its current epoch is unfenced.

Nothing of this runs on a follower. When a node becomes leader it gives
every broker a full session from that moment before fencing anyone, so a
leader change never fences live brokers that were talking to the old leader.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import CommandRefusedError, ConsensusError
from .records import BrokerState

if TYPE_CHECKING:
    from .store import MetadataStore

__all__ = ["Controller"]

logger = logging.getLogger(__name__)


class Controller:
    """Leader-only broker liveness. Started and stopped by its :class:`MetadataStore`.

    Args:
        store: the store to read metadata from and propose through.
        session_timeout: silence after which an active broker is fenced.
        clock: monotonic seconds (inject for tests).
    """

    def __init__(self, store: MetadataStore, *, session_timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self.session_timeout = session_timeout
        self._clock = clock
        self._last_seen: dict[int, tuple[float, int]] = {}
        self._lock = threading.Lock()
        self._leading_since: float | None = None
        self._leading_term: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fenced_by_controller = 0
        """Brokers this node's controller fenced for silence."""
        self.unfenced_by_controller = 0
        """Fenced brokers this node's controller unfenced because they heartbeat again."""

    def start(self) -> None:
        """Start checking; listen for heartbeats forwarded by followers."""
        self._store.node.on_app_message(self._on_app_message)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"controller-{self._store.node.node_id}")
        self._thread.start()

    def stop(self) -> None:
        """Stop checking. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _on_app_message(self, peer: str, message: Mapping[str, Any]) -> None:
        if message.get("type") != "app:heartbeat":
            return
        broker_id, epoch = message.get("broker_id"), message.get("broker_epoch")
        if isinstance(broker_id, int) and isinstance(epoch, int):
            self.record_heartbeat(broker_id, epoch)

    def record_heartbeat(self, broker_id: int, broker_epoch: int) -> None:
        """Note that a broker is alive (leader only; ignored elsewhere)."""
        with self._lock:
            self._last_seen[broker_id] = (self._clock(), broker_epoch)

    def _run(self) -> None:
        interval = max(0.05, min(1.0, self.session_timeout / 4))
        while not self._stop.wait(interval):
            try:
                self.check()
            except ConsensusError as exc:
                logger.info("controller check deferred: %s", exc)
            except Exception:
                logger.exception("controller check failed")

    def check(self) -> None:
        """One pass: fence silent brokers, unfence returning ones (leader only)."""
        node = self._store.node
        if not node.is_leader:
            self._leading_since = self._leading_term = None
            with self._lock:
                self._last_seen.clear()
            return
        now = self._clock()
        term = node.term
        if self._leading_since is None or term != self._leading_term:
            # A fresh session for everyone from the start of this leadership, also
            # when it was lost and won back between two passes (a new term).
            self._leading_since, self._leading_term = now, term
        image = self._store.image()
        with self._lock:
            seen = dict(self._last_seen)
        for broker in image.brokers.values():
            last, epoch = seen.get(broker.broker_id, (self._leading_since, -1))
            if epoch != broker.broker_epoch:
                # A heartbeat names the incarnation it comes from (as in KRaft):
                # an older incarnation's says nothing about the current one.
                last = self._leading_since
            silent = now - max(last, self._leading_since)
            if broker.state is BrokerState.ACTIVE and silent > self.session_timeout:
                logger.warning("broker %d silent for %.1fs: fencing", broker.broker_id, silent)
                if self._propose(self._store.fence_broker, broker.broker_id,
                                 broker.broker_epoch):
                    self.fenced_by_controller += 1
            elif (broker.state is BrokerState.FENCED and epoch == broker.broker_epoch
                  and silent <= self.session_timeout):
                logger.info("broker %d heartbeating again: unfencing", broker.broker_id)
                if self._propose(self._store.unfence_broker, broker.broker_id,
                                 broker.broker_epoch):
                    self.unfenced_by_controller += 1

    def _propose(self, action: Callable[..., None], broker_id: int, epoch: int) -> bool:
        """Carry out one fence or unfence; whether the state machine accepted it."""
        try:
            action(broker_id, epoch, timeout=self.session_timeout)
        except CommandRefusedError as exc:
            logger.info("controller action on broker %d refused: %s", broker_id, exc)
            return False
        return True
