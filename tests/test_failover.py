"""Elections on real node processes: one new term per failover, none on rejoin.

Engine issues E15 (no pre-vote) and E16 (a ``timeout_now`` that outlived its
election), docs/engine-issues.md. Counts over many rounds are measured by
``python -m streambus_consensus.bench.failover`` and ``make demo-repeat``; the
tests here run a few rounds each.
"""

from __future__ import annotations

import functools
import random
import time

import pytest

from streambus_consensus.client import ApiClient
from streambus_consensus.testing.harness import LocalCluster, wait_until
from tests.conftest import ClusterFactory

pytestmark = pytest.mark.cluster

ELECTION_TIMEOUT_MAX = 0.8  # the default NodeConfig.election_timeout_max


def max_term(cluster: LocalCluster) -> int:
    return max((cluster.status(n) or {}).get("term", 0) for n in cluster.running())


def write(client: ApiClient) -> bool:
    client.request("PUT", "/v1/kv/after", {"value": 1})
    return True


def caught_up(cluster: LocalCluster, node_id: str, leader: str) -> bool:
    mine, theirs = cluster.status(node_id), cluster.status(leader)
    return bool(mine and theirs and mine["leader_id"] == leader
                and mine["applied_index"] >= theirs["commit_index"])


def assert_term_stays(cluster: LocalCluster, term: int, leader: str, seconds: float) -> None:
    """Watch for ``seconds``: no node may move past ``term`` and ``leader`` keeps leading."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = max_term(cluster)
        assert now == term, f"an election happened: term {term} -> {now}"
        assert cluster.leader() in (leader, None)
        time.sleep(0.05)
    assert cluster.leader() == leader


def test_each_sigkill_failover_takes_exactly_one_new_term(make_cluster: ClusterFactory) -> None:
    """The survivors of a dead leader both learn at once (connection refused);
    only one may campaign, and the one that loses must not depose the winner
    a timeout later (seen in make demo: n2 won term 3 after n1 won term 2)."""
    cluster = make_cluster(3)
    cluster.start()
    client = cluster.client(timeout=5)
    for round_no in range(4):
        leader = cluster.wait_for_leader(15)
        client.request("PUT", f"/v1/kv/before-{round_no}", {"value": round_no})
        term = max_term(cluster)
        cluster.kill(leader)
        survivors = cluster.client(*cluster.running(), timeout=5)
        new_leader = cluster.wait_for_leader(15, exclude=leader)
        wait_until(functools.partial(write, survivors), 10, "a write after the failover")
        cluster.start(leader)
        wait_until(functools.partial(caught_up, cluster, leader, new_leader), 20,
                   f"{leader} to catch up")
        assert max_term(cluster) == term + 1
        assert_term_stays(cluster, term + 1, new_leader, 2 * ELECTION_TIMEOUT_MAX)


def test_a_node_cut_off_for_several_timeouts_rejoins_without_an_election(
        make_cluster: ClusterFactory) -> None:
    """Thesis §9.6: a server that was partitioned away must not disrupt the
    cluster when it comes back. Without pre-vote it rejoins with a higher
    term and the leader steps down."""
    cluster = make_cluster(3, proxied=True)
    cluster.start()
    assert cluster.network is not None
    rng = random.Random(11)
    leader = cluster.wait_for_leader(15)
    client = cluster.client(leader, timeout=5)  # never the node that is cut off
    client.request("PUT", "/v1/kv/start", {"value": 0})
    term = max_term(cluster)
    for round_no in range(3):
        follower = next(n for n in cluster.nodes if n != leader)
        links = cluster.network.isolate(follower)
        time.sleep(rng.uniform(2, 5) * ELECTION_TIMEOUT_MAX)  # the cut, as long as asked
        client.request("PUT", f"/v1/kv/during-{round_no}", {"value": round_no})
        cluster.network.heal(links)
        wait_until(lambda f=follower: caught_up(cluster, f, leader), 20,
                   f"{follower} to catch up after the cut")
        assert_term_stays(cluster, term, leader, ELECTION_TIMEOUT_MAX)
