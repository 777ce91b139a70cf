"""Awaiting a node's futures on an asyncio event loop.

:meth:`RaftNode.propose_async` and :meth:`RaftNode.read_index_async` return
:class:`concurrent.futures.Future` objects resolved on the node's worker
thread. :func:`wait_outcome` awaits one without holding a thread, with the
deadline and the typed error of the blocking :meth:`RaftNode.propose`.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import TYPE_CHECKING, TypeVar

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
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), limit)
    except TimeoutError:
        node.proposals_failed["ProposalTimeoutError"] += 1
        raise ProposalTimeoutError(
            f"no outcome within {limit:.3g}s; the command may still be applied",
            node_id=node.node_id) from None
