"""Pre-vote and leader stickiness in front of the engine's election timer (engine issue E15).

PySyncObj campaigns as soon as its election timer runs out: it raises its
term and asks for votes. A node that was cut off, or paused, or whose timer
was started early, therefore comes back with a higher term and deposes a
healthy leader. Raft's answer (Ongaro's thesis, §9.6 and §4.2.3) is a
*pre-vote*: before a server raises its term it asks the voters whether they
would vote for it, and a voter says no while it has heard from a live leader
within the minimum election timeout.

:class:`ElectionGate` runs on the node's Raft thread, before each engine
tick:

- When the engine's election deadline has run out and no pre-vote has been
  won, the gate holds the engine's timer (moves its deadline forward; the
  engine's term never moves), forgets the leader as the engine itself would
  on starting an election, and sends ``pre_vote`` to every other voter with
  the term it would use and its last log index and term.
- A voter grants when it is not the leader, has not heard from a leader
  within ``election_timeout_min`` over a link that is still up, the
  candidate's log is at least as up to date as its own, and it has not
  promised its pre-vote to another candidate in the last
  ``election_timeout_min``. A grant is that promise: the voter holds its own
  timer while it lasts, so that two survivors of a dead leader do not both
  campaign and split the vote. Two candidates asking each other at once are
  ordered by ``(last log term, last log index, node id)``: the lesser one
  grants and drops its own round, so exactly one goes ahead.
- With a majority of grants (itself included) the gate expires the engine's
  timer; the engine campaigns at the next tick, exactly as it would have
  without the gate. Without one, the gate asks again every ``retry``
  seconds for as long as the timer stays run out.

Every way the engine can start an election passes here: its own timer,
``fast_failover`` (the transport found the leader's address refusing
connections: the gate forgets the leader's contact and expires the timer, so
the pre-vote starts at once) and check-quorum (a leader that lost its
majority steps down as a follower with no leader, and its next election goes
through the gate like any other). Two campaigns pass without a pre-vote:
after a ``timeout_now`` from the current leader (a leadership transfer,
thesis §3.10: the voters have heard from that leader, so a pre-vote would be
refused), and when this node's timer ran out and it hears a leader of a
*lower* term than its own (its higher term came from an election whose
messages were lost; only an election can reconcile the terms).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..interfaces import NodeState

__all__ = ["PRE_VOTE", "PRE_VOTE_RESPONSE", "ElectionGate", "GatedEngine"]

logger = logging.getLogger(__name__)

PRE_VOTE = "pre_vote"
"""Message type of a pre-vote request (never reaches the engine)."""
PRE_VOTE_RESPONSE = "pre_vote_response"
"""Message type of a pre-vote answer (never reaches the engine)."""

# The engine compares its deadline with the clock a moment after the gate
# does; treat a deadline this close as already passed.
_MARGIN = 0.01


class GatedEngine(Protocol):
    """What the gate reads and changes in the engine (see :class:`~.engine.Engine`)."""

    @property
    def node_id(self) -> str: ...

    @property
    def state(self) -> NodeState: ...

    @property
    def term(self) -> int: ...

    @property
    def leader_id(self) -> str | None: ...

    @property
    def last_log_index(self) -> int: ...

    @property
    def last_log_term(self) -> int: ...

    @property
    def election_deadline(self) -> float: ...

    @election_deadline.setter
    def election_deadline(self, value: float) -> None: ...

    def voters(self) -> list[str]:
        """The other voting members."""
        ...

    def forget_leader(self) -> None:
        """Drop the known leader, as the engine does when it starts an election."""
        ...

    def send(self, peer_id: str, message: dict[str, Any]) -> bool: ...


@dataclass
class _Round:
    seq: int
    term: int
    """The term the candidate would campaign in (its term plus one)."""
    started: float
    granted: set[str] = field(default_factory=set)


class ElectionGate:
    """Pre-vote and leader stickiness for one node. See the module docstring.

    Args:
        min_timeout: the minimum election timeout: how long a leader's
            contact keeps this node from granting pre-votes, and how long a
            granted pre-vote is promised.
        retry: how often a pre-vote round is repeated while the timer is out.
        patience: how long a leader of a lower term must keep sending before
            this node campaigns without a pre-vote (see :meth:`lower_term_leader`);
            longer than the stepdown timeout. Default: four minimum timeouts.
        clock: monotonic clock (injectable for tests).
    """

    def __init__(self, *, min_timeout: float, retry: float, patience: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._min_timeout = min_timeout
        self._retry = retry
        self._patience = 4 * min_timeout if patience is None else patience
        self._lower_leader: tuple[str, int, float] | None = None
        self._clock = clock
        self._contact: tuple[str, float] | None = None
        self._round: _Round | None = None
        self._seq = 0
        self._allowed_term: tuple[int, float] | None = None
        self._promise: tuple[str, float] | None = None
        self.holding = False
        """Whether the engine's timer ran out and the gate is holding it."""
        self.rounds_started = 0
        """Pre-vote rounds this node started."""
        self.rounds_won = 0
        """Rounds that let the engine campaign."""
        self.pre_votes_refused = 0
        """Pre-vote requests this node refused."""
        self.stale_term_campaigns = 0
        """Campaigns let through because a leader of a lower term was heard."""

    # -- events from the node ---------------------------------------------------

    def note_leader_contact(self, leader_id: str, *, grace: float = 0.0) -> None:
        """The current leader was just heard from (an ``append_entries`` it accepted).

        ``grace``: count the contact as that much later (engine issue E19:
        after a long apply, the leader is busy with the same entry for about
        as long, and its silence meanwhile is no sign of its death).
        """
        self._contact = (leader_id, self._clock() + grace)
        self._round = None
        self._promise = None
        self.holding = False

    def leader_link_lost(self, peer_id: str) -> None:
        """This node's link to ``peer_id`` went down: its contact no longer counts."""
        if self._contact is not None and self._contact[0] == peer_id:
            self._contact = None

    def leader_unreachable(self, engine: GatedEngine, peer_id: str) -> bool:
        """``fast_failover``: the leader's address refuses connections.

        Forget its contact and expire the engine's timer, so that the next
        pass starts a pre-vote at once. Returns whether it did.
        """
        if engine.leader_id != peer_id or engine.state is not NodeState.FOLLOWER:
            return False
        self._contact = None
        engine.election_deadline = 0.0
        return True

    def lower_term_leader(self, engine: GatedEngine, peer_id: str, term: int) -> None:
        """An ``append_entries`` of a term below ours arrived (the engine ignores it).

        Either a deposed leader that has not noticed yet (it steps down within
        the stepdown timeout, as nobody answers it), or a leader of a majority
        at a lower term than ours: we raised our term in an election whose
        messages were lost (a cut in the instant between pre-vote and vote).
        Its voters then refuse our pre-votes (they hear it) and the engine
        ignores its messages, so we would never rejoin. When such a leader is
        still sending after ``patience`` (longer than any stepdown) and our
        own timer has run out, let one campaign through: its higher term makes
        the cluster adopt ours, as plain Raft would.
        """
        now = self._clock()
        seen = self._lower_leader
        if seen is None or seen[0] != peer_id or seen[1] != term:
            self._lower_leader = (peer_id, term, now)
            return
        if (now - seen[2] >= self._patience and self.holding
                and engine.state is not NodeState.LEADER):
            self._lower_leader = None
            self._allowed_term = (engine.term, now + self._min_timeout)
            engine.election_deadline = 0.0
            self.stale_term_campaigns += 1
            logger.info("%s: %s leads at term %d below ours (%d): campaigning to rejoin",
                        engine.node_id, peer_id, term, engine.term)

    def allow_transfer(self, engine: GatedEngine, peer_id: str, term: int) -> None:
        """A ``timeout_now`` arrived: let the next campaign through if it came from our leader."""
        if peer_id == engine.leader_id and term >= engine.term:
            self._allowed_term = (engine.term, self._clock() + self._min_timeout)

    # -- before each engine tick --------------------------------------------------

    def before_tick(self, engine: GatedEngine) -> None:
        """Hold the engine's election timer unless a pre-vote was won."""
        now = self._clock()
        if engine.state is NodeState.LEADER or not engine.voters():
            self._round, self._allowed_term, self.holding = None, None, False
            return
        if self._allowed_term is not None:
            term, until = self._allowed_term
            if engine.term == term and now < until:
                return  # the engine campaigns at this tick
            self._allowed_term = None
        if engine.election_deadline > now + _MARGIN:
            return
        # The election timer ran out: no live leader was heard from.
        if not self.holding:
            self.holding = True
            if engine.leader_id is not None:
                engine.forget_leader()
        hold_until = now + self._retry
        promise = self._promise
        if promise is not None and promise[1] > now:
            hold_until = max(hold_until, promise[1])  # we promised someone else
        elif self._round is None or now - self._round.started >= self._retry - _MARGIN:
            self._start_round(engine, now)
        engine.election_deadline = hold_until

    def _start_round(self, engine: GatedEngine, now: float) -> None:
        self._seq += 1
        self._round = _Round(self._seq, engine.term + 1, now)
        self._promise = None
        self.rounds_started += 1
        request = {"type": PRE_VOTE, "term": engine.term + 1, "round": self._seq,
                   "last_log_index": engine.last_log_index,
                   "last_log_term": engine.last_log_term}
        for peer in engine.voters():
            engine.send(peer, dict(request))

    # -- messages --------------------------------------------------------------------

    def on_message(self, engine: GatedEngine, peer_id: str, message: Mapping[str, Any]) -> None:
        """Handle a ``pre_vote`` or ``pre_vote_response`` from ``peer_id``."""
        kind = message.get("type")
        if kind == PRE_VOTE:
            granted = self._consider(engine, peer_id, message)
            if not granted:
                self.pre_votes_refused += 1
            engine.send(peer_id, {"type": PRE_VOTE_RESPONSE, "round": message.get("round"),
                                  "term": message.get("term"), "granted": granted})
        elif kind == PRE_VOTE_RESPONSE:
            self._count(engine, peer_id, message)

    def _consider(self, engine: GatedEngine, peer_id: str, message: Mapping[str, Any]) -> bool:
        now = self._clock()
        last_term, last_index = message.get("last_log_term"), message.get("last_log_index")
        if not isinstance(last_term, int) or not isinstance(last_index, int):
            return False
        if engine.state is NodeState.LEADER:
            return False
        contact = self._contact
        if (contact is not None and contact[0] != peer_id and contact[0] == engine.leader_id
                and now - contact[1] < self._min_timeout):
            return False  # leader stickiness (thesis §4.2.3)
        theirs = (last_term, last_index)
        ours = (engine.last_log_term, engine.last_log_index)
        if theirs < ours:
            return False  # we would refuse the real vote too
        promise = self._promise
        if promise is not None and promise[0] != peer_id and promise[1] > now:
            return False
        own = self._round
        if own is not None and now - own.started < self._min_timeout:
            # Both of us are asking: only the better candidate goes ahead.
            if (*ours, engine.node_id) > (*theirs, peer_id):
                return False
            self._round = None
        self._promise = (peer_id, now + self._min_timeout)
        return True

    def _count(self, engine: GatedEngine, peer_id: str, message: Mapping[str, Any]) -> None:
        current = self._round
        if (current is None or message.get("round") != current.seq
                or message.get("granted") is not True):
            return
        if engine.state is NodeState.LEADER or engine.term + 1 != current.term:
            self._round = None
            return
        voters = engine.voters()
        if peer_id not in voters:
            return
        current.granted.add(peer_id)
        if len(current.granted) + 1 > (len(voters) + 1) / 2:
            self._round = None
            self.rounds_won += 1
            self._allowed_term = (engine.term, self._clock() + self._min_timeout)
            engine.election_deadline = 0.0
            logger.info("%s: pre-vote for term %d won (%s); campaigning", engine.node_id,
                        current.term, ", ".join(sorted(current.granted)))
