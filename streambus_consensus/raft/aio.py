"""Awaiting a node's futures on an asyncio event loop.

:meth:`RaftNode.propose_async` and :meth:`RaftNode.read_index_async` return
:class:`concurrent.futures.Future` objects resolved on the node's worker
thread. :func:`wait_outcome` awaits one without holding a thread, with the
deadline and the typed error of the blocking :meth:`RaftNode.propose`.

The worker resolves futures in batches (every proposal an fsync committed);
their outcomes are handed to the loop with one wake-up per batch rather than
one per future (:func:`asyncio.wrap_future` wakes the loop for each).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import threading
import weakref
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ProposalTimeoutError

if TYPE_CHECKING:
    from .node import RaftNode

__all__ = ["wait_outcome"]

T = TypeVar("T")


async def wait_outcome(node: RaftNode, future: Future[T], timeout: float | None = None) -> T:
    """Await ``future`` (a proposal or read index of ``node``) on the running loop.

    Raises what the future raises, or :class:`ProposalTimeoutError` after
    ``timeout`` (default ``proposal_timeout``), as :meth:`RaftNode.propose`
    does: the command may still be applied.
    """
    limit = node.config.proposal_timeout if timeout is None else timeout
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[T] = loop.create_future()
    future.add_done_callback(functools.partial(_landing(loop).arrive, waiter))
    expiry = loop.call_later(limit, _expire, waiter)
    try:
        return await waiter
    except _ExpiredError:
        node.proposals_failed["ProposalTimeoutError"] += 1
        raise ProposalTimeoutError(
            f"no outcome within {limit:.3g}s; the command may still be applied",
            node_id=node.node_id) from None
    finally:
        expiry.cancel()


class _ExpiredError(Exception):
    """The deadline of :func:`wait_outcome` passed."""


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(_ExpiredError())


class _Landing:
    """Where finished node futures wait for their event loop; one wake-up per batch."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ready: collections.deque[tuple[asyncio.Future[Any], Future[Any]]] = (
            collections.deque())
        self._lock = threading.Lock()

    def arrive(self, waiter: asyncio.Future[Any], future: Future[Any]) -> None:
        """``future`` is done (any thread): hand its outcome to ``waiter``'s loop."""
        with self._lock:
            first = not self._ready
            self._ready.append((waiter, future))
        if first:
            try:
                self._loop.call_soon_threadsafe(self._drain)
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
