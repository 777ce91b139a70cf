"""New members join as learners first (in-process nodes over real TCP on loopback).

A learner receives the log and snapshots from the leader, counts for neither
commit nor elections and never campaigns; the leader promotes it to voter once
it has caught up, or removes it after ``learner_catchup_timeout`` and the add
fails with :class:`MemberNotCaughtUpError`. The real-process versions (a CLI
add under write load, the HTTP answers) are in ``tests/test_membership.py``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from streambus_consensus import (
    ConsensusError,
    MemberNotCaughtUpError,
    NodeConfig,
    NodeState,
    RaftNode,
    TcpTransport,
)
from streambus_consensus.kv import KeyValueStateMachine, kv_command
from streambus_consensus.provision import generate_secret
from streambus_consensus.raft.engine import LEARNER_PROMOTE, LEARNER_REMOVE, learner_verdict
from streambus_consensus.raft.snapshot import SnapshotHeader, pack_snapshot, unpack_snapshot
from streambus_consensus.testing.harness import free_ports, wait_until

SECRET = generate_secret()


class CuttableTransport(TcpTransport):
    """The real transport, with two switches a test flips: ``mute_acks`` drops
    this node's acknowledgements of the leader's appends (it still answers
    where its log differs, so the leader finds where to send from, but never
    sees progress), ``deaf`` drops every message that arrives."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mute_acks = False
        self.deaf = False

    def send(self, node_id: str, message: Mapping[str, Any], *, ahead: bool = False) -> bool:
        if self.mute_acks and message.get("type") == "next_node_idx" and message.get("success"):
            return True
        return super().send(node_id, message, ahead=ahead)

    def start(self, on_message: Callable[[str, Mapping[str, Any]], None],
              *args: Any, **kwargs: Any) -> None:
        def filtered(peer: str, message: Mapping[str, Any]) -> None:
            if not self.deaf:
                on_message(peer, message)

        super().start(filtered, *args, **kwargs)


def config(node_id: str, cluster: dict[str, str], tmp: Path, **changes: Any) -> NodeConfig:
    return NodeConfig(node_id=node_id, cluster=cluster, cluster_secret=SECRET,
                      data_dir=str(tmp / node_id), **changes)


def cuttable(cfg: NodeConfig) -> CuttableTransport:
    return CuttableTransport(cfg.node_id, cfg.cluster[cfg.node_id], cfg.cluster,
                             secret=SECRET, ping_interval=cfg.heartbeat_interval,
                             dead_timeout=cfg.election_timeout_max)


class Pair:
    """A one-voter cluster ``n1`` and a node ``n2`` to add to it, whose
    ``[cluster]`` lists n1 and itself, as docs/operations.md says."""

    def __init__(self, tmp: Path, **settings: Any) -> None:
        self.tmp = tmp
        ports = free_ports(2)
        self.addresses = {"n1": f"127.0.0.1:{ports[0]}", "n2": f"127.0.0.1:{ports[1]}"}
        self.settings = settings
        self.machines = {"n1": KeyValueStateMachine(), "n2": KeyValueStateMachine()}
        self.n1 = RaftNode(config("n1", {"n1": self.addresses["n1"]}, tmp, **settings),
                           self.machines["n1"])
        self.n2: RaftNode | None = None
        self.transport: CuttableTransport | None = None

    def start_n2(self, **switches: bool) -> RaftNode:
        cfg = config("n2", dict(self.addresses), self.tmp, **self.settings)
        self.machines["n2"] = KeyValueStateMachine()
        self.transport = cuttable(cfg)
        for name, value in switches.items():
            setattr(self.transport, name, value)
        self.n2 = RaftNode(cfg, self.machines["n2"], transport=self.transport)
        self.n2.start()
        return self.n2

    def stop(self) -> None:
        for node in (self.n1, self.n2):
            if node is not None:
                node.stop()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    made: list[Pair] = []

    def make(**settings: Any) -> Pair:
        p = Pair(tmp_path, **settings)
        made.append(p)
        p.n1.start()
        p.n1.wait_for_leader(10)
        return p

    yield make  # type: ignore[misc]
    for p in made:
        p.stop()


def write(node: RaftNode, count: int, prefix: str = "k") -> None:
    for i in range(count):
        node.propose(kv_command("set", f"{prefix}{i}", i), timeout=5)


# -- the snapshot header ------------------------------------------------------------


def test_a_snapshot_header_keeps_its_learners_and_is_unchanged_without_them() -> None:
    base = dict(last_entry=(b"b", 9, 2), prev_entry=(b"a", 8, 2),
                members=(("n1", "h:1"), ("n2", "h:2")))
    plain = pack_snapshot(SnapshotHeader(**base), b"state")  # type: ignore[arg-type]
    assert b"learners" not in plain  # what earlier releases wrote, byte for byte
    assert unpack_snapshot(plain, "p")[0].learners == ()
    with_learner = pack_snapshot(SnapshotHeader(**base, learners=(("n3", "h:3"),)),  # type: ignore[arg-type]
                                 b"state")
    header, state = unpack_snapshot(with_learner, "p")
    assert header.learners == (("n3", "h:3"),)
    assert header.members == (("n1", "h:1"), ("n2", "h:2")) and state == b"state"


# -- the leader's verdict (pure) -----------------------------------------------------


VERDICT_CONFIG = NodeConfig(node_id="n1", cluster={"n1": "127.0.0.1:7001"},
                            learner_catchup_timeout=10.0, learner_max_lag=100)


@pytest.mark.parametrize(("match", "commit", "waited", "silent_for", "expected"), [
    (900, 1000, 0.0, 0.1, LEARNER_PROMOTE),      # exactly learner_max_lag behind
    (1000, 1000, 9.0, 0.0, LEARNER_PROMOTE),
    (1200, 1000, 0.0, 0.1, LEARNER_PROMOTE),     # ahead: acknowledged uncommitted entries
    (899, 1000, 9.9, 0.1, None),                 # one too many behind, time left
    (0, 1000, 9.9, 0.1, None),                   # answered, nothing acknowledged yet
    (1000, 1000, 5.0, 0.9, None),                # caught up but silent past an election timeout
    (0, 0, 9.9, None, None),                     # never answered, time left
    (899, 1000, 10.0, 0.1, LEARNER_REMOVE),
    (0, 1000, 10.0, None, LEARNER_REMOVE),
    (1000, 1000, 12.0, 5.0, LEARNER_REMOVE),
])
def test_the_leader_promotes_a_caught_up_learner_and_removes_one_out_of_time(
        match: int, commit: int, waited: float, silent_for: float | None,
        expected: str | None) -> None:
    kind, reason = learner_verdict(VERDICT_CONFIG, match=match, commit=commit, waited=waited,
                                   silent_for=silent_for)
    assert kind == expected
    assert (reason is not None) == (kind == LEARNER_REMOVE)


@pytest.mark.parametrize(("match", "silent_for", "says"), [
    (0, None, "it never answered"),
    (0, 0.1, "it acknowledged no entry"),
    (1000, 5.0, "it has not answered for 5s"),
    (500, 0.1, "it had index 500, 500 entries behind the commit index 1000; learner_max_lag "
               "is 100"),
])
def test_a_removal_says_why(match: int, silent_for: float | None, says: str) -> None:
    _kind, reason = learner_verdict(VERDICT_CONFIG, match=match, commit=1000, waited=10.0,
                                    silent_for=silent_for)
    assert reason == f"it did not catch up as a learner within 10s ({says})"


# -- in-process clusters -------------------------------------------------------------


def test_a_learner_that_never_answers_is_refused_and_never_counted(
        pair: Callable[..., Pair]) -> None:
    """n1 is the only voter; n2 is added but never started. As a voter it would
    make every write wait for it (two of two); as a learner writes go on, and
    after learner_catchup_timeout the add is refused and n2 removed."""
    p = pair(learner_catchup_timeout=1.5)
    term = p.n1.term
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        adding = pool.submit(p.n1.add_member, "n2", p.addresses["n2"], check=False)
        wait_until(lambda: p.n1.learners() == {"n2": p.addresses["n2"]}, 5, "n2 to be a learner")
        assert p.n1.members() == {"n1": p.addresses["n1"]}
        status = p.n1.status()
        assert status.learners == ("n2",) and status.members == ("n1",)
        assert [(peer.node_id, peer.role) for peer in status.peers] == [("n2", "learner")]
        write(p.n1, 20)  # commits on n1 alone: the learner is not counted
        wait_until(lambda: p.n1.learner_count == 1, 3, "the learners gauge")
        with pytest.raises(MemberNotCaughtUpError, match="never answered") as caught:
            adding.result(15)
        took = time.monotonic() - started
    assert caught.value.member == "n2" and caught.value.code == "member_not_caught_up"
    assert not caught.value.retriable
    assert 1.5 <= took < 6, took
    assert p.n1.members() == {"n1": p.addresses["n1"]} and p.n1.learners() == {}
    assert p.n1.is_leader and p.n1.term == term
    write(p.n1, 5, "after")


def test_removing_a_learner_ends_its_add(pair: Callable[..., Pair]) -> None:
    p = pair(learner_catchup_timeout=30)
    with ThreadPoolExecutor(1) as pool:
        adding = pool.submit(p.n1.add_member, "n2", p.addresses["n2"], check=False)
        wait_until(lambda: p.n1.learners() == {"n2": p.addresses["n2"]}, 5, "n2 to be a learner")
        p.n1.remove_member("n2")
        with pytest.raises(MemberNotCaughtUpError, match="removed while still a learner"):
            adding.result(5)
    assert p.n1.learners() == {} and p.n1.members() == {"n1": p.addresses["n1"]}


def test_a_new_node_is_a_learner_until_it_catches_up_then_votes(
        pair: Callable[..., Pair]) -> None:
    """n2's answers to the leader are dropped at first: it receives the log
    (and learns that it is a learner) but the leader sees no progress, so it
    stays a learner and writes commit on n1 alone. Once its answers get
    through, the leader promotes it and the add returns."""
    p = pair(learner_catchup_timeout=30)
    write(p.n1, 50)
    n2 = p.start_n2(mute_acks=True)
    with ThreadPoolExecutor(1) as pool:
        adding = pool.submit(p.n1.add_member, "n2", p.addresses["n2"])
        wait_until(lambda: p.machines["n2"].get("k49") == 49, 10, "n2 to receive the log")
        assert n2.learners() == {"n2": p.addresses["n2"]}
        assert n2.members() == {"n1": p.addresses["n1"]}
        assert p.n1.learners() == {"n2": p.addresses["n2"]}
        write(p.n1, 10, "meanwhile")  # n1 alone still commits
        assert not adding.done()
        assert p.transport is not None
        p.transport.mute_acks = False
        adding.result(10)
    assert p.n1.members() == p.addresses and p.n1.learners() == {}
    wait_until(lambda: n2.members() == p.addresses and n2.learners() == {}, 5,
               "n2 to see itself as a voter")
    write(p.n1, 5, "both")  # now needs n2: two of two
    wait_until(lambda: p.machines["n2"].get("both4") == 4, 5, "n2 to apply")


def test_a_cut_off_learner_never_campaigns_and_a_restarted_one_stays_a_learner(
        pair: Callable[..., Pair]) -> None:
    """A learner that stops hearing the leader does not campaign (a voter would,
    within an election timeout); restarted from its data dir it knows it is
    a learner before anyone tells it again."""
    p = pair(learner_catchup_timeout=60)
    write(p.n1, 60)
    n2 = p.start_n2(mute_acks=True)
    with ThreadPoolExecutor(1) as pool:
        adding: Future[None] = pool.submit(p.n1.add_member, "n2", p.addresses["n2"])
        wait_until(lambda: p.machines["n2"].get("k59") == 59, 10, "n2 to receive the state")
        wait_until(lambda: n2.learners() == {"n2": p.addresses["n2"]}, 5, "n2 to know its role")
        assert p.transport is not None
        p.transport.deaf = True
        term = n2.term
        time.sleep(4 * p.n1.config.election_timeout_max)
        assert n2.term == term and n2.state is NodeState.FOLLOWER
        assert n2.gate.rounds_started == 0  # it asked nobody for a (pre-)vote
        assert p.n1.is_leader and p.n1.term == term

        n2.stop()
        restarted = p.start_n2(mute_acks=True)
        wait_until(lambda: restarted.learners() == {"n2": p.addresses["n2"]}, 5,
                   "the restarted n2 to know it is a learner")
        assert restarted.members() == {"n1": p.addresses["n1"]}
        time.sleep(2 * p.n1.config.election_timeout_max)
        assert restarted.state is NodeState.FOLLOWER and restarted.term == term
        assert restarted.gate.rounds_started == 0
        assert p.transport is not None
        p.transport.mute_acks = False
        adding.result(10)
    wait_until(lambda: restarted.members() == p.addresses, 5, "n2 to vote")


def test_the_learner_set_survives_a_restart_from_log_and_from_snapshot(
        tmp_path: Path) -> None:
    """The voters' side: n2 is a learner in n1's log, then in n1's snapshot;
    restarted, n1 still has it as a learner, and still not as a voter."""
    ports = free_ports(2)
    addresses = {"n1": f"127.0.0.1:{ports[0]}", "n2": f"127.0.0.1:{ports[1]}"}
    cfg = config("n1", {"n1": addresses["n1"]}, tmp_path, learner_catchup_timeout=60)
    node = RaftNode(cfg, KeyValueStateMachine())
    node.start()
    try:
        node.wait_for_leader(10)
        thread = threading.Thread(target=_add_quietly, args=(node, "n2", addresses["n2"]),
                                  daemon=True)
        thread.start()
        wait_until(lambda: node.learners() == {"n2": addresses["n2"]}, 5, "n2 to be a learner")
        write(node, 5)
    finally:
        node.stop()
    for compact in (False, True):
        node = RaftNode(cfg, KeyValueStateMachine())
        node.start()
        try:
            node.wait_for_leader(10)
            wait_until(lambda n=node: n.learners() == {"n2": addresses["n2"]}, 5,
                       "the learner to come back")
            assert node.members() == {"n1": addresses["n1"]}
            write(node, 3, f"again{compact}")
            if not compact:
                node.snapshot_now()
                wait_until(lambda n=node: n.status().log_entries <= 3, 5, "a snapshot")
        finally:
            node.stop()


def _add_quietly(node: RaftNode, node_id: str, address: str) -> None:
    with contextlib.suppress(ConsensusError):  # the node stops under it
        node.add_member(node_id, address, check=False)


def test_a_new_node_whose_config_lists_a_learner_as_a_member_takes_the_log_s_word(
        tmp_path: Path) -> None:
    """n2 is a learner (never started) when n3 joins with a [cluster] of n1,
    n2 and itself, as the docs say to write it from ``members list``. n3 must
    take n2 for the learner its log says it is, not the voter its config
    file says: else n3 counts n2 as a voter, and keeps it one after the
    leader removes it."""
    ports = free_ports(3)
    addresses = {f"n{i + 1}": f"127.0.0.1:{port}" for i, port in enumerate(ports)}
    n1 = RaftNode(config("n1", {"n1": addresses["n1"]}, tmp_path, learner_catchup_timeout=3.0),
                  KeyValueStateMachine())
    n3 = RaftNode(config("n3", dict(addresses), tmp_path), KeyValueStateMachine())
    with ThreadPoolExecutor(1) as pool:
        try:
            n1.start()
            n1.wait_for_leader(10)
            refused = pool.submit(n1.add_member, "n2", addresses["n2"], check=False)
            wait_until(lambda: n1.learners() == {"n2": addresses["n2"]}, 5, "n2 to be a learner")
            n3.start()
            n1.add_member("n3", addresses["n3"])
            wait_until(lambda: n3.members() == {"n1": addresses["n1"], "n3": addresses["n3"]},
                       5, "n3 to count n1 and itself as the voters")
            assert n3.learners() == {"n2": addresses["n2"]}
            with pytest.raises(MemberNotCaughtUpError):
                refused.result(10)
            wait_until(lambda: n3.learners() == {}, 5, "n3 to drop the removed learner")
            assert n3.members() == n1.members() == {"n1": addresses["n1"],
                                                    "n3": addresses["n3"]}
        finally:
            n3.stop()
            n1.stop()
