"""The consensus core on real node processes talking real TCP on loopback."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from streambus_consensus.client import ApiClient
from streambus_consensus.errors import ConsensusError, OutcomeUnknownError
from streambus_consensus.testing.harness import wait_until
from tests.conftest import ClusterFactory

pytestmark = pytest.mark.cluster


def put(client: ApiClient, key: str, value: object) -> None:
    client.request("PUT", f"/v1/kv/{key}", {"value": value})


def read_all(client: ApiClient) -> dict[str, object]:
    items: dict[str, object] = client.request("GET", "/v1/kv?linearizable=1")["items"]
    return items


def test_single_node_elects_itself_and_commits(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(1)
    cluster.start()
    assert cluster.wait_for_leader(5) == "n1"
    client = cluster.client()
    put(client, "a", 1)
    assert client.request("GET", "/v1/kv/a?linearizable=1")["value"] == 1


def test_three_nodes_agree_on_one_leader(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(3)
    cluster.start()
    leader = cluster.wait_for_leader(10)
    statuses = [cluster.status(n) for n in cluster.nodes]
    assert all(s is not None for s in statuses)
    assert {s["leader_id"] for s in statuses if s} == {leader}
    assert [s["state"] for s in statuses if s].count("leader") == 1
    assert len({s["term"] for s in statuses if s}) == 1


def test_proposal_on_a_follower_is_forwarded(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(3)
    cluster.start()
    leader = cluster.wait_for_leader()
    follower = next(n for n in cluster.nodes if n != leader)
    client = cluster.client(follower)
    put(client, "via-follower", "yes")
    for node_id in cluster.nodes:
        wait_until(lambda n=node_id: cluster.client(n).request(
            "GET", "/v1/kv/via-follower")["value"] == "yes", 5, f"{node_id} to apply")


def test_leader_failover_keeps_acknowledged_writes(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(3)
    cluster.start()
    leader = cluster.wait_for_leader()
    client = cluster.client()
    for i in range(50):
        put(client, f"k{i}", i)
    cluster.kill(leader)
    new_leader = cluster.wait_for_leader(10, exclude=leader)
    assert new_leader != leader
    survivors = cluster.client(*cluster.running())
    wait_until(lambda: put(survivors, "after", 1) or True, 10, "a write after failover")
    items = read_all(survivors)
    assert all(items[f"k{i}"] == i for i in range(50))


def test_every_node_killed_mid_stream_keeps_every_acknowledged_write(
        make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(3, settings={"snapshot_interval_entries": 200})
    cluster.start()
    cluster.wait_for_leader()
    acknowledged: list[int] = []
    stop = threading.Event()

    def writer() -> None:
        client = cluster.client(timeout=2)
        i = 0
        while not stop.is_set():
            try:
                put(client, f"w{i}", i)
                acknowledged.append(i)
            except (ConsensusError, OSError):
                pass  # not acknowledged: may or may not be there
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_until(lambda: len(acknowledged) >= 300, 60, "300 acknowledged writes")
    finally:
        for node_id in cluster.nodes:
            cluster.kill(node_id)
        stop.set()
        thread.join(30)
    cluster.start()
    cluster.wait_for_leader(15)
    items = read_all(cluster.client())
    missing = [i for i in acknowledged if items.get(f"w{i}") != i]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"


def test_lagging_node_catches_up_through_a_snapshot(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(3, settings={"snapshot_interval_entries": 50})
    cluster.start()
    leader = cluster.wait_for_leader()
    laggard = next(n for n in cluster.nodes if n != leader)
    cluster.stop(laggard)
    client = cluster.client(*cluster.running())
    for i in range(400):
        put(client, f"k{i}", i)
    leader_status = cluster.status(leader)
    assert leader_status is not None
    # The leader compacted: it no longer holds the entries the laggard lacks.
    assert leader_status["log_entries"] < 400
    cluster.start(laggard)
    target = leader_status["commit_index"]
    wait_until(lambda: (s := cluster.status(laggard)) and s["applied_index"] >= target,
               30, "the laggard to catch up")
    local = cluster.client(laggard).request("GET", "/v1/kv")["items"]
    assert all(local[f"k{i}"] == i for i in range(400))


def test_restarted_node_rejoins_from_its_data_dir(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(3)
    cluster.start()
    cluster.wait_for_leader()
    client = cluster.client()
    for i in range(20):
        put(client, f"k{i}", i)
    victim = cluster.followers()[0]
    cluster.restart(victim)
    status = wait_until(lambda: (s := cluster.status(victim)) and s["leader_id"] and s,
                        15, f"{victim} to rejoin")
    assert status["state"] == "follower"
    wait_until(lambda: cluster.client(victim).request("GET", "/v1/kv/k19")["value"] == 19,
               10, "the rejoined node to serve its data")


def test_garbage_on_the_raft_port_leaves_the_cluster_serving(
        make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(3)
    cluster.start()
    leader = cluster.wait_for_leader()
    target = cluster.nodes[leader]
    payloads = [
        b"\x00" * 64,
        b"\xff\xff\xff\xff" + b"A" * 100,  # claims a 4 GiB frame
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        bytes(range(256)) * 8,
    ]
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", target.raft_port), timeout=5) as sock:
            sock.sendall(payload)
            sock.settimeout(5)
            try:
                while sock.recv(4096):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
    stalled = socket.create_connection(("127.0.0.1", target.raft_port), timeout=5)
    try:
        stalled.sendall(b"\x00\x00\x10\x00" + b"half a frame")
        client = cluster.client()
        for i in range(20):
            put(client, f"after-garbage-{i}", i)
        assert cluster.leader() == leader, "garbage must not cost the leader its leadership"
    finally:
        stalled.close()
    assert target.alive


def test_leader_without_a_majority_steps_down(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(3, settings={"election_timeout_min": 0.4,
                                        "election_timeout_max": 0.8})
    cluster.start()
    leader = cluster.wait_for_leader()
    followers = [n for n in cluster.nodes if n != leader]
    for node_id in followers:
        cluster.pause(node_id)
    paused_at = time.monotonic()
    try:
        wait_until(lambda: (s := cluster.status(leader)) and s["state"] != "leader",
                   5, "the isolated leader to step down")
        stepped_down = time.monotonic() - paused_at
        with pytest.raises((OutcomeUnknownError, ConsensusError)):
            cluster.client(leader, timeout=3).request("PUT", "/v1/kv/x", {"value": 1})
    finally:
        for node_id in followers:
            cluster.resume(node_id)
    # Two election timeouts (2 x 0.8 s) plus polling slack.
    assert stepped_down < 2 * 0.8 + 0.5
    cluster.wait_for_leader(10)
