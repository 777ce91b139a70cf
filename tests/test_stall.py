"""A node whose Raft thread stalls (a slow fsync on a busy disk, a process
the scheduler left waiting) must not take its own stall for a dead leader.

RaftNode in-process over real TCP; one follower's storage stalls on demand.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from streambus_consensus import NodeConfig, RaftNode
from streambus_consensus.kv import KeyValueStateMachine, kv_command
from streambus_consensus.provision import generate_secret
from streambus_consensus.raft.storage import DiskStorage
from streambus_consensus.testing.harness import wait_until
from tests.conftest import loopback_cluster, started

SECRET = generate_secret()
STALL = 1.0
"""Longer than a third of the election timeouts drawn from 0.35-2.5 s, well
shorter than the transport's dead timeout (election_timeout_max, 2.5 s), past
which the peers drop their links to the silent node (then its pre-vote is
right to start); the margin is for a loaded machine."""


class StallingStorage(DiskStorage):
    """Real disk storage whose next ``syncs`` syncs each take ``STALL`` seconds longer."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self._lock = threading.Lock()
        self._stalls = 0

    def stall(self, syncs: int) -> None:
        with self._lock:
            self._stalls = syncs

    def sync(self) -> None:
        with self._lock:
            stall = self._stalls > 0
            self._stalls -= 1 if stall else 0
        if stall:
            time.sleep(STALL)
        super().sync()


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[tuple[dict[str, RaftNode], dict[str, StallingStorage]]]:
    cluster = loopback_cluster()
    storages = {n: StallingStorage(tmp_path / n) for n in cluster}
    nodes = {n: RaftNode(NodeConfig(node_id=n, cluster=cluster, cluster_secret=SECRET,
                                    data_dir=str(tmp_path / n), election_timeout_min=0.35,
                                    election_timeout_max=2.5),
                         KeyValueStateMachine(), storage=storages[n]) for n in cluster}
    with started(nodes):
        yield nodes, storages


def test_a_follower_that_stalls_reads_its_socket_before_suspecting_the_leader(
        trio: tuple[dict[str, RaftNode], dict[str, StallingStorage]]) -> None:
    """Regression (`make demo` on a loaded machine): a follower's thread
    stalled between taking in its messages and checking its election timer;
    the heartbeats that arrived meanwhile sat unread in its socket, the timer
    had run out, and it asked for pre-votes while its leader was alive. A
    node that had just restarted (so had heard from no leader yet) granted
    one, and the cluster went through a needless election."""
    nodes, storages = trio
    leader = nodes["n1"].leader_id
    follower = next(n for n in nodes if n != leader)
    gate = nodes[follower].gate
    rounds = gate.rounds_started
    for attempt in range(8):
        # Two syncs in a row stall: one of them is the sync after the thread
        # took in its messages, right before it looks at its election timer.
        storages[follower].stall(2)
        nodes[leader].propose(kv_command("set", "k", attempt), timeout=10)
        wait_until(lambda: storages[follower]._stalls <= 0, 10, "the stalls to pass")
        time.sleep(0.3)
        assert nodes[follower].leader_id == leader
    assert gate.rounds_started == rounds, "a stalled follower asked for pre-votes"
    assert {n.term for n in nodes.values()} == {1}
