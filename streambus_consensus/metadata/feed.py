"""The change feed: every metadata change, in log order, for watchers.

The Raft thread only appends to the feed (one short lock per applied entry
that changed something); each watcher runs on its own thread and *pulls*
from it, so a slow watcher never delays Raft or another watcher. The feed
keeps the most recent changes; a watcher that asks to resume from an offset
older than that window, or that falls that far behind, first receives a full
image (a ``reset`` event) and then the changes after it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..raft.aio import wait_done
from .fsm import ApplyResult, Change, MetadataImage, MetadataStateMachine

if TYPE_CHECKING:
    from ..config import NodeConfig

__all__ = ["ChangeFeed", "MetadataEvent", "Watch", "WatchedStateMachine"]

logger = logging.getLogger(__name__)

_FREEZE_AFTER_CHANGES = 10_000
"""An apply with at least this many changes freezes the collector's generations."""


@dataclass(frozen=True, slots=True)
class MetadataEvent:
    """What a watcher receives: the changes of one log entry, or a full image."""

    offset: int
    """Log index of the entry (for a reset: the image's offset)."""
    changes: tuple[Change, ...]
    """The entry's changes, in order (empty for a reset)."""
    image: MetadataImage | None = None
    """Set on a reset: the whole metadata at ``offset``; apply it instead of changes."""

    @property
    def is_reset(self) -> bool:
        """Whether this event carries a full image."""
        return self.image is not None


class ChangeFeed:
    """A bounded, ordered log of recent change events. Thread-safe."""

    def __init__(self, image: Callable[[], MetadataImage], retain: int = 100_000) -> None:
        self._image = image
        self._events: collections.deque[MetadataEvent] = collections.deque(maxlen=retain)
        self._floor = 0
        """Every change with an offset above this is in ``_events``."""
        self._cond = threading.Condition()
        self._restoring = 0
        """Restores in progress (:meth:`replace`): readers wait for the reset."""
        self._waiters: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        """Readers waiting on event loops (:meth:`wait_async`), by loop."""
        self.resets = 0
        """Watchers that had to be sent a full image because they fell behind."""

    def append(self, offset: int, changes: tuple[Change, ...]) -> None:
        """Record one entry's changes (Raft thread)."""
        with self._cond:
            if len(self._events) == self._events.maxlen:
                self._floor = self._events[0].offset
            self._events.append(MetadataEvent(offset, changes))
            self._notify()

    def reset(self, offset: int) -> None:
        """Forget everything up to ``offset`` (after a snapshot is restored)."""
        with self._cond:
            self._events.clear()
            self._floor = offset
            self._notify()

    def _notify(self) -> None:
        """Wake every reader (lock held): threads, and one call per event loop."""
        self._cond.notify_all()
        waiters, self._waiters = self._waiters, {}
        for loop, futures in waiters.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits there
                loop.call_soon_threadsafe(_wake, futures)

    def _has_news(self, after: int | None) -> bool:
        """Whether :meth:`read` would answer ``after`` at once (lock held)."""
        return not self._restoring and (after is None or after < self._floor or (
            bool(self._events) and self._events[-1].offset > after))

    async def wait_async(self, after: int | None, timeout: float) -> None:
        """Wait as :meth:`read` does, on the running event loop, without holding
        a thread: until :meth:`read` has something for ``after``, at most
        ``timeout`` seconds. Then call :meth:`read` with no timeout."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        with self._cond:
            if self._has_news(after):
                return
            self._waiters.setdefault(loop, []).append(waiter)
        try:
            await wait_done(waiter, timeout)
        finally:
            with self._cond:
                waiting = self._waiters.get(loop)
                if waiting is not None and waiter in waiting:
                    waiting.remove(waiter)
                    if not waiting:
                        del self._waiters[loop]

    def replace(self, restore: Callable[[], int]) -> None:
        """Replace the state and forget what the feed held, as one step for
        readers: ``restore`` replaces the state and returns its offset, then
        the feed is :meth:`reset` to that offset, both under the feed's lock.

        A reader in between would see the new state beside the old floor:
        when a snapshot older than the floor is installed (a follower that
        restarted from its own snapshot is sent the leader's older one), a
        watcher behind that floor was answered an image *below* the offset
        it asked after, and then those offsets a second time.

        The restore itself runs outside the lock (it takes seconds at a
        million partitions, and watchers wait on the API's event loop, which
        takes the lock to look): meanwhile readers are told there is nothing
        new yet, and :meth:`read` waits for the reset.
        """
        with self._cond:
            self._restoring += 1
        offset: int | None = None
        try:
            offset = restore()
        finally:
            with self._cond:
                self._restoring -= 1
                if offset is not None:
                    self.reset(offset)
                else:
                    self._notify()

    def read(self, after: int | None, timeout: float) -> list[MetadataEvent]:
        """Events after offset ``after``; a reset first if ``after`` is ``None``
        or older than the window. Waits up to ``timeout`` for something new."""
        with self._cond:
            if timeout > 0:
                # A snapshot restored meanwhile (a restart, or an install from
                # the leader) raises the floor past changes this feed never
                # held: the reader then needs an image, not what follows.
                self._cond.wait_for(lambda: self._has_news(after), timeout)
            # Never an image of a state whose floor is not set yet (replace).
            self._cond.wait_for(lambda: not self._restoring)
            if after is None or after < self._floor:
                if after is not None:
                    self.resets += 1
                image = self._image()
                return [MetadataEvent(image.offset, (), image)]
            return [e for e in self._events if e.offset > after]

    def wake_all(self) -> None:
        """Wake every waiting reader (on shutdown)."""
        with self._cond:
            self._notify()


def _wake(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


class WatchedStateMachine:
    """A :class:`MetadataStateMachine` that records its changes in a :class:`ChangeFeed`.

    Implements the StateMachine and ConsistentSnapshotter protocols.
    """

    def __init__(self, fsm: MetadataStateMachine | None = None, *, retain: int = 100_000):
        self.fsm = fsm or MetadataStateMachine()
        self.feed = ChangeFeed(self.fsm.image, retain)
        self._unfrozen = 0
        self._frozen = 0

    def apply_at(self, index: int, command: bytes) -> ApplyResult:
        """Apply and record the changes.

        The cyclic garbage collector is paused during the apply: a command
        that changes a million partitions allocates millions of objects, and
        the collections they would trigger (each scanning the whole state)
        cost a third of the apply on the Raft thread. Records are acyclic, so
        nothing waits on the collector. After a large apply, or once the
        changes since the last time reach an eighth of those before,
        :func:`gc.freeze` moves the state out of the collector's reach, as
        after a snapshot restore (replaced records are still freed by
        reference counting): otherwise a full collection walks every record,
        a pause that grows with the state (0.4 s at 100,000 topics, as long
        as an election timeout) while holding the interpreter lock.
        """
        enabled = gc.isenabled()
        gc.disable()
        try:
            result = self.fsm.apply_at(index, command)
            self._unfrozen += len(result.changes)
            if enabled and self._unfrozen >= max(_FREEZE_AFTER_CHANGES, self._frozen // 8):
                # One apply changed 10,000 records, or the state grew by an
                # eighth since the last freeze: freeze before the collector
                # runs again, so that no collection walks the new records
                # (the first young collection after a million-partition fence
                # would take a third as long as the apply itself).
                gc.freeze()
                self._frozen += self._unfrozen
                self._unfrozen = 0
        finally:
            if enabled:
                gc.enable()
        if result.changes:
            self.feed.append(index, result.changes)
        return result

    def bootstrap_command(self, config: NodeConfig) -> bytes | None:
        """See :meth:`MetadataStateMachine.bootstrap_command`."""
        return self.fsm.bootstrap_command(config)

    def batching_allowed(self) -> bool:
        """See :meth:`MetadataStateMachine.batching_allowed`."""
        return self.fsm.batching_allowed()

    def apply_batch(self, index: int, commands: Sequence[bytes]) -> list[ApplyResult]:
        """Apply a batch entry; its changes are one event at ``index``."""
        results = self.fsm.apply_batch(index, commands)
        changes = [change for result in results for change in result.changes]
        if changes:
            self.feed.append(index, tuple(changes))
        return results

    def apply(self, command: bytes) -> ApplyResult:
        """Apply at the next offset."""
        return self.apply_at(self.fsm.offset + 1, command)

    def snapshot(self) -> bytes:
        """The state machine's snapshot."""
        return self.fsm.snapshot()

    def prepare_snapshot(self) -> Callable[[], bytes]:
        """Cheap capture; encoding happens later, off the Raft thread."""
        return self.fsm.prepare_snapshot()

    def restore(self, data: bytes) -> None:
        """Restore; watchers behind the restored offset get a full image next
        (never one at or below the offset they asked after)."""

        def load() -> int:
            self.fsm.restore(data)
            return self.fsm.offset

        self.feed.replace(load)


class Watch:
    """A running watcher: calls ``listener(event)`` on its own thread, in log order.

    Exceptions from the listener are logged and the watch goes on. Use
    :meth:`close` (or a ``with`` block) to stop it.
    """

    def __init__(self, feed: ChangeFeed, listener: Callable[[MetadataEvent], None],
                 from_offset: int | None, *, name: str = "metadata-watch") -> None:
        self._feed = feed
        self._listener = listener
        self._cursor = from_offset
        self._stop = threading.Event()
        self.delivered = 0
        """Events delivered so far."""
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def offset(self) -> int | None:
        """Offset of the last event delivered."""
        return self._cursor

    def _run(self) -> None:
        while not self._stop.is_set():
            for event in self._feed.read(self._cursor, timeout=0.5):
                if self._stop.is_set():
                    return
                if (not event.is_reset and self._cursor is not None
                        and event.offset <= self._cursor):
                    continue  # already covered by a reset image
                try:
                    self._listener(event)
                except Exception:
                    logger.exception("metadata watcher raised at offset %d; continuing",
                                     event.offset)
                self._cursor = event.offset
                self.delivered += 1

    def close(self, timeout: float = 5.0) -> None:
        """Stop delivering. Idempotent."""
        self._stop.set()
        self._feed.wake_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
