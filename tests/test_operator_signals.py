"""What an operator sees: audit lines, /healthz, process and replication metrics."""

from __future__ import annotations

import http.client
import json
from typing import Any

import pytest

from streambus_consensus import NodeConfig
from streambus_consensus.provision import generate_secret
from streambus_consensus.server import NodeServer
from streambus_consensus.testing.harness import LocalCluster, free_ports, wait_until
from tests.conftest import ClusterFactory
from tests.test_membership import add_node_process, members_of
from tests.test_metrics import scrape, value


def get_unsigned(api_address: str, path: str) -> tuple[int, Any]:
    host, port = api_address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", path)  # no signature headers at all
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def audit_lines(local: LocalCluster, node_id: str) -> list[str]:
    text = local.nodes[node_id].log_path.read_text(errors="replace")
    return [line.split("streambus_consensus.audit: ", 1)[1] for line in text.splitlines()
            if " INFO streambus_consensus.audit: " in line]


@pytest.mark.cluster
def test_audit_lines_for_membership_leadership_and_topics(make_cluster: ClusterFactory) -> None:
    local = make_cluster(3, app="metadata")
    local.start()
    leader = local.wait_for_leader()
    client = local.client(leader)
    for broker in (1, 2):
        client.request("POST", "/v1/brokers", {"broker_id": broker, "fenced": False,
                                               "endpoint": f"127.0.0.1:{9090 + broker}"})
    client.request("POST", "/v1/topics", {"name": "audited", "partitions": 2,
                                          "replication_factor": 2}, address=local.nodes[
                                              leader].api_address)
    client.request("DELETE", "/v1/topics/audited", address=local.nodes[leader].api_address)

    new = add_node_process(local, "n4", members_of(local, leader))
    local.start("n4")
    leader_api = local.nodes[leader].api_address
    client.request("POST", "/v1/members", {"node_id": "n4", "address": new.raft_address},
                   address=leader_api)
    wait_until(lambda: "n4" in members_of(local, leader), 10, "n4 to be a member")
    client.request("DELETE", "/v1/members/n4", address=leader_api)
    local.stop("n4")
    target = next(n for n in ("n1", "n2", "n3") if n != leader)
    client.request("POST", "/v1/leader/transfer", {"node_id": target}, address=leader_api)
    wait_until(lambda: local.leader() == target, 10, f"{target} to lead")

    wait_until(lambda: len(audit_lines(local, leader)) >= 7, 5, "the audit lines")
    lines = audit_lines(local, leader)
    assert lines[:6] == [
        f"{leader}: created topic audited (2 partitions, replication factor 2)",
        f"{leader}: deleted topic audited",
        f"{leader}: added n4 at {new.raft_address} as a learner",
        f"{leader}: promoted learner n4 to voter",
        f"{leader}: added member n4 at {new.raft_address}",
        f"{leader}: removed member n4",
    ]
    assert lines[6].startswith(f"{leader}: leadership transfer to {target} started (term ")
    assert len(lines) == 7
    for node_id in ("n1", "n2", "n3"):
        if node_id != leader:
            assert audit_lines(local, node_id) == []  # logged where it was carried out


@pytest.mark.cluster
def test_healthz_needs_no_signature_and_metrics_show_process_and_lag(
        make_cluster: ClusterFactory) -> None:
    local = make_cluster(3)
    local.start()
    leader = local.wait_for_leader()
    for node_id, node in local.nodes.items():
        status, body = get_unsigned(node.api_address, "/healthz")
        assert status == 200
        assert set(body) == {"node_id", "state", "leader_id", "term"}
        assert body["node_id"] == node_id and body["state"] in ("leader", "follower")
    # Everything else still needs a signature.
    assert get_unsigned(local.nodes[leader].api_address, "/v1/status")[0] == 401

    def lag_shown() -> bool:
        samples = scrape(local, leader)
        peers = {dict(labels).get("peer") for name, labels in samples
                 if name.endswith("peer_replication_lag_entries")}
        return peers == set(local.nodes) - {leader}

    wait_until(lag_shown, 5, "per-peer lag on the leader")
    samples = scrape(local, leader)
    assert value(samples, "members") == 3
    assert value(samples, "process_resident_memory_bytes") > 1e6
    assert value(samples, "process_open_fds") > 3
    assert value(samples, "process_cpu_seconds_total") > 0
    follower = next(n for n in local.nodes if n != leader)
    assert not [n for n, _ in scrape(local, follower)
                if n.endswith("peer_replication_lag_entries")]


def test_healthz_answers_503_once_the_raft_thread_stopped() -> None:
    raft, api = free_ports(2)
    config = NodeConfig(node_id="n1", cluster={"n1": f"127.0.0.1:{raft}"}, data_dir=None,
                        api_address=f"127.0.0.1:{api}", cluster_secret=generate_secret())
    server = NodeServer(config)
    server.start()
    try:
        server.node.wait_for_leader(5)
        assert get_unsigned(config.api_address or "", "/healthz") == (200, {
            "node_id": "n1", "state": "leader", "leader_id": "n1", "term": server.node.term})
        server.node.stop()  # the Raft thread gone, the API still up
        status, body = get_unsigned(config.api_address or "", "/healthz")
        assert status == 503 and body["state"] == "stopped"
    finally:
        server.stop()
