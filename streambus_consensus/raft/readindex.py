"""Linearizable reads without log entries: ReadIndex (Ongaro's thesis, §6.4).

A read is linearizable when it sees every write that completed before it
began. The leader answers with a *read index* instead of appending a log
entry:

1. It records its commit index as the read index. A new leader does not yet
   know which entries are committed, so it waits until it has committed an
   entry of its own term (PySyncObj appends a no-op on election).
2. It confirms that it still leads: one round of ``read_index.ping`` to the
   voters; a voter acknowledges when its term is not above the leader's (it
   has voted for no later leader). A majority, the leader included, means no
   other leader can have committed anything before the round began.
3. Once its applied index reaches the read index, the read runs on the local
   state.

Reads are batched: every read that arrives while a round is in flight waits
for the next round, and one round serves every read queued when it began. A
follower asks the leader for a read index (one ``read_index.ask`` serves
every read waiting on it), then waits until its own applied index reaches
it.

**Mixed versions.** The messages travel on the cluster's authenticated links
under the application-message prefix (``app:``), which releases without
ReadIndex ignore silently. A peer counts as *capable* once it has sent any
of them. While fewer capable voters than a majority are known, a round also
commits a barrier (a no-op entry) and is confirmed by whichever comes first,
a majority of acknowledgements or the barrier's commit (both prove
leadership in the current term after the round began). A follower whose
leader is not known capable likewise proposes a barrier beside its ask and
reads at the barrier's index. So a rolling upgrade from a release without
ReadIndex keeps linearizable reads working, at the old cost, until a
majority runs the new one.

Everything here runs on the node's Raft thread; futures are settled through
the ``settle`` callback, which the node runs on its worker thread.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import NoLeaderError, NotLeaderError, ProposalTimeoutError
from ..interfaces import NodeState
from .prevote import GatedEngine

__all__ = ["READ_INDEX_MESSAGES", "ReadEngine", "ReadIndex"]

logger = logging.getLogger(__name__)

_PING = "app:read_index.ping"
_PONG = "app:read_index.pong"
_ASK = "app:read_index.ask"
_ANSWER = "app:read_index.answer"
READ_INDEX_MESSAGES = frozenset({_PING, _PONG, _ASK, _ANSWER})
"""Message types handled by :class:`ReadIndex` (never reach the engine)."""

Settle = Callable[[list[tuple[Future[int], int | BaseException]]], None]


class ReadEngine(GatedEngine, Protocol):
    """What ReadIndex reads and does in the engine (see :class:`~.engine.Engine`):
    the election gate's view plus commit and apply progress and proposing."""

    @property
    def commit_index(self) -> int: ...

    @property
    def applied_index(self) -> int: ...

    @property
    def committed_in_term(self) -> bool:
        """Whether the commit index is at an entry of the current term."""
        ...

    def propose(self, command: bytes, callback: Callable[[Any, int], None]) -> None: ...


@dataclass
class _Read:
    """One read: a local caller's future, or a follower's ask."""

    expires: float
    future: Future[int] | None = None
    peer: str | None = None
    ask: int = 0


@dataclass
class _Round:
    seq: int
    term: int
    index: int
    need: int
    reads: list[_Read]
    started: float
    voters: frozenset[str]
    acks: set[str] = field(default_factory=set)


@dataclass
class _Ask:
    ask: int
    leader: str
    reads: list[_Read]
    sent: float


class ReadIndex:
    """ReadIndex for one node. See the module docstring.

    Args:
        node_id: this node.
        barrier: the entry bytes of a no-op the node's apply ignores.
        settle: settles futures (``(future, index or error)``), off the Raft thread.
        retry: how long a round or an ask may go unanswered before it is
            started again (and, for a round, before silent voters stop
            counting as capable).
        clock: monotonic clock (injectable for tests).
    """

    def __init__(self, *, node_id: str, barrier: bytes, settle: Settle, retry: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._node_id = node_id
        self._barrier = barrier
        self._settle = settle
        self._retry = retry
        self._clock = clock
        self._arrived: list[_Read] = []
        self._queue: list[_Read] = []
        self._round: _Round | None = None
        self._asking: list[_Read] = []
        self._ask: _Ask | None = None
        self._applying: list[tuple[int, int, Future[int]]] = []
        self._order = itertools.count()
        self._seq = itertools.count(1)
        self._capable: set[str] = set()
        self._done: list[tuple[Future[int], int | BaseException]] = []
        self.rounds = 0
        """Leadership-confirmation rounds this node started as leader."""
        self.barrier_rounds = 0
        """Rounds or asks that also committed a barrier (peers not known capable)."""
        self.asks = 0
        """Read-index requests this node sent to a leader."""

    # -- from the node ----------------------------------------------------------------

    def submit(self, future: Future[int], expires: float) -> None:
        """A local read (Raft thread); settled with its read index or an error."""
        self._arrived.append(_Read(expires, future=future))

    def fail_all(self, error: BaseException) -> None:
        """Settle every waiting read with ``error`` (the node is stopping)."""
        reads = self._arrived + self._queue + self._asking
        if self._round is not None:
            reads += self._round.reads
        if self._ask is not None:
            reads += self._ask.reads
        self._arrived, self._queue, self._asking = [], [], []
        self._round = self._ask = None
        for read in reads:
            if read.future is not None:
                self._done.append((read.future, error))
        for _, _, future in self._applying:
            self._done.append((future, error))
        self._applying = []
        self._flush()

    @property
    def waiting(self) -> int:
        """Reads not yet settled."""
        count = len(self._arrived) + len(self._queue) + len(self._asking) + len(self._applying)
        if self._round is not None:
            count += len(self._round.reads)
        if self._ask is not None:
            count += len(self._ask.reads)
        return count

    def pump(self, engine: ReadEngine) -> None:
        """Move every read along as far as it can go now (Raft thread, each pass)."""
        now = self._clock()
        self._check_role(engine)
        self._dispatch(engine, now)
        if engine.state is NodeState.LEADER:
            self._lead(engine, now)
        else:
            self._follow(engine, now)
        self._release_applied(engine)
        self._flush()

    # -- messages -----------------------------------------------------------------------

    def on_message(self, engine: ReadEngine, peer_id: str, message: Mapping[str, Any]) -> None:
        """Handle one of :data:`READ_INDEX_MESSAGES` from ``peer_id`` (Raft thread)."""
        kind = message.get("type")
        if kind == _PING:
            self._capable.add(peer_id)  # it runs ReadIndex: it will answer asks
            term, seq = message.get("term"), message.get("round")
            if type(term) is int and type(seq) is int:
                # Acknowledge unless this voter is in a later term: it has then
                # voted for, or heard from, a later leader.
                ok = term >= engine.term and not (
                    engine.state is NodeState.LEADER and term == engine.term)
                engine.send(peer_id, {"type": _PONG, "term": term, "round": seq, "ok": ok})
        elif kind == _PONG:
            self._capable.add(peer_id)
            self._on_pong(engine, peer_id, message)
        elif kind == _ASK:
            self._capable.add(peer_id)
            ask = message.get("ask")
            if type(ask) is not int:
                return
            if engine.state is not NodeState.LEADER:
                engine.send(peer_id, {"type": _ANSWER, "ask": ask, "error": "not_leader",
                                      "leader": engine.leader_id})
                return
            # The asker asks again after ``retry``: an older ask need not outlive that.
            self._queue.append(_Read(self._clock() + self._retry, peer=peer_id, ask=ask))
            self._lead(engine, self._clock())
        elif kind == _ANSWER:
            self._capable.add(peer_id)
            self._on_answer(engine, peer_id, message)
        self._release_applied(engine)
        self._flush()

    # -- leader ----------------------------------------------------------------------

    def _lead(self, engine: ReadEngine, now: float) -> None:
        current = self._round
        if current is not None and now - current.started >= self._retry:
            # Unanswered (lost messages, a cut, a peer that rolled back to a
            # release without ReadIndex): silent voters stop counting as
            # capable and the reads go into a new round.
            self._capable -= set(engine.voters()) - current.acks
            self._queue = current.reads + self._queue
            self._round = current = None
        if current is None and self._queue and engine.committed_in_term:
            self._start_round(engine, now)

    def _start_round(self, engine: ReadEngine, now: float) -> None:
        voters = engine.voters()
        need = (len(voters) + 1) // 2 + 1
        current = _Round(next(self._seq), engine.term, engine.commit_index, need,
                         self._queue, now, frozenset(voters), {self._node_id})
        self._queue = []
        self._round = current
        self.rounds += 1
        if len(current.acks) >= need:
            self._confirm(engine, current)
            return
        for voter in voters:
            engine.send(voter, {"type": _PING, "term": current.term, "round": current.seq})
        if len(self._capable.intersection(voters)) + 1 < need:
            self.barrier_rounds += 1

            def committed(_result: Any, code: int) -> None:
                if code == 0 and self._round is current:
                    self._confirm(engine, current)
                    self._release_applied(engine)
                    self._flush()

            engine.propose(self._barrier, committed)

    def _on_pong(self, engine: ReadEngine, peer_id: str, message: Mapping[str, Any]) -> None:
        current = self._round
        if (current is None or message.get("round") != current.seq
                or message.get("term") != current.term or peer_id not in current.voters):
            return
        if message.get("ok") is not True:
            # A voter is in a later term: another leader may be serving writes.
            self._round = None
            self._fail(current.reads, NotLeaderError(
                "leadership was lost while confirming a read (a voter is in a later term)",
                leader_hint=None, node_id=self._node_id), engine)
            return
        if engine.state is not NodeState.LEADER or engine.term != current.term:
            return
        current.acks.add(peer_id)
        if len(current.acks) >= current.need:
            self._confirm(engine, current)

    def _confirm(self, engine: ReadEngine, current: _Round) -> None:
        self._round = None
        for read in current.reads:
            if read.future is not None:
                heapq.heappush(self._applying, (current.index, next(self._order), read.future))
            elif read.peer is not None:
                engine.send(read.peer, {"type": _ANSWER, "ask": read.ask, "index": current.index})
        if self._queue and engine.committed_in_term:
            self._start_round(engine, self._clock())

    # -- follower ----------------------------------------------------------------------

    def _follow(self, engine: ReadEngine, now: float) -> None:
        current = self._ask
        if current is not None and now - current.sent >= self._retry:
            self._capable.discard(current.leader)  # ask again, with a barrier beside it
            self._asking = current.reads + self._asking
            self._ask = current = None
        leader = engine.leader_id
        if current is None and self._asking and leader is not None and leader != self._node_id:
            self._send_ask(engine, leader, now)

    def _send_ask(self, engine: ReadEngine, leader: str, now: float) -> None:
        current = _Ask(next(self._seq), leader, self._asking, now)
        self._asking = []
        self._ask = current
        self.asks += 1
        engine.send(leader, {"type": _ASK, "ask": current.ask})
        if leader not in self._capable:
            self.barrier_rounds += 1

            def applied(_result: Any, code: int) -> None:
                # Called as the barrier is applied here: everything committed
                # before the reads began is at or below its index.
                if code == 0 and self._ask is current:
                    self._ask = None
                    self._wait_applied(current.reads, engine.applied_index + 1)

            engine.propose(self._barrier, applied)

    def _on_answer(self, engine: ReadEngine, peer_id: str, message: Mapping[str, Any]) -> None:
        current = self._ask
        if current is None or message.get("ask") != current.ask or peer_id != current.leader:
            return
        self._ask = None
        index = message.get("index")
        if type(index) is int:
            self._wait_applied(current.reads, index)
            return
        hint = message.get("leader")
        hint = hint if isinstance(hint, str) else None
        self._fail(current.reads, NotLeaderError(
            f"{peer_id} no longer leads (leader: {hint or 'unknown'}); read not served",
            leader_hint=hint, node_id=self._node_id), engine)

    # -- common ------------------------------------------------------------------------

    def _check_role(self, engine: ReadEngine) -> None:
        current = self._round
        leading = engine.state is NodeState.LEADER
        if current is not None and (not leading or engine.term != current.term):
            self._round = None
            self._fail(current.reads, self._lost(engine), engine)
        if self._queue and not leading:
            queued, self._queue = self._queue, []
            self._fail(queued, self._lost(engine), engine)
        asked = self._ask
        if asked is not None and (leading or engine.leader_id != asked.leader):
            self._ask = None
            self._arrived = asked.reads + self._arrived  # ask the new leader
        if self._asking and leading:
            self._arrived = self._asking + self._arrived
            self._asking = []

    def _lost(self, engine: ReadEngine) -> NotLeaderError:
        leader = engine.leader_id
        return NotLeaderError(
            f"leadership was lost while confirming a read (leader: {leader or 'unknown'})",
            leader_hint=leader, node_id=self._node_id)

    def _dispatch(self, engine: ReadEngine, now: float) -> None:
        if self._arrived:
            keep: list[_Read] = []
            leading = engine.state is NodeState.LEADER
            for read in self._arrived:
                if leading:
                    self._queue.append(read)
                elif engine.leader_id is not None:
                    self._asking.append(read)
                else:
                    keep.append(read)  # wait for a leader, until the read's deadline
            self._arrived = keep
        for name in ("_arrived", "_queue", "_asking"):
            reads: list[_Read] = getattr(self, name)
            if reads and any(r.expires <= now or _given_up(r) for r in reads):
                live = [r for r in reads if r.expires > now and not _given_up(r)]
                for read in reads:
                    if read.future is not None and read.expires <= now:
                        self._done.append((read.future, self._expired(engine)))
                setattr(self, name, live)

    def _expired(self, engine: ReadEngine) -> BaseException:
        if engine.leader_id is None:
            return NoLeaderError("no leader was known before the read's deadline",
                                 node_id=self._node_id)
        return ProposalTimeoutError("no read index before the read's deadline",
                                    node_id=self._node_id)

    def _wait_applied(self, reads: list[_Read], index: int) -> None:
        for read in reads:
            if read.future is not None:
                heapq.heappush(self._applying, (index, next(self._order), read.future))

    def _release_applied(self, engine: ReadEngine) -> None:
        applied = engine.applied_index
        while self._applying and self._applying[0][0] <= applied:
            index, _, future = heapq.heappop(self._applying)
            self._done.append((future, index))

    def _fail(self, reads: list[_Read], error: NotLeaderError, engine: ReadEngine) -> None:
        for read in reads:
            if read.future is not None:
                self._done.append((read.future, error))
            elif read.peer is not None:
                engine.send(read.peer, {"type": _ANSWER, "ask": read.ask, "error": "not_leader",
                                        "leader": error.leader_hint})

    def _flush(self) -> None:
        if self._done:
            done, self._done = self._done, []
            self._settle(done)


def _given_up(read: _Read) -> bool:
    """The local caller stopped waiting (it cancelled the future)."""
    return read.future is not None and read.future.done()
