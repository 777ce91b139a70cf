"""RaftNode in-process: lifecycle, proposals, errors and status (real TCP on loopback)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from streambus_consensus import (
    CommandRefusedError,
    CommandTooLargeError,
    ConfigError,
    NodeConfig,
    NodeState,
    NodeStoppedError,
    NoLeaderError,
    ProposalTimeoutError,
    RaftNode,
)
from streambus_consensus.kv import KeyValueStateMachine, kv_command
from streambus_consensus.provision import generate_secret
from streambus_consensus.testing.harness import free_ports, wait_until

SECRET = generate_secret()


def test_node_state_names_are_readable() -> None:
    assert [str(s) for s in NodeState] == ["follower", "candidate", "leader", "stopped"]
    assert f"{NodeState.LEADER}" == "leader"


def config(node_id: str, cluster: dict[str, str], tmp: Path | None = None,
           **changes: Any) -> NodeConfig:
    return NodeConfig(node_id=node_id, cluster=cluster, cluster_secret=SECRET,
                      data_dir=str(tmp / node_id) if tmp else None, **changes)


def single(tmp_path: Path, **changes: Any) -> RaftNode:
    (port,) = free_ports(1)
    return RaftNode(config("n1", {"n1": f"127.0.0.1:{port}"}, tmp_path, **changes),
                    KeyValueStateMachine())


@pytest.fixture
def node(tmp_path: Path) -> Iterator[RaftNode]:
    n = single(tmp_path)
    n.start()
    try:
        yield n
    finally:
        n.stop()


def test_invalid_config_is_refused_before_anything_starts() -> None:
    bad = NodeConfig(node_id="n1", cluster={"n1": "127.0.0.1:7001"}, election_timeout_min=0.1,
                     cluster_secret=SECRET)
    with pytest.raises(ConfigError, match="election_timeout_min"):
        RaftNode(bad, KeyValueStateMachine())


def test_valid_config_builds_a_stopped_node(tmp_path: Path) -> None:
    n = single(tmp_path)
    assert n.state is NodeState.STOPPED
    assert n.leader_id is None and n.term == 0 and n.commit_index == 0
    with pytest.raises(NodeStoppedError):
        n.propose(kv_command("set", "a", 1))


def test_single_node_elects_itself_and_applies(node: RaftNode) -> None:
    assert node.wait_for_leader(5) == "n1"
    assert node.is_leader and node.state is NodeState.LEADER
    assert node.propose(kv_command("set", "a", 1), timeout=5) is None
    assert node.propose(kv_command("set", "a", 2), timeout=5) == 1
    assert node.applied_index >= 2 and node.commit_index >= node.applied_index - 1


def test_propose_async_returns_a_future_resolved_off_the_raft_thread(node: RaftNode) -> None:
    node.wait_for_leader(5)
    seen: dict[str, Any] = {}
    future: Future[Any] = node.propose_async(kv_command("incr", "n"))
    future.add_done_callback(lambda f: seen.update(thread=threading.current_thread().name))
    assert future.result(5) == 1
    wait_until(lambda: "thread" in seen, 5, "the done callback")
    assert seen["thread"] != "raft-n1", "user callbacks must never run on the Raft thread"


def test_barrier_waits_for_everything_before_it(node: RaftNode) -> None:
    node.wait_for_leader(5)
    futures = [node.propose_async(kv_command("incr", "c")) for _ in range(50)]
    index = node.barrier(timeout=5)
    assert all(f.done() for f in futures)
    assert index >= 51
    assert node.propose(kv_command("get", "c"), timeout=5) == 50


def test_status_describes_the_node(node: RaftNode) -> None:
    node.wait_for_leader(5)
    status = node.status()
    assert status.node_id == "n1" and status.state is NodeState.LEADER
    assert status.leader_id == "n1" and status.members == ("n1",) and status.peers == ()
    assert status.has_quorum


def test_stop_is_idempotent_and_fails_later_calls(tmp_path: Path) -> None:
    n = single(tmp_path)
    n.start()
    n.wait_for_leader(5)
    n.stop()
    n.stop()
    assert n.state is NodeState.STOPPED
    with pytest.raises(NodeStoppedError):
        n.propose(kv_command("set", "a", 1))
    with pytest.raises(NodeStoppedError):
        n.start()


def test_state_survives_a_restart_from_disk(tmp_path: Path) -> None:
    n = single(tmp_path)
    n.start()
    n.wait_for_leader(5)
    for i in range(30):
        n.propose(kv_command("set", f"k{i}", i), timeout=5)
    cfg = n.config
    n.stop()
    sm = KeyValueStateMachine()
    again = RaftNode(cfg, sm)
    again.start()
    try:
        again.wait_for_leader(5)
        again.barrier(timeout=5)
        assert sm.items() == {f"k{i}": i for i in range(30)}
    finally:
        again.stop()


def test_proposal_without_a_quorum_times_out_with_outcome_unknown(tmp_path: Path) -> None:
    ports = free_ports(3)
    cluster = {f"n{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(ports)}
    alone = RaftNode(config("n1", cluster, tmp_path), KeyValueStateMachine())
    alone.start()
    try:
        with pytest.raises(NoLeaderError):
            alone.wait_for_leader(0.5)
        with pytest.raises(ProposalTimeoutError) as caught:
            alone.propose(kv_command("set", "a", 1), timeout=0.5)
        assert caught.value.retriable
    finally:
        alone.stop()


def test_three_nodes_in_one_process_replicate_and_forward(tmp_path: Path) -> None:
    ports = free_ports(3)
    cluster = {f"n{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(ports)}
    machines = {n: KeyValueStateMachine() for n in cluster}
    nodes = {n: RaftNode(config(n, cluster, tmp_path), machines[n]) for n in cluster}
    try:
        for n in nodes.values():
            n.start()
        leader = nodes["n1"].wait_for_leader(10)
        follower = next(n for n in nodes.values() if n.node_id != leader)
        assert follower.propose(kv_command("set", "via", "follower"), timeout=5) is None
        wait_until(lambda: all(m.get("via") == "follower" for m in machines.values()), 5,
                   "every replica to apply")
        assert {n.leader_id for n in nodes.values()} == {leader}
    finally:
        for n in nodes.values():
            n.stop()


class Grumpy(KeyValueStateMachine):
    def apply(self, command: bytes) -> Any:
        if command == b"boom":
            raise RuntimeError("boom")
        return super().apply(command)


def test_a_state_machine_that_raises_does_not_stop_the_node(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    n = RaftNode(config("n1", {"n1": f"127.0.0.1:{port}"}, tmp_path), Grumpy())
    n.start()
    try:
        n.wait_for_leader(5)
        assert n.propose(b"\xff garbage", timeout=5) == ("error", "malformed command")
        with pytest.raises(CommandRefusedError) as caught:
            n.propose(b"boom", timeout=5)
        assert caught.value.code == "apply_failed" and "boom" in str(caught.value)
        assert n.propose(kv_command("set", "still", "fine"), timeout=5) is None
    finally:
        n.stop()


def test_a_command_over_max_command_bytes_is_refused_before_the_log(tmp_path: Path) -> None:
    n = single(tmp_path, max_command_bytes=1024)
    n.start()
    try:
        n.wait_for_leader(5)
        before = n.commit_index
        with pytest.raises(CommandTooLargeError, match="over max_command_bytes") as info:
            n.propose(kv_command("set", "k", "v" * 2000))
        assert info.value.retriable is False
        assert n.commit_index == before
        assert n.propose(kv_command("set", "k", "v" * 100)) is None
    finally:
        n.stop()
def test_proposals_from_other_threads_survive_a_snapshot_load(node: RaftNode) -> None:
    """Engine issue E17: loading a snapshot (every install from the leader, and
    each start) rebuilds PySyncObj's table of replicated methods on the Raft
    thread: emptied, then refilled. A proposal made meanwhile from another
    thread (every HTTP request) looked its method up in the empty table and
    failed with KeyError (seen in a chaos run: HTTP 500 and an ERROR log line
    right after a node restarted). The rebuild is what __loadDumpFile calls."""
    node.wait_for_leader(5)
    stop = threading.Event()

    def reload_tables() -> None:
        while not stop.is_set():
            node._call(lambda e: e._obj._SyncObj__onSetCodeVersion(0))

    errors: list[BaseException] = []
    futures: list[Future[Any]] = []

    def propose() -> None:
        for i in range(3000):
            try:
                futures.append(node.propose_async(kv_command("put", f"k{i}", i)))
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=reload_tables, daemon=True)] + [
        threading.Thread(target=propose, daemon=True) for _ in range(3)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so the window is hit
    try:
        for thread in threads:
            thread.start()
        for thread in threads[1:]:
            thread.join(60)
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        threads[0].join(5)
    assert errors == []
    for future in futures:
        future.result(30)
