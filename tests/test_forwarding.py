"""Proposals made on a follower: the engine forwards them to the leader.

RaftNode in-process over real TCP. The follower's transport is a
:class:`TcpTransport` whose link to the leader can be held down, as it is
for a moment after start-up (the follower learns the leader from the
leader's own connection before its dial to the leader is through).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from streambus_consensus import NodeConfig, NotLeaderError, RaftNode
from streambus_consensus.kv import KeyValueStateMachine, kv_command
from streambus_consensus.provision import generate_secret
from streambus_consensus.raft.transport import TcpTransport
from streambus_consensus.testing.harness import wait_until
from tests.conftest import loopback_cluster, started

SECRET = generate_secret()


class LinkDownTransport(TcpTransport):
    """A real transport whose sends to ``down`` fail, as while its dial is pending."""

    def __init__(self, config: NodeConfig) -> None:
        peers = {n: a for n, a in config.cluster.items() if n != config.node_id}
        super().__init__(config.node_id, config.cluster[config.node_id], peers, secret=SECRET)
        self.down: set[str] = set()
        self.refused: list[str] = []
        self._lock = threading.Lock()

    def send(self, node_id: str, message: Mapping[str, Any], *, ahead: bool = False) -> bool:
        with self._lock:
            if node_id in self.down:
                self.refused.append(str(message.get("type")))
                return False
        return super().send(node_id, message, ahead=ahead)

    def set_down(self, *node_ids: str) -> None:
        with self._lock:
            self.down = set(node_ids)


Trio = tuple[dict[str, RaftNode], dict[str, LinkDownTransport], dict[str, KeyValueStateMachine]]


def _config(node_id: str, cluster: dict[str, str], tmp: Path) -> NodeConfig:
    return NodeConfig(node_id=node_id, cluster=cluster, cluster_secret=SECRET,
                      data_dir=str(tmp / node_id), proposal_timeout=10.0)


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[Trio]:
    cluster = loopback_cluster()
    configs = {n: _config(n, cluster, tmp_path) for n in cluster}
    transports = {n: LinkDownTransport(c) for n, c in configs.items()}
    machines = {n: KeyValueStateMachine() for n in cluster}
    nodes = {n: RaftNode(c, machines[n], transport=transports[n]) for n, c in configs.items()}
    with started(nodes):
        yield nodes, transports, machines


def _a_follower(nodes: dict[str, RaftNode]) -> tuple[str, str]:
    leader = next(iter(nodes.values())).leader_id
    assert leader is not None
    return next(n for n in nodes if n != leader), leader


def test_a_forward_made_while_the_link_to_the_leader_is_down_goes_out_when_it_is_up(
        trio: Trio) -> None:
    """Regression (one `make demo` run in a hundred): a follower that knew the
    leader but whose own link to it was not yet up lost the forwarded command
    (the engine ignores a failed send) and its caller waited out the proposal
    timeout. The forward now waits for the link."""
    nodes, transports, machines = trio
    follower, leader = _a_follower(nodes)
    transports[follower].set_down(leader)
    future = nodes[follower].propose_async(kv_command("set", "k", 1))
    wait_until(lambda: "apply_command" in transports[follower].refused, 5,
               "the forward to be refused by the transport")
    time.sleep(0.2)
    transports[follower].set_down()
    started = time.monotonic()
    assert future.result(5) is None  # the previous value of k
    assert time.monotonic() - started < 2.0
    # The leader announces a commit before applying it (E19): it may apply after us.
    wait_until(lambda: machines[leader].get("k") == 1, 5, "the leader to apply the write")


def test_a_forward_that_never_gets_through_fails_as_not_sent(
        trio: Trio) -> None:
    """When the link stays down the caller gets a retriable "not sent" error
    within about an election timeout, not a timeout with an unknown outcome."""
    nodes, transports, machines = trio
    follower, leader = _a_follower(nodes)
    transports[follower].set_down(leader)
    started = time.monotonic()
    future = nodes[follower].propose_async(kv_command("set", "k", 2))
    with pytest.raises(NotLeaderError) as caught:
        future.result(8)
    assert caught.value.retriable
    assert time.monotonic() - started < 3.0
    transports[follower].set_down()
    time.sleep(0.5)
    assert machines[leader].get("k") is None
