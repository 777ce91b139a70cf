"""Write ordering: a leader sends ``append_entries`` before its own sync, but
never counts an entry of its own towards a commit before that entry is durable.

Raft thesis §10.2.1: "the leader can write to its disk in parallel with
replicating to the followers ... the leader may even commit an entry before
it has been written to its own disk, if a majority of other servers have
written it to their disks." PySyncObj's leader counts itself for every entry
in its log, so here the rule is stricter: its commit index never passes the
end of its durable log.

RaftNode in-process over real TCP on loopback, each node on a storage twin
that knows what a crash would keep (everything up to its last sync).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from streambus_consensus import NodeConfig, NodeState, RaftNode
from streambus_consensus.interfaces import LogEntry
from streambus_consensus.kv import KeyValueStateMachine, kv_command
from streambus_consensus.provision import generate_secret
from streambus_consensus.raft.storage import MemoryStorage
from streambus_consensus.testing.harness import free_ports, wait_until

SECRET = generate_secret()


class SyncPointStorage(MemoryStorage):
    """MemoryStorage that tracks what a crash would keep (the log up to the
    last :meth:`sync`) and records every commit index set while its node
    leads, beside the durable end of the log at that moment."""

    def __init__(self) -> None:
        super().__init__()
        self.last_index = 0
        self.durable_index = 0
        self.syncs = 0
        self.leading: Callable[[], bool] = lambda: False
        self.leader_commits: list[tuple[int, int]] = []
        """(commit index, durable log end) each time the leader's commit moved."""

    def append(self, entry: LogEntry) -> None:
        super().append(entry)
        self.last_index = entry.index

    def truncate_suffix(self, from_index: int) -> None:
        super().truncate_suffix(from_index)
        self.last_index = min(self.last_index, from_index - 1)
        self.durable_index = min(self.durable_index, from_index - 1)

    def sync(self) -> None:
        super().sync()
        self.syncs += 1
        self.durable_index = self.last_index

    def set_commit_index(self, index: int) -> None:
        if self.leading():
            self.leader_commits.append((index, self.durable_index))
        super().set_commit_index(index)

    def counted_before_durable(self) -> list[tuple[int, int]]:
        """The commits that counted an entry this leader had not synced."""
        return [(commit, durable) for commit, durable in self.leader_commits
                if commit > durable]


def _config(node_id: str, cluster: dict[str, str]) -> NodeConfig:
    return NodeConfig(node_id=node_id, cluster=cluster, cluster_secret=SECRET)


def _nodes(size: int) -> tuple[dict[str, RaftNode], dict[str, SyncPointStorage]]:
    ports = free_ports(size)
    cluster = {f"n{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(ports)}
    storages = {n: SyncPointStorage() for n in cluster}
    nodes = {n: RaftNode(_config(n, cluster), KeyValueStateMachine(), storage=storages[n])
             for n in cluster}
    for node_id, node in nodes.items():
        storages[node_id].leading = lambda node=node: node.state is NodeState.LEADER
    return nodes, storages


@pytest.fixture
def trio() -> Iterator[tuple[dict[str, RaftNode], dict[str, SyncPointStorage]]]:
    nodes, storages = _nodes(3)
    with contextlib.ExitStack() as running:  # stops every node started, even on failure
        for node in nodes.values():
            running.enter_context(node)
        nodes["n1"].wait_for_leader(10)
        yield nodes, storages


def test_a_leader_never_counts_an_entry_it_has_not_synced(trio: Any) -> None:
    nodes, storages = trio
    leader_id = nodes["n1"].wait_for_leader(10)
    leader = nodes[leader_id]
    follower = next(n for n in nodes.values() if n.node_id != leader_id)
    for i in range(150):  # one caller: each entry alone in its sync group
        leader.propose(kv_command("set", f"one-{i}", i), timeout=5)

    def writer(node: RaftNode, tag: str) -> None:
        for i in range(40):
            node.propose(kv_command("set", f"{tag}-{i}", i), timeout=10)

    threads = [threading.Thread(target=writer, args=(node, f"w{t}"))
               for t in range(6) for node in (leader, follower)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    wait_until(lambda: len({n.applied_index for n in nodes.values()}) == 1, 10,
               "every replica to apply everything")

    counted = storages[leader_id].leader_commits
    assert len(counted) >= 150, "the leader's commits were not observed"
    assert storages[leader_id].counted_before_durable() == []
    # The overlap is real: the leader's appends left before its syncs.
    assert leader._transport is not None and leader._transport.sent_ahead >= 150
    for node in nodes.values():
        if node is not leader:
            # Followers' acknowledgements always wait for their sync.
            assert node._transport is not None and node._transport.sent_ahead == 0


def test_a_lone_voter_syncs_its_election_entry_before_counting_it() -> None:
    """A lone voter wins its election inside the engine's tick, and that same
    tick counts its log; the no-op it appended on winning must be durable
    first."""
    nodes, storages = _nodes(1)
    node, storage = nodes["n1"], storages["n1"]
    with node:
        node.wait_for_leader(10)
        for i in range(20):
            node.propose(kv_command("set", f"k{i}", i), timeout=5)
    assert len(storage.leader_commits) >= 20
    assert storage.counted_before_durable() == []
