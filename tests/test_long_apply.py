"""Engine issue E19: one apply longer than an election timeout costs no leadership.

Three nodes in one process (real TCP on loopback). A state machine whose
apply of one command blocks its Raft thread for 2 s, well past the election
timeout (0.4-0.8 s) and the leader's check-quorum (0.8 s), stands for a
broker fenced in a million partitions. Before the fix the followers, who had
not heard of the commit while the leader was busy, elected another leader.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from streambus_consensus import NodeConfig, NodeState, RaftNode
from streambus_consensus.kv import KeyValueStateMachine, kv_command
from streambus_consensus.provision import generate_secret
from streambus_consensus.testing.harness import free_ports, wait_until

SECRET = generate_secret()
BUSY_S = 2.0


class Busy(KeyValueStateMachine):
    """Applies ``b"busy"`` by holding the Raft thread for :data:`BUSY_S`."""

    def __init__(self) -> None:
        super().__init__()
        self.busy_applied = 0

    def apply(self, command: bytes) -> Any:
        if command == b"busy":
            time.sleep(BUSY_S)
            self.busy_applied += 1
            return None
        return super().apply(command)


def test_an_apply_longer_than_the_election_timeout_keeps_the_leader(tmp_path: Path) -> None:
    ports = free_ports(3)
    cluster = {f"n{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(ports)}
    machines = {n: Busy() for n in cluster}
    nodes = {n: RaftNode(NodeConfig(node_id=n, cluster=cluster, cluster_secret=SECRET,
                                    data_dir=str(tmp_path / n)), machines[n])
             for n in cluster}
    try:
        for node in nodes.values():
            node.start()
        leader = nodes["n1"].wait_for_leader(10)
        assert nodes[leader].propose(kv_command("set", "warm", "up"), timeout=5) is None
        wait_until(lambda: all(m.get("warm") == "up" for m in machines.values()), 5,
                   "every replica to apply the first write")
        terms = {n: node.status().term for n, node in nodes.items()}
        assert nodes[leader].propose(b"busy", timeout=10) is None
        wait_until(lambda: all(m.busy_applied == 1 for m in machines.values()), 10,
                   "every replica to apply the long entry")
        # Writes go on at once, and nobody campaigns afterwards either.
        assert nodes[leader].propose(kv_command("set", "after", "busy"), timeout=5) is None
        time.sleep(1.5)
        assert {n: node.status().term for n, node in nodes.items()} == terms
        assert {node.leader_id for node in nodes.values()} == {leader}
        assert nodes[leader].status().state is NodeState.LEADER
    finally:
        for node in nodes.values():
            node.stop()
