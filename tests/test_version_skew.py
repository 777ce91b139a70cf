"""Version skew on real processes: a rolling upgrade under write load.

The "old" release is this build; the "new" one is this build run as the next
release (:mod:`streambus_consensus.testing.next_level`: one metadata version
up, with a command kind the old one cannot decode). Nodes are restarted from
old to new one at a time while clients write; after each step every recorded
history must stay linearizable and every replica's state (its snapshot bytes)
must be byte-identical. Raising the metadata version is refused until every
voter runs the new release; once it is raised, an old release refuses to run
on the data (fail-stop), and the new one takes over again.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from streambus_consensus.client import ApiClient
from streambus_consensus.errors import CommandRefusedError
from streambus_consensus.metadata.commands import supported_metadata_versions
from streambus_consensus.testing import next_level
from streambus_consensus.testing.harness import LocalCluster, wait_until
from streambus_consensus.testing.linearizability import (
    CheckOutcome,
    History,
    check_operations,
    metadata_model,
)
from streambus_consensus.testing.workload import MetadataWorkload, WorkloadConfig
from tests.conftest import ClusterFactory
from tests.test_cli import fails, ok, rows

pytestmark = pytest.mark.cluster

NEXT_RELEASE = {next_level.ENV_VAR: "1"}
OLD = supported_metadata_versions()[1]
"""The highest metadata version of this release (the "old" one here)."""
NEW = OLD + 1
"""The version the "next release" (:mod:`next_level`) introduces."""
SETTINGS = {
    "broker_session_timeout": 86_400.0,  # the test's broker never heartbeats
    "snapshot_interval_entries": 40,  # snapshots (and installs) cross versions too
    # A new cluster starts at the newest version its release reads: these
    # clusters start at 1, as one made by 'cluster init --metadata-version 1'.
    "bootstrap_metadata_version": 1,
}
LOAD = WorkloadConfig(clients=3, topics=6, write_deadline=10.0, think_time=0.01)


def digests(cluster: LocalCluster, timeout: float = 20.0) -> tuple[int, str]:
    """Wait until every node reports the same offset; return it and the one digest."""
    seen: dict[str, Any] = {}

    def same() -> bool:
        for node_id in cluster.nodes:
            seen[node_id] = cluster.client(node_id).request("GET", "/v1/metadata/digest")
        return len({(d["offset"], d["sha256"]) for d in seen.values()}) == 1

    try:
        wait_until(same, timeout, "every replica at the same offset with the same state")
    except Exception:
        raise AssertionError(f"replicas differ: {seen}") from None
    first = next(iter(seen.values()))
    return int(first["offset"]), str(first["sha256"])



def features(client: ApiClient) -> list[dict[str, Any]]:
    return [client.request("GET", "/v1/features", address=a) for a in client.addresses]


def test_rolling_upgrade_under_load_stays_linearizable_and_identical(
    make_cluster: ClusterFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    cluster = make_cluster(3, app="metadata", settings=SETTINGS)
    cluster.start()
    cluster.wait_for_leader()
    client = cluster.client()
    client.request("POST", "/v1/brokers", {"broker_id": 0, "endpoint": "b0:9092",
                                           "fenced": False})
    apis = {node_id: node.api_address for node_id, node in cluster.nodes.items()}
    history = History()
    figures = []

    def under_load(step: str, action: Any) -> None:
        workload = MetadataWorkload(apis, cluster.secret, history, config=LOAD, seed=len(figures),
                                    name=f"w{len(figures)}")
        workload.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        action()
        action_seconds = time.monotonic() - t0
        time.sleep(1.0)
        workload.stop()
        assert not workload.unexpected(), [r.unexpected for r in workload.unexpected()]
        offset, sha = digests(cluster)
        counts = workload.counts()
        figures.append((step, round(action_seconds, 2), sum(sum(c.values()) for c in
                                                            counts.values()), offset, sha[:12]))

    assert [f["supported"] for f in features(client)] == [[1, OLD]] * 3
    under_load("start: 3 old", lambda: None)
    order = sorted(cluster.nodes)
    for i, node_id in enumerate(order):
        def roll(node_id: str = node_id) -> None:
            cluster.stop(node_id)
            cluster.nodes[node_id].env = dict(NEXT_RELEASE)
            cluster.start(node_id)

        under_load(f"{node_id} -> new", roll)
        if i < len(order) - 1:
            # Raising the version is refused while any voter runs the old release.
            with pytest.raises(CommandRefusedError) as refused:
                client.request("POST", "/v1/features", {"metadata_version": NEW})
            assert refused.value.code == "unsupported_metadata_version"
            for old in order[i + 1:]:
                assert f"{old} reads 1..{OLD}" in str(refused.value)
            assert {f["finalized"] for f in features(client)} == {1}
    assert [f["supported"] for f in features(client)] == [[1, NEW]] * 3

    # Every node is new: the new command is still not written until the upgrade.
    with pytest.raises(CommandRefusedError) as early:
        client.request("POST", "/v1/test/topics/t0/retention", {"retention_ms": 123})
    assert early.value.code == "feature_not_enabled"
    answer = client.request("POST", "/v1/features", {"metadata_version": NEW})
    assert answer["finalized"] == NEW and answer["voters"] == {n: [1, NEW] for n in order}
    client.request("POST", "/v1/topics", {"name": "after-upgrade", "partitions": 1,
                                          "replication_factor": 1})
    client.request("POST", "/v1/test/topics/after-upgrade/retention", {"retention_ms": 123})
    under_load(f"metadata version {NEW}", lambda: None)
    for node_id in order:
        topic = cluster.client(node_id).request("GET", "/v1/topics/after-upgrade")
        assert topic["config"]["retention.ms"] == 123
    assert {f["finalized"] for f in features(client)} == {NEW}

    # Rolling one node back to the old release now must fail-stop, not diverge.
    victim = order[0]
    cluster.stop(victim)
    cluster.nodes[victim].env = {}
    cluster.start(victim, wait=False)
    node = cluster.nodes[victim]
    wait_until(lambda: not node.alive, 20, f"the old release on {victim} to stop")
    assert node.proc is not None and node.proc.returncode not in (0, None)
    log = cluster.tail(victim, 60)
    assert "CRITICAL" in log and f"needs metadata version {NEW}" in log
    assert f"this software supports 1..{OLD}" in log
    cluster.nodes[victim].env = dict(NEXT_RELEASE)
    cluster.start(victim)
    under_load(f"{victim} back on new", lambda: None)

    result = check_operations(metadata_model(), history.operations(), timeout=60)
    assert result.outcome is CheckOutcome.OK, result.explain(metadata_model())
    elapsed = time.monotonic() - started
    with capsys.disabled():
        print(f"\nversion skew: {len(history.operations())} operations, linearizable, "
              f"{elapsed:.1f} s")
        for step, seconds, ops, offset, sha in figures:
            print(f"  {step:<22} action {seconds:5.2f} s  ops {ops:4d}  offset {offset:5d}  "
                  f"state {sha} (all 3 identical)")


def test_an_old_release_stops_on_a_log_it_cannot_apply(make_cluster: ClusterFactory) -> None:
    # No snapshot here: the old release meets the upgrade in the log it replays.
    cluster = make_cluster(1, app="metadata", settings={"broker_session_timeout": 86_400.0,
                                                        "bootstrap_metadata_version": 1})
    node = cluster.nodes["n1"]
    node.env = dict(NEXT_RELEASE)
    cluster.start()
    cluster.wait_for_leader()
    client = cluster.client()
    config = str(node.config_path)
    fails(4, rf"unsupported_metadata_version: metadata version {NEW + 1} is not readable by "
             rf"every voter \(n1 reads 1\.\.{NEW}\)", "features", "upgrade",
          "--metadata-version", str(NEW + 1), "--config", config)
    assert ok("features", "upgrade", "--metadata-version", str(NEW), "--config", config) == (
        f"metadata version is {NEW} (voters: n1 reads 1..{NEW})\n")
    [row] = rows(ok("features", "describe", "--config", config))
    assert row[:4] == ["n1", node.api_address, f"1..{NEW}", str(NEW)]
    fails(4, f"invalid_metadata_version: metadata version 1 is below the finalized {NEW}",
          "features", "upgrade", "--metadata-version", "1", "--config", config)
    cluster.stop("n1")
    node.env = {}
    cluster.start("n1", wait=False)
    wait_until(lambda: not node.alive, 20, "the old release to stop")
    assert node.proc is not None and node.proc.returncode not in (0, None)
    log = cluster.tail("n1", 60)
    assert ("CRITICAL streambus_consensus.raft.node: n1: cannot apply log entry" in log
            and f"the cluster needs metadata version {NEW}; this software supports 1..{OLD}"
            in log), log
    node.env = dict(NEXT_RELEASE)
    cluster.start("n1")
    cluster.wait_for_leader()
    assert client.request("GET", "/v1/features")["finalized"] == NEW
