"""Engine issue E23: a snapshot transmission left from an earlier term of leadership.

PySyncObj keeps, per follower, how far it got sending its snapshot file, and
forgets it only when that follower's link drops or a new snapshot is written.
A leader deposed in the middle of sending, and elected again, resumed at the
old position: the follower, which meanwhile received the start of another
leader's snapshot, wrote a file of two halves and stopped on it (seen at 1M
partitions while a new member caught up on a loaded machine).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from streambus_consensus.config import NodeConfig
from streambus_consensus.kv import KeyValueStateMachine
from streambus_consensus.raft.node import RaftNode
from streambus_consensus.testing.harness import wait_until
from tests.conftest import loopback_cluster, started

SECRET = "snapshot-transfer-test-secret"


@pytest.fixture
def trio() -> Iterator[dict[str, RaftNode]]:
    cluster = loopback_cluster()
    nodes = {n: RaftNode(NodeConfig(node_id=n, cluster=cluster, cluster_secret=SECRET),
                         KeyValueStateMachine()) for n in cluster}
    with started(nodes):
        yield nodes


def _transmissions(node: RaftNode) -> dict[Any, Any]:
    engine: Any = node._engine
    serializer = engine._obj._SyncObj__serializer
    found: dict[Any, Any] = serializer._Serializer__transmissions
    return found


def test_a_leader_elected_again_starts_every_snapshot_transmission_over(
        trio: dict[str, RaftNode]) -> None:
    first = trio["n1"].wait_for_leader(10)
    other = next(n for n in trio if n != first)
    # As if ``first`` had sent part of its snapshot to ``other`` before losing
    # its leadership.
    engine: Any = trio[first]._engine
    member = next(m for m in engine._obj._SyncObj__otherNodes if m.id == other)
    _transmissions(trio[first])[member] = {"transmitted": 4096, "data": b"x" * 8192}
    trio[first].transfer_leadership(other, timeout=10)
    wait_until(lambda: trio[other].is_leader, 10, f"{other} to lead")
    trio[other].transfer_leadership(first, timeout=10)
    wait_until(lambda: trio[first].is_leader, 10, f"{first} to lead again")
    assert member not in _transmissions(trio[first]), (
        "a transmission from the earlier term would resume mid-file")
