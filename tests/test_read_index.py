"""ReadIndex reads (Ongaro's thesis, §6.4): RaftNode in-process over real TCP,
and real node processes for the partitioned-leader case."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from streambus_consensus import (
    ConsensusError,
    NodeConfig,
    NodeState,
    NodeStoppedError,
    NoLeaderError,
    NotLeaderError,
    ProposalTimeoutError,
    RaftNode,
)
from streambus_consensus.kv import KeyValueStateMachine, kv_command
from streambus_consensus.provision import generate_secret
from streambus_consensus.raft.readindex import ReadIndex
from streambus_consensus.testing.harness import LocalCluster, free_ports, wait_until

SECRET = generate_secret()
LINEARIZABLE = "/v1/kv/k?linearizable=1"


def config(node_id: str, cluster: dict[str, str], tmp: Path, **changes: Any) -> NodeConfig:
    return NodeConfig(node_id=node_id, cluster=cluster, cluster_secret=SECRET,
                      data_dir=str(tmp / node_id), **changes)


def _in_process_trio(tmp_path: Path) -> tuple[dict[str, RaftNode],
                                               dict[str, KeyValueStateMachine]]:
    """Three unstarted nodes on free loopback ports, each with its own kv machine."""
    ports = free_ports(3)
    cluster = {f"n{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(ports)}
    machines = {n: KeyValueStateMachine() for n in cluster}
    return {n: RaftNode(config(n, cluster, tmp_path), machines[n]) for n in cluster}, machines


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[tuple[dict[str, RaftNode], dict[str, KeyValueStateMachine]]]:
    nodes, machines = _in_process_trio(tmp_path)
    try:
        for n in nodes.values():
            n.start()
        nodes["n1"].wait_for_leader(10)
        yield nodes, machines
    finally:
        for n in nodes.values():
            n.stop()


def test_a_single_voter_reads_at_its_commit_index(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    node = RaftNode(config("n1", {"n1": f"127.0.0.1:{port}"}, tmp_path), KeyValueStateMachine())
    with node:
        node.wait_for_leader(10)
        node.propose(kv_command("set", "a", 1))
        index = node.read_index(timeout=5)
        assert index >= 2 and node.applied_index >= index


def test_reads_on_leader_and_followers_see_every_completed_write(trio: Any) -> None:
    nodes, machines = trio
    leader_id = nodes["n1"].wait_for_leader(10)
    leader = nodes[leader_id]
    for i in range(20):
        leader.propose(kv_command("set", "k", i), timeout=5)
        for node_id, node in nodes.items():
            node.read_index(timeout=5)
            # "Read your writes" from any node, without a log entry per read.
            assert machines[node_id].get("k") == i, node_id


def test_reads_write_no_log_entries_and_are_batched(trio: Any) -> None:
    nodes, _ = trio
    leader = nodes[nodes["n1"].wait_for_leader(10)]
    leader.propose(kv_command("set", "k", 0), timeout=5)
    follower = next(n for n in nodes.values() if n is not leader)
    # Both learn that the other runs ReadIndex; until then each round or ask
    # also committed a barrier (in case the peers ran a release without it).
    base = leader.status().last_log_index
    leader.read_index(timeout=5)
    follower.read_index(timeout=5)
    barriers = leader.reads.barrier_rounds + follower.reads.barrier_rounds
    wait_until(lambda: leader.commit_index == base + barriers
               and all(n.applied_index == leader.commit_index for n in nodes.values()), 5,
               "the barriers to be applied everywhere")
    last = leader.commit_index
    rounds = leader.reads.rounds
    futures: list[Future[int]] = []
    for _ in range(200):
        futures.append(leader.read_index_async(timeout=5))
        futures.append(follower.read_index_async(timeout=5))
    for f in futures:
        assert f.result(5) <= last
    assert leader.commit_index == last  # no entry was written for any read
    # One confirmation round serves every read waiting when it starts.
    assert leader.reads.rounds - rounds < len(futures) / 4


def test_a_node_without_a_quorum_fails_reads_rather_than_serving_them(tmp_path: Path) -> None:
    ports = free_ports(3)
    cluster = {f"n{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(ports)}
    alone = RaftNode(config("n1", cluster, tmp_path), KeyValueStateMachine())
    with alone:
        with pytest.raises(ProposalTimeoutError) as caught:
            alone.read_index(timeout=0.5)
        assert caught.value.retriable
        with pytest.raises(NoLeaderError):
            alone.read_index_async(timeout=0.3).result(5)


def test_reads_waiting_when_the_node_stops_fail_with_node_stopped(tmp_path: Path) -> None:
    ports = free_ports(3)
    cluster = {f"n{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(ports)}
    alone = RaftNode(config("n1", cluster, tmp_path), KeyValueStateMachine())
    alone.start()
    future = alone.read_index_async(timeout=30)
    alone.stop()
    with pytest.raises(NodeStoppedError):
        future.result(5)


def test_a_partitioned_old_leader_never_serves_a_stale_linearizable_read(
        tmp_path: Path) -> None:
    """Thesis §6.4: "the leader must check whether it has been deposed before
    processing a read-only request". The old leader is cut off but keeps
    believing it leads (a long stepdown timeout) while a new leader commits
    a write; a linearizable read on the old leader must fail, never answer
    the old value."""
    settings = {"election_timeout_min": 1.0, "election_timeout_max": 2.0,
                "leader_stepdown_timeout": 4.0, "proposal_timeout": 1.5}
    with LocalCluster(3, tmp_path, proxied=True, settings=settings) as cluster:
        cluster.start()
        old = cluster.wait_for_leader()
        cluster.client(old).request("PUT", "/v1/kv/k", {"value": "old"})
        assert cluster.client(old).request("GET", LINEARIZABLE)["value"] == "old"
        assert cluster.network is not None
        cut_at = time.monotonic()
        cluster.network.isolate(old)
        new = wait_until(lambda: _leader_among(cluster, old), 15, "a leader among the others")
        others = cluster.client(*[n for n in cluster.nodes if n != old])
        others.request("PUT", "/v1/kv/k", {"value": "new"})
        still_leads = (cluster.status(old) or {}).get("state") == "leader"
        with pytest.raises(ConsensusError) as caught:
            cluster.client(old, timeout=10).request("GET", LINEARIZABLE)
        assert caught.value.retriable, caught.value
        # The local (stale-allowed) read shows the old value is still there:
        # only the confirmation kept it from being served as linearizable.
        assert cluster.client(old).request("GET", "/v1/kv/k")["value"] == "old"
        assert still_leads, (f"{old} stepped down {time.monotonic() - cut_at:.1f}s after the "
                             "cut, before the read: the test proved nothing")
        cluster.network.heal()
        wait_until(lambda: _linearizable_value(cluster, old) == "new", 20,
                   f"{old} to serve the new value once healed (leader {new})")


def _leader_among(cluster: LocalCluster, old: str) -> str | None:
    # cluster.leader() wants one node in the leader state; the old one still is.
    others = [cluster.status(n) for n in cluster.nodes if n != old]
    leaders = {s["node_id"] for s in others if s and s["state"] == "leader"}
    return leaders.pop() if len(leaders) == 1 else None


def _linearizable_value(cluster: LocalCluster, node_id: str) -> Any:
    try:
        return cluster.client(node_id, timeout=3).request("GET", LINEARIZABLE)["value"]
    except (ConsensusError, OSError):
        return None


def test_concurrent_readers_and_a_writer_on_real_threads(trio: Any) -> None:
    nodes, machines = trio
    leader = nodes[nodes["n1"].wait_for_leader(10)]
    stop = threading.Event()
    errors: list[str] = []
    written: list[int] = [0]

    def reader(node_id: str) -> None:
        node = nodes[node_id]
        while not stop.is_set():
            floor = written[0]
            node.read_index(timeout=5)
            seen = machines[node_id].get("n") or 0
            if seen < floor:
                errors.append(f"{node_id} read {seen} after {floor} completed")

    threads = [threading.Thread(target=reader, args=(n,)) for n in nodes for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(1, 60):
            leader.propose(kv_command("set", "n", i), timeout=5)
            written[0] = i
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors[:5]


def test_reads_keep_working_beside_peers_that_ignore_read_index(tmp_path: Path) -> None:
    """A rolling upgrade: the two other voters run a release without ReadIndex,
    which ignores its messages (they arrive as unknown application
    messages). Rounds and asks then fall back to committing a barrier."""
    nodes, machines = _in_process_trio(tmp_path)
    try:
        for n in nodes.values():
            n.start()
        for old in ("n2", "n3"):
            engine = nodes[old]._engine
            assert engine is not None
            engine._pso_transport.reads = None  # as a release without ReadIndex: ignored
        new = nodes["n1"]
        leader = nodes[new.wait_for_leader(10)]
        for i in range(5):
            leader.propose(kv_command("set", "k", i), timeout=5)
            new.read_index(timeout=5)
            assert machines["n1"].get("k") == i
        assert new.reads.barrier_rounds >= 5  # every round or ask needed its barrier
    finally:
        for n in nodes.values():
            n.stop()


# -- the ReadIndex rules on a fake engine (no threads, no network) ----------------------


class FakeEngine:
    """The engine as ReadIndex sees it: fields to set, messages and proposals recorded."""

    def __init__(self, node_id: str = "n1", voters: tuple[str, ...] = ("n2", "n3")) -> None:
        self.node_id = node_id
        self.state = NodeState.LEADER
        self.term = 3
        self.leader_id: str | None = node_id
        self.commit_index = 10
        self.applied_index = 10
        self.committed_in_term = True
        self.last_log_index = 10
        self.last_log_term = 3
        self.election_deadline = 0.0
        self._voters = list(voters)
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.proposed: list[Any] = []

    def voters(self) -> list[str]:
        return list(self._voters)

    def forget_leader(self) -> None:
        self.leader_id = None

    def send(self, peer_id: str, message: dict[str, Any]) -> bool:
        self.sent.append((peer_id, message))
        return True

    def propose(self, command: bytes, callback: Any) -> None:
        self.proposed.append(callback)

    def pings(self) -> list[tuple[str, dict[str, Any]]]:
        out = [(p, m) for p, m in self.sent if m["type"] == "app:read_index.ping"]
        self.sent.clear()
        return out


def _reads(clock: list[float]) -> tuple[ReadIndex, list[tuple[Future[int], Any]]]:
    settled: list[tuple[Future[int], Any]] = []
    reads = ReadIndex(node_id="n1", barrier=b"\x01", settle=settled.extend, retry=0.4,
                      clock=lambda: clock[0])
    return reads, settled


def _pong(reads: ReadIndex, engine: FakeEngine, peer: str, ping: dict[str, Any],
          ok: bool = True) -> None:
    reads.on_message(engine, peer, {"type": "app:read_index.pong", "term": ping["term"],
                                    "round": ping["round"], "ok": ok})


def test_a_read_arriving_during_a_round_waits_for_the_next_round() -> None:
    clock = [100.0]
    reads, settled = _reads(clock)
    engine = FakeEngine()
    reads._capable.update({"n2", "n3"})  # peers known to answer: no barrier
    first: Future[int] = Future()
    reads.submit(first, 110.0)
    reads.pump(engine)
    round_one = engine.pings()
    assert [p for p, _ in round_one] == ["n2", "n3"] and not engine.proposed
    second: Future[int] = Future()
    reads.submit(second, 110.0)
    engine.commit_index = engine.applied_index = 12  # a write committed meanwhile
    reads.pump(engine)
    assert engine.pings() == []  # one round at a time
    _pong(reads, engine, "n2", round_one[0][1])
    # The first read is served at the index recorded when its round began; the
    # second could have followed a write acknowledged after that round's pings
    # left, so it needs a round of its own.
    assert settled == [(first, 10)]
    round_two = engine.pings()
    assert [m["round"] for _, m in round_two] == [round_one[0][1]["round"] + 1] * 2
    _pong(reads, engine, "n2", round_one[1][1])  # a late answer to the old round
    assert len(settled) == 1
    _pong(reads, engine, "n3", round_two[1][1])
    assert settled[1] == (second, 12)


def test_a_voter_in_a_later_term_fails_the_round_retriably() -> None:
    clock = [100.0]
    reads, settled = _reads(clock)
    engine = FakeEngine()
    read: Future[int] = Future()
    reads.submit(read, 110.0)
    reads.pump(engine)
    ping = engine.pings()[0][1]
    _pong(reads, engine, "n2", ping, ok=False)
    [(future, error)] = settled
    assert future is read and isinstance(error, NotLeaderError) and error.retriable


def test_losing_leadership_mid_round_fails_its_reads() -> None:
    clock = [100.0]
    reads, settled = _reads(clock)
    engine = FakeEngine()
    read: Future[int] = Future()
    reads.submit(read, 110.0)
    reads.pump(engine)
    engine.state, engine.leader_id, engine.term = NodeState.FOLLOWER, "n2", 4
    reads.pump(engine)
    [(future, error)] = settled
    assert future is read and isinstance(error, NotLeaderError) and error.leader_hint == "n2"


def test_a_new_leader_waits_for_an_entry_of_its_term_before_a_round() -> None:
    clock = [100.0]
    reads, _ = _reads(clock)
    engine = FakeEngine()
    engine.committed_in_term = False
    reads.submit(Future(), 110.0)
    reads.pump(engine)
    assert engine.pings() == []
    engine.committed_in_term = True
    reads.pump(engine)
    assert len(engine.pings()) == 2


def test_a_voter_acknowledges_only_a_leader_of_its_term_or_later() -> None:
    clock = [100.0]
    reads, _ = _reads(clock)
    voter = FakeEngine(node_id="n2")
    voter.state, voter.leader_id = NodeState.FOLLOWER, "n1"
    for term, ok in ((2, False), (3, True), (4, True)):
        reads.on_message(voter, "n1", {"type": "app:read_index.ping", "term": term, "round": 1})
        assert voter.sent.pop()[1]["ok"] is ok


def test_a_read_past_its_deadline_fails_and_a_cancelled_one_is_dropped() -> None:
    clock = [100.0]
    reads, settled = _reads(clock)
    engine = FakeEngine()
    engine.state, engine.leader_id = NodeState.FOLLOWER, None  # no leader known
    late: Future[int] = Future()
    gone: Future[int] = Future()
    reads.submit(late, 101.0)
    reads.submit(gone, 101.0)
    gone.cancel()
    clock[0] = 102.0
    reads.pump(engine)
    [error] = [e for f, e in settled if f is late]
    assert isinstance(error, NoLeaderError)
    assert reads.waiting == 0
