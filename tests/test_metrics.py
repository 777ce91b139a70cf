"""Prometheus metrics: names by the Prometheus guide, values that move.

The first tests run one node in this process with its own registry; the
cluster tests scrape every node process's ``/metrics`` over real HTTP and
parse it with prometheus-client's own parser.
"""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streambus_consensus import NodeConfig, RaftNode
from streambus_consensus.kv import KeyValueStateMachine, kv_command
from streambus_consensus.metrics import PREFIX, NodeMetrics
from streambus_consensus.provision import generate_secret
from streambus_consensus.testing.harness import LocalCluster, free_ports, wait_until
from tests.conftest import ClusterFactory

ROOT = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """``({family: type}, {(sample name, sorted labels): value})``."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample called ``PREFIX + name`` whose labels include ``labels``."""
    found = [v for (n, ls), v in samples.items()
             if n == PREFIX + name and set(labels.items()) <= set(ls)]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[RaftNode]:
    (port,) = free_ports(1)
    config = NodeConfig(node_id="n1", cluster={"n1": f"127.0.0.1:{port}"},
                        data_dir=str(tmp_path / "n1"), cluster_secret=generate_secret())
    n = RaftNode(config, KeyValueStateMachine())
    n.start()
    try:
        n.wait_for_leader(5)
        yield n
    finally:
        n.stop()


def test_names_follow_the_prometheus_guide(node: RaftNode) -> None:
    registry = CollectorRegistry()
    NodeMetrics(node, registry=registry)
    node.propose(kv_command("set", "k", 1))
    types, samples = parse(generate_latest(registry).decode())
    assert types, "nothing exposed"
    for family, kind in types.items():
        assert family.startswith(PREFIX), family
        if family.endswith("_created"):
            continue  # prometheus-client's creation timestamps (off in node processes)
        if kind == "counter":
            assert all(n.endswith(("_total", "_created")) for n, _ in samples
                       if n.startswith(family + "_")), family
        if "duration" in family or family.endswith("_seconds"):
            assert family.endswith("_seconds"), family
        if "size" in family:
            assert family.endswith("_bytes"), family
    for name, labels in samples:
        assert ("node_id", "n1") in labels, name
    for counter in ("leader_changes_seen", "proposals_committed", "proposals_failed",
                    "entries_applied", "snapshots", "fast_elections", "pre_vote_rounds",
                    "pre_vote_rounds_won", "pre_votes_refused"):
        assert types[PREFIX + counter] == "counter"
    for histogram in ("proposal_duration_seconds", "apply_duration_seconds",
                      "fsync_duration_seconds"):
        assert types[PREFIX + histogram] == "histogram"
    assert value(samples, "build_info") == 1


@pytest.mark.cluster
def test_node_processes_expose_no_created_series(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(1)
    cluster.start()
    cluster.wait_for_leader()
    names = {name for name, _ in scrape(cluster, "n1")}
    assert PREFIX + "fsync_duration_seconds_count" in names
    assert not [n for n in names if n.endswith("_created")]


def test_values_read_at_scrape_time_move(node: RaftNode) -> None:
    registry = CollectorRegistry()
    metrics = NodeMetrics(node, registry=registry)
    _, before = parse(metrics.render()[0].decode())
    for i in range(5):
        node.propose(kv_command("set", f"k{i}", i))
    # The histograms are observed on the worker thread, after the future resolves.
    wait_until(lambda: value(parse(metrics.render()[0].decode())[1],
                             "proposal_duration_seconds_count") >= 5, 5, "5 observations")
    _, after = parse(metrics.render()[0].decode())
    assert value(after, "is_leader") == value(after, "has_leader") == 1
    assert value(after, "node_state", state="leader") == 1
    assert value(after, "term") >= 1
    assert value(after, "commit_index") >= value(before, "commit_index") + 5
    assert value(after, "applied_index") == value(after, "commit_index")
    assert value(after, "entries_applied_total") >= value(before, "entries_applied_total") + 5
    assert value(after, "proposals_committed_total") == value(
        before, "proposals_committed_total") + 5
    assert value(after, "apply_duration_seconds_count") >= 5
    assert value(after, "fsync_duration_seconds_count") > value(
        before, "fsync_duration_seconds_count")
    assert value(after, "proposals_pending") == 0


def test_a_registry_can_be_injected_and_is_never_the_global_one(node: RaftNode) -> None:
    from prometheus_client import REGISTRY

    metrics = NodeMetrics(node)
    assert metrics.registry is not REGISTRY
    assert PREFIX + "term" not in {m.name for m in REGISTRY.collect()}


# -- over real HTTP, on node processes -------------------------------------------------


def scrape(cluster: LocalCluster, node_id: str) -> Samples:
    return parse(scrape_text(cluster, node_id))[1]


def scrape_text(cluster: LocalCluster, node_id: str) -> str:
    host, port = cluster.nodes[node_id].api_address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/metrics")  # unauthenticated, as Prometheus scrapes
        response = conn.getresponse()
        body = response.read().decode()
    finally:
        conn.close()
    assert response.status == 200
    assert response.getheader("Content-Type", "").startswith("text/plain")
    return body


@pytest.mark.cluster
def test_scraped_values_follow_writes_and_failover(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(3)
    cluster.start()
    leader = cluster.wait_for_leader()
    nodes = list(cluster.nodes)
    first = {n: scrape(cluster, n) for n in nodes}
    assert sum(value(s, "is_leader") for s in first.values()) == 1
    assert value(first[leader], "is_leader") == 1
    assert len({value(s, "term") for s in first.values()}) == 1
    assert all(value(s, "has_leader") == 1 for s in first.values())
    wait_until(lambda: all(value(scrape(cluster, n), "connected_peers") == 2 for n in nodes),
               5, "every node connected to both peers")

    client = cluster.client(leader)
    for i in range(20):
        client.request("PUT", f"/v1/kv/k{i}", {"value": i})
    wait_until(lambda: all(value(scrape(cluster, n), "applied_index")
                           >= value(first[n], "commit_index") + 20 for n in nodes),
               5, "every node to apply 20 more entries")
    after = scrape(cluster, leader)
    assert value(after, "commit_index") >= value(first[leader], "commit_index") + 20
    assert value(after, "proposals_committed_total") >= 20
    assert value(after, "proposal_duration_seconds_count") >= 20

    cluster.kill(leader)
    survivors = [n for n in nodes if n != leader]
    new_leader = cluster.wait_for_leader(10, exclude=leader)
    wait_until(lambda: all(value(scrape(cluster, n), "connected_peers") == 1
                           for n in survivors), 5, "survivors to see the dead link")
    final = {n: scrape(cluster, n) for n in survivors}
    assert value(final[new_leader], "is_leader") == 1
    for n in survivors:
        assert value(final[n], "term") > value(first[n], "term")
        assert value(final[n], "leader_changes_seen_total") > value(
            first[n], "leader_changes_seen_total")


@pytest.mark.cluster
def test_metadata_gauges_describe_the_image(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(3, app="metadata", settings={"broker_session_timeout": 600.0})
    cluster.start()
    leader = cluster.wait_for_leader()
    client = cluster.client(leader)
    for broker in (1, 2, 3):
        client.request("POST", "/v1/brokers", {"broker_id": broker, "fenced": False,
                                               "endpoint": f"10.0.0.{broker}:9092"})
    client.request("POST", "/v1/topics", {"name": "single", "partitions": 4,
                                          "replication_factor": 1})
    client.request("POST", "/v1/topics", {"name": "double", "partitions": 3,
                                          "replication_factor": 2})
    client.request("POST", "/v1/brokers/2/fence", {})
    parts: list[dict[str, Any]] = []
    for topic in ("single", "double"):
        parts += client.request("GET", f"/v1/topics/{topic}?linearizable=1")["partitions"]
    offline = sum(1 for p in parts if p["leader"] is None)
    under = sum(1 for p in parts if len(p["isr"]) < len(p["replicas"]))
    imbalance = sum(1 for p in parts if p["leader"] != p["replicas"][0])
    assert under > 0  # broker 2 left some ISRs
    offset = client.request("GET", "/v1/topics?linearizable=1")["offset"]

    def gauges_match(node_id: str) -> bool:
        s = scrape(cluster, node_id)
        return value(s, "metadata_offset") >= offset and (
            value(s, "metadata_topics"), value(s, "metadata_partitions"),
            value(s, "metadata_offline_partitions"),
            value(s, "metadata_under_replicated_partitions"),
            value(s, "metadata_preferred_leader_imbalance"),
            value(s, "metadata_brokers", state="active"),
            value(s, "metadata_brokers", state="fenced"),
        ) == (2, 7, offline, under, imbalance, 2, 1)

    for node_id in cluster.nodes:
        wait_until(lambda n=node_id: gauges_match(n), 5, f"{node_id}'s metadata gauges")

    # The shipped dashboard and alerts use only names a metadata node exposes.
    exposed = set(re.findall(r"streambus_consensus_[a-z_]+", scrape_text(cluster, leader)))
    deploy = ROOT / "deploy"
    dashboard = json.loads((deploy / "grafana-dashboard.json").read_text(encoding="utf-8"))
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Leader", "Term", "Commit rate", "Proposal latency", "fsync p99",
            "Offline partitions", "Under-replicated partitions", "Brokers by state"} <= titles
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    text = "\n".join(exprs) + (deploy / "alerts.yml").read_text(encoding="utf-8")
    used = set(re.findall(r"streambus_consensus_[a-z_]+", text))
    assert used and used <= exposed, sorted(used - exposed)


@pytest.mark.cluster
def test_a_scrape_is_cheap(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(1)
    cluster.start()
    cluster.wait_for_leader()
    scrape(cluster, "n1")
    started = time.perf_counter()
    for _ in range(20):
        scrape(cluster, "n1")
    assert (time.perf_counter() - started) / 20 < 0.05
