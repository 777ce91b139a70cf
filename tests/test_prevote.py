"""Unit tests of the election gate (pre-vote and leader stickiness, engine issue E15).

The gate reads an engine's role, term, leader, log tail and election deadline
and sends through it; a small fake with those stands in for PySyncObj, and a
tiny in-memory network carries messages between fakes. The end-to-end
behaviour (one term per failover, none on rejoin) is shown on real
processes in tests/test_failover.py and measured by bench/failover.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streambus_consensus.interfaces import NodeState
from streambus_consensus.raft.prevote import PRE_VOTE, PRE_VOTE_RESPONSE, ElectionGate

MIN_TIMEOUT = 0.4
RETRY = 0.1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeEngine:
    node_id: str
    peers: list[str]
    state: NodeState = NodeState.FOLLOWER
    term: int = 2
    leader_id: str | None = "n1"
    last_log_index: int = 10
    last_log_term: int = 2
    election_deadline: float = 1e9
    outbox: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    leader_forgotten: int = 0

    def voters(self) -> list[str]:
        return list(self.peers)

    def forget_leader(self) -> None:
        self.leader_id = None
        self.leader_forgotten += 1

    def send(self, peer_id: str, message: dict[str, Any]) -> bool:
        self.outbox.append((peer_id, message))
        return True


class Net:
    """Nodes with a gate each; ``deliver`` moves every queued message once."""

    def __init__(self, ids: list[str], clock: Clock) -> None:
        self.clock = clock
        self.engines = {i: FakeEngine(i, [p for p in ids if p != i]) for i in ids}
        self.gates = {i: ElectionGate(min_timeout=MIN_TIMEOUT, retry=RETRY, clock=clock)
                      for i in ids}
        self.cut: set[str] = set()

    def deliver(self) -> int:
        moved = 0
        for sender, engine in self.engines.items():
            outbox, engine.outbox = engine.outbox, []
            for target, message in outbox:
                if sender in self.cut or target in self.cut:
                    continue
                self.gates[target].on_message(self.engines[target], sender, message)
                moved += 1
        return moved

    def settle(self) -> None:
        while self.deliver():
            pass

    def tick_all(self) -> None:
        for node_id, gate in self.gates.items():
            gate.before_tick(self.engines[node_id])


def test_an_expired_timer_is_held_until_a_majority_grants() -> None:
    """Thesis §9.6: a candidate first asks whether it would win, without raising its term."""
    clock = Clock()
    net = Net(["n1", "n2", "n3"], clock)
    n2 = net.engines["n2"]
    n2.election_deadline = clock.now - 0.01  # n2's timer ran out; n1 is silent
    net.cut.add("n1")
    net.gates["n2"].before_tick(n2)
    assert n2.election_deadline > clock.now, "held: the engine must not campaign yet"
    assert n2.term == 2 and n2.leader_forgotten == 1
    requests = [m for _, m in n2.outbox]
    assert {m["type"] for m in requests} == {PRE_VOTE} and requests[0]["term"] == 3
    clock.now += MIN_TIMEOUT  # n3 has not heard from n1 for the minimum timeout either
    net.settle()
    assert n2.election_deadline == 0.0, "a majority granted: the engine campaigns now"
    net.gates["n2"].before_tick(n2)
    assert n2.election_deadline == 0.0, "the gate lets the granted campaign through"
    assert net.gates["n2"].rounds_won == 1


def test_a_voter_that_hears_its_leader_refuses() -> None:
    """Thesis §4.2.3: a server that heard from a leader within the minimum
    election timeout does not grant its vote (here: its pre-vote)."""
    clock = Clock()
    net = Net(["n1", "n2", "n3"], clock)
    net.gates["n3"].note_leader_contact("n1")
    n2 = net.engines["n2"]
    n2.election_deadline = clock.now - 0.01
    net.cut.add("n1")
    net.gates["n2"].before_tick(n2)
    net.settle()
    assert n2.election_deadline > clock.now
    assert net.gates["n3"].pre_votes_refused == 1
    # Retried every RETRY while the timer stays out, never campaigning.
    for _ in range(3):
        clock.now += RETRY
        net.gates["n3"].note_leader_contact("n1")
        net.gates["n2"].before_tick(n2)
        net.settle()
        assert n2.election_deadline > clock.now and n2.term == 2
    assert net.gates["n2"].rounds_started == 4 and net.gates["n2"].rounds_won == 0


def test_the_leader_refuses_and_a_link_loss_ends_stickiness() -> None:
    clock = Clock()
    net = Net(["n1", "n2", "n3"], clock)
    net.engines["n1"].state = NodeState.LEADER
    gate3, n3 = net.gates["n3"], net.engines["n3"]
    gate3.note_leader_contact("n1")
    ask = {"type": PRE_VOTE, "term": 3, "round": 1, "last_log_index": 10, "last_log_term": 2}
    net.gates["n1"].on_message(net.engines["n1"], "n2", ask)
    assert net.engines["n1"].outbox[-1][1]["granted"] is False
    gate3.on_message(n3, "n2", ask)
    assert n3.outbox[-1][1]["granted"] is False
    gate3.leader_link_lost("n1")  # our connection to n1 closed: its contact no longer counts
    gate3.on_message(n3, "n2", ask)
    assert n3.outbox[-1][1]["granted"] is True


def test_a_shorter_log_is_refused() -> None:
    clock = Clock()
    net = Net(["n1", "n2", "n3"], clock)
    n3 = net.engines["n3"]
    behind = {"type": PRE_VOTE, "term": 3, "round": 1, "last_log_index": 9, "last_log_term": 2}
    net.gates["n3"].on_message(n3, "n2", behind)
    assert n3.outbox[-1][1] == {"type": PRE_VOTE_RESPONSE, "round": 1, "term": 3,
                                "granted": False}
    older_term = dict(behind, last_log_index=50, last_log_term=1)
    net.gates["n3"].on_message(n3, "n2", older_term)
    assert n3.outbox[-1][1]["granted"] is False


def test_two_survivors_of_a_dead_leader_produce_one_candidate() -> None:
    """Both followers see the leader's address refuse at once (fast_failover):
    exactly one of them may campaign, so the failover costs one term."""
    for better in ("n2", "n3"):
        clock = Clock()
        net = Net(["n1", "n2", "n3"], clock)
        net.cut.add("n1")
        net.engines[better].last_log_index = 11  # the longer log must win
        for node in ("n2", "n3"):
            net.gates[node].note_leader_contact("n1")
            assert net.gates[node].leader_unreachable(net.engines[node], "n1")
        net.tick_all()  # both start a round before either hears the other
        net.settle()
        campaigning = [n for n in ("n2", "n3") if net.engines[n].election_deadline == 0.0]
        assert campaigning == [better]


def test_equal_logs_are_ordered_by_node_id() -> None:
    clock = Clock()
    net = Net(["n1", "n2", "n3"], clock)
    net.cut.add("n1")
    for node in ("n2", "n3"):
        net.engines[node].election_deadline = clock.now - 0.01
    net.tick_all()
    net.settle()
    assert [n for n in ("n2", "n3") if net.engines[n].election_deadline == 0.0] == ["n3"]


def test_a_granted_pre_vote_is_a_promise() -> None:
    """A voter that granted one candidate refuses another for the minimum
    election timeout and holds its own timer meanwhile."""
    clock = Clock()
    net = Net(["n1", "n2", "n3", "n4", "n5"], clock)
    gate5, n5 = net.gates["n5"], net.engines["n5"]
    ask = {"type": PRE_VOTE, "term": 3, "round": 1, "last_log_index": 10, "last_log_term": 2}
    gate5.on_message(n5, "n2", ask)
    gate5.on_message(n5, "n3", ask)
    assert [m["granted"] for _, m in n5.outbox] == [True, False]
    n5.outbox.clear()
    n5.election_deadline = clock.now - 0.01
    gate5.before_tick(n5)
    assert n5.outbox == [] and n5.election_deadline >= clock.now + MIN_TIMEOUT - 1e-9
    clock.now += MIN_TIMEOUT + 0.01
    gate5.on_message(n5, "n3", ask)
    assert n5.outbox[-1][1]["granted"] is True


def test_a_leader_heard_mid_round_cancels_it() -> None:
    clock = Clock()
    net = Net(["n1", "n2", "n3"], clock)
    n2, gate2 = net.engines["n2"], net.gates["n2"]
    net.gates["n3"].leader_link_lost("n1")
    n2.election_deadline = clock.now - 0.01
    gate2.before_tick(n2)
    gate2.note_leader_contact("n1")  # a heartbeat arrives before the answers
    n2.election_deadline = clock.now + 0.5  # the engine restarted its timer
    net.settle()
    assert n2.election_deadline == clock.now + 0.5 and gate2.rounds_won == 0


def test_a_transfer_from_the_leader_passes_without_a_pre_vote() -> None:
    """Thesis §3.10: TimeoutNow makes the target campaign at once; voters that
    heard from the leader would refuse a pre-vote, so none is asked."""
    clock = Clock()
    net = Net(["n1", "n2", "n3"], clock)
    n2, gate2 = net.engines["n2"], net.gates["n2"]
    gate2.allow_transfer(n2, "n3", 2)  # not our leader: ignored
    n2.election_deadline = 0.0
    gate2.before_tick(n2)
    assert n2.election_deadline > clock.now
    n2.leader_id = "n1"  # n1's heartbeats resume; then it hands over
    gate2.note_leader_contact("n1")
    gate2.allow_transfer(n2, "n1", 2)
    n2.election_deadline = 0.0
    gate2.before_tick(n2)
    assert n2.election_deadline == 0.0


def test_fast_failover_only_for_our_leader() -> None:
    clock = Clock()
    net = Net(["n1", "n2", "n3"], clock)
    n2 = net.engines["n2"]
    assert not net.gates["n2"].leader_unreachable(n2, "n3")
    assert n2.election_deadline == 1e9
    n2.state = NodeState.CANDIDATE
    assert not net.gates["n2"].leader_unreachable(n2, "n1")


def test_an_isolated_node_never_raises_its_term() -> None:
    """Cut off for many election timeouts, a node keeps asking and never
    campaigns; healed, it follows the leader it hears without an election."""
    clock = Clock()
    net = Net(["n1", "n2", "n3"], clock)
    net.engines["n1"].state = NodeState.LEADER
    net.cut.add("n3")
    n3, gate3 = net.engines["n3"], net.gates["n3"]
    for gate in ("n1", "n2"):
        net.gates[gate].note_leader_contact("n1")
    n3.election_deadline = clock.now
    for _ in range(50):  # 5 s of isolation
        clock.now += RETRY
        net.gates["n2"].note_leader_contact("n1")
        gate3.before_tick(n3)
        net.settle()
        assert n3.election_deadline > clock.now and n3.term == 2
    net.cut.clear()
    clock.now += RETRY
    gate3.before_tick(n3)
    net.settle()
    assert n3.election_deadline > clock.now, "n1 leads and n2 hears it: refused"
    gate3.note_leader_contact("n1")
    assert not gate3.holding


def test_a_node_whose_term_ran_ahead_campaigns_to_rejoin() -> None:
    """Its term rose in an election whose votes were lost; the leader leads at
    a lower term, its voters refuse pre-votes and the engine ignores the
    leader. Only an election reconciles the terms; but a deposed leader that
    has not yet stepped down must not trigger one."""
    clock = Clock()
    net = Net(["n1", "n2", "n3"], clock)
    n3 = net.engines["n3"]
    gate3 = ElectionGate(min_timeout=MIN_TIMEOUT, retry=RETRY, patience=1.6, clock=clock)
    n3.term = 5
    n3.election_deadline = clock.now - 0.01
    gate3.before_tick(n3)
    assert gate3.holding
    for _ in range(15):  # a deposed leader's 1.5 s before its stepdown
        gate3.lower_term_leader(n3, "n1", 4)
        clock.now += 0.1
        gate3.before_tick(n3)
        assert n3.election_deadline > clock.now
    gate3.lower_term_leader(n3, "n2", 4)  # another one starts the count again
    for _ in range(17):  # a leader that keeps leading, past the patience
        clock.now += 0.1
        gate3.lower_term_leader(n3, "n2", 4)
    assert n3.election_deadline == 0.0 and gate3.stale_term_campaigns == 1
    gate3.before_tick(n3)
    assert n3.election_deadline == 0.0, "let through without a pre-vote"
