"""Awaiting a node's futures on an asyncio event loop.

:meth:`RaftNode.propose_async` and :meth:`RaftNode.read_index_async` return
:class:`concurrent.futures.Future` objects resolved on the node's worker
thread. :func:`wait_outcome` awaits one without holding a thread, with the
deadline and the typed error of the blocking :meth:`RaftNode.propose`.

The worker resolves futures in batches (every proposal an fsync committed);
their outcomes are handed to the loop with one wake-up per batch rather than
one per future (:func:`asyncio.wrap_future` wakes the loop for each). The
deadlines of all waits on a loop share one timer (no timer per request).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import heapq
import itertools
import math
import threading
import weakref
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ProposalTimeoutError

if TYPE_CHECKING:
    from .node import RaftNode

__all__ = ["wait_done", "wait_outcome"]

T = TypeVar("T")


async def wait_outcome(node: RaftNode, future: Future[T], timeout: float | None = None) -> T:
    """Await ``future`` (a proposal or read index of ``node``) on the running loop.

    Raises what the future raises, or :class:`ProposalTimeoutError` after
    ``timeout`` (default ``proposal_timeout``), as :meth:`RaftNode.propose`
    does: the command may still be applied.
    """
    limit = node.config.proposal_timeout if timeout is None else timeout
    loop = asyncio.get_running_loop()
    landing = _landing(loop)
    waiter: asyncio.Future[T] = loop.create_future()
    future.add_done_callback(functools.partial(landing.arrive, waiter))
    slot = landing.expire_at(loop.time() + limit, waiter)
    try:
        return await waiter
    except _ExpiredError:
        node.proposals_failed["ProposalTimeoutError"] += 1
        raise ProposalTimeoutError(
            f"no outcome within {limit:.3g}s; the command may still be applied",
            node_id=node.node_id) from None
    finally:
        slot[0] = None  # the deadline entry no longer holds the waiter


async def wait_done(waiter: asyncio.Future[Any], timeout: float) -> bool:
    """Await ``waiter`` (a future of the running loop) for at most ``timeout``
    seconds; ``True`` if it finished, ``False`` if the time ran out. The
    deadline shares the loop's one timer with :func:`wait_outcome`'s."""
    loop = asyncio.get_running_loop()
    watch: asyncio.Future[None] = loop.create_future()
    waiter.add_done_callback(functools.partial(_finish, watch))
    slot = _landing(loop).expire_at(loop.time() + timeout, watch)
    try:
        await watch
        return True
    except _ExpiredError:
        return False
    finally:
        slot[0] = None


def _finish(watch: asyncio.Future[None], _: asyncio.Future[Any]) -> None:
    if not watch.done():
        watch.set_result(None)


class _ExpiredError(Exception):
    """The deadline of :func:`wait_outcome` passed."""


_Slot = list[asyncio.Future[Any] | None]
"""A waiter behind its deadline, cleared when the wait ends."""


class _Landing:
    """Where finished node futures wait for their event loop, with one wake-up per
    batch; and the deadlines of the waits, with one loop timer for them all."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weakly: the registry of landings is keyed weakly by their loops.
        self._loop_ref = weakref.ref(loop)
        self._ready: collections.deque[tuple[asyncio.Future[Any], Future[Any]]] = (
            collections.deque())
        self._lock = threading.Lock()
        self._deadlines: list[tuple[float, int, _Slot]] = []
        self._order = itertools.count()
        self._timer_at = math.inf
        """When the earliest armed timer fires."""

    def expire_at(self, deadline: float, waiter: asyncio.Future[Any]) -> _Slot:
        """Fail ``waiter`` with :class:`_ExpiredError` at ``deadline`` (loop time)
        unless it is done by then or its slot is cleared (loop thread)."""
        slot: _Slot = [waiter]
        heapq.heappush(self._deadlines, (deadline, next(self._order), slot))
        if deadline < self._timer_at:  # deadlines mostly grow: rarely armed
            self._arm(waiter.get_loop(), deadline)
        return slot

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        # The handle is not kept (it refers to the loop, which must stay
        # collectable): a timer superseded by an earlier one fires harmlessly.
        self._timer_at = at
        loop.call_at(at, self._expire, loop, at)

    def _expire(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        now = loop.time()
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            waiter = heapq.heappop(heap)[2][0]
            if waiter is not None and not waiter.done():
                waiter.set_exception(_ExpiredError())
        if at == self._timer_at:  # the timer in charge: hand over to the next deadline
            self._timer_at = math.inf
            if heap:
                self._arm(loop, heap[0][0])

    def arrive(self, waiter: asyncio.Future[Any], future: Future[Any]) -> None:
        """``future`` is done (any thread): hand its outcome to ``waiter``'s loop."""
        with self._lock:
            first = not self._ready
            self._ready.append((waiter, future))
        loop = self._loop_ref()
        if first and loop is not None:
            try:
                loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody waits any more
                with self._lock:
                    self._ready.clear()

    def _drain(self) -> None:
        with self._lock:
            batch, self._ready = self._ready, collections.deque()
        for waiter, future in batch:
            if waiter.done():
                continue  # expired or cancelled meanwhile
            if future.cancelled():
                waiter.cancel()
                continue
            error = future.exception()
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(future.result())


_landings: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Landing] = (
    weakref.WeakKeyDictionary())
_landings_lock = threading.Lock()


def _landing(loop: asyncio.AbstractEventLoop) -> _Landing:
    landing = _landings.get(loop)
    if landing is None:
        with _landings_lock:
            landing = _landings.setdefault(loop, _Landing(loop))
    return landing
