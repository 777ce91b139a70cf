"""A new cluster starts at a metadata version: the one its nodes' configs
name (``bootstrap_metadata_version``, written by ``cluster init``; by default
the newest the software reads), finalized by the first command its first
leader writes. An existing cluster's version lives in its log: restarts and
config edits never change it, only ``features upgrade`` does."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from streambus_consensus.config import NodeConfig
from streambus_consensus.errors import ConfigError
from streambus_consensus.metadata.commands import (
    BOOTSTRAP_REQUEST_ID,
    SetMetadataVersion,
    decode_command,
    supported_metadata_versions,
)
from streambus_consensus.metadata.feed import WatchedStateMachine
from streambus_consensus.metadata.store import MetadataStore
from streambus_consensus.provision import init_cluster
from streambus_consensus.raft.node import RaftNode
from streambus_consensus.testing.harness import LocalCluster, free_ports, wait_until
from tests.conftest import ClusterFactory
from tests.test_cli import fails, ok

NEWEST = supported_metadata_versions()[1]
SECRET = "bootstrap-test-secret-0123456789"
NODES = {"n1": "127.0.0.1:7001", "n2": "127.0.0.1:7002", "n3": "127.0.0.1:7003"}


def _config(tmp_path: Path, **changes: Any) -> NodeConfig:
    (port,) = free_ports(1)
    return NodeConfig(node_id="n1", cluster={"n1": f"127.0.0.1:{port}"}, cluster_secret=SECRET,
                      data_dir=str(tmp_path / "n1"), **changes)


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize("level", [0, NEWEST + 1, 32767, True, "2", 2.0])
def test_a_bootstrap_version_this_software_does_not_read_is_a_config_error(
        level: Any) -> None:
    config = NodeConfig(node_id="n1", cluster=NODES, cluster_secret=SECRET,
                        bootstrap_metadata_version=level)
    with pytest.raises(ConfigError) as error:
        config.validate()
    assert error.value.field == "bootstrap_metadata_version"
    assert f"must be a metadata version this software reads (1..{NEWEST})" in str(error.value)


@pytest.mark.parametrize("level", [None, *range(1, NEWEST + 1)])
def test_every_version_this_software_reads_is_a_valid_bootstrap_version(
        level: int | None) -> None:
    NodeConfig(node_id="n1", cluster=NODES, cluster_secret=SECRET,
               bootstrap_metadata_version=level).validate()


def test_cluster_init_writes_the_newest_version_unless_told_a_lower_one(tmp_path: Path) -> None:
    files = init_cluster(tmp_path / "new", NODES)
    assert files.metadata_version == NEWEST
    for path in files.configs.values():
        assert NodeConfig.from_toml(path).bootstrap_metadata_version == NEWEST
    older = init_cluster(tmp_path / "mixed", NODES, metadata_version=1)
    assert older.metadata_version == 1
    for path in older.configs.values():
        assert NodeConfig.from_toml(path).validate().bootstrap_metadata_version == 1
    with pytest.raises(ConfigError, match=r"bootstrap_metadata_version=99: must be a metadata "
                                          rf"version this software reads \(1\.\.{NEWEST}\)"):
        init_cluster(tmp_path / "bad", NODES, metadata_version=99)
    assert not (tmp_path / "bad").exists()


def test_the_cli_writes_the_version_and_refuses_one_it_does_not_read(tmp_path: Path) -> None:
    out = ok("cluster", "init", "--nodes", "n1=127.0.0.1:7001", "--dir", str(tmp_path / "a"),
             "--metadata-version", "1")
    assert "the cluster starts at metadata version 1" in out
    config = NodeConfig.from_toml(tmp_path / "a" / "n1.toml")
    assert config.bootstrap_metadata_version == 1
    out = ok("cluster", "init", "--nodes", "n1=127.0.0.1:7001", "--dir", str(tmp_path / "b"))
    assert f"the cluster starts at metadata version {NEWEST}" in out
    fails(2, rf"bootstrap_metadata_version={NEWEST + 1}: must be a metadata version this "
             rf"software reads \(1\.\.{NEWEST}\)",
          "cluster", "init", "--nodes", "n1=127.0.0.1:7001", "--dir", str(tmp_path / "c"),
          "--metadata-version", str(NEWEST + 1))
    assert not (tmp_path / "c").exists()
    # A node whose config asks for a version its software does not read will not start.
    path = tmp_path / "a" / "n1.toml"
    path.write_text(path.read_text().replace("bootstrap_metadata_version = 1",
                                             f"bootstrap_metadata_version = {NEWEST + 1}"))
    fails(2, rf"bootstrap_metadata_version={NEWEST + 1}: must be a metadata version this "
             rf"software reads \(1\.\.{NEWEST}\)", "node", "run", "--config", str(path))


# -- one node in this process ------------------------------------------------------------


def _wait_finalized(store: MetadataStore, level: int) -> None:
    wait_until(lambda: store.image().metadata_version == level, 10,
               f"metadata version {level} applied")


def test_the_first_command_of_a_new_cluster_finalizes_the_configured_version(
        tmp_path: Path) -> None:
    machine = WatchedStateMachine()
    applied: list[tuple[int, bytes]] = []
    apply_at = machine.apply_at

    def recording(index: int, command: bytes) -> Any:
        applied.append((index, command))
        return apply_at(index, command)

    machine.apply_at = recording  # type: ignore[method-assign]
    store = MetadataStore(RaftNode(_config(tmp_path), machine), machine, owns_node=True)
    with store:
        store.start()
        store.node.wait_for_leader(10)
        _wait_finalized(store, NEWEST)
        store.register_broker(0, "b0:9092", fenced=False)
    # The engine's own no-ops never reach the state machine: its first
    # command is the bootstrap one, at the index after the first no-op.
    index, first = applied[0]
    assert decode_command(first) == SetMetadataVersion(request_id=BOOTSTRAP_REQUEST_ID,
                                                       level=NEWEST)
    assert index == 3  # 1: the log's initial no-op, 2: the leader's no-op
    assert [decode_command(c).request_id.client_id for _, c in applied[1:]] == [
        store.client_id]


def test_version_1_needs_no_command_and_a_restart_keeps_the_logged_version(
        tmp_path: Path) -> None:
    config = _config(tmp_path, bootstrap_metadata_version=1)
    with MetadataStore.open(config) as store:
        store.node.wait_for_leader(10)
        broker = store.register_broker(0, "b0:9092", fenced=False)
        assert broker.broker_epoch == 3  # the first command: its log index
        assert store.image().metadata_version == 1
    # The log is no longer pristine: the configured version is not read again.
    with MetadataStore.open(config.clone(bootstrap_metadata_version=None)) as store:
        store.node.wait_for_leader(10)
        assert store.read_image().metadata_version == 1
        store.upgrade_metadata_version(NEWEST)
        assert store.image().metadata_version == NEWEST
    with MetadataStore.open(config) as store:
        store.node.wait_for_leader(10)
        assert store.read_image().metadata_version == NEWEST


# -- real processes ----------------------------------------------------------------------


def _finalized(cluster: LocalCluster) -> dict[str, int]:
    return {node_id: cluster.client(node_id).request("GET", "/v1/features")["finalized"]
            for node_id in cluster.nodes}


def _all_at(cluster: LocalCluster, level: int, timeout: float = 20.0) -> None:
    seen: dict[str, int] = {}

    def check() -> bool:
        seen.update(_finalized(cluster))
        return set(seen.values()) == {level}

    try:
        wait_until(check, timeout, f"every node at metadata version {level}")
    except TimeoutError:
        raise AssertionError(f"finalized versions: {seen}") from None


def test_a_fresh_cluster_finalizes_the_newest_version_without_an_admin_command(
        make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(3, app="metadata", settings={"broker_session_timeout": 86_400.0})
    started = time.monotonic()
    cluster.start()
    leader = cluster.wait_for_leader()
    _all_at(cluster, NEWEST)
    seconds = time.monotonic() - started
    client = cluster.client(leader)
    client.request("POST", "/v1/brokers", {"broker_id": 0, "endpoint": "b0:9092",
                                           "fenced": False})
    # The batched create needs the newest version: a request id names one
    # entry, so it is refused below that version instead of split.
    answer = client.request("POST", "/v1/topics:batch", {
        "topics": [{"name": f"t{i}", "partitions": 1, "replication_factor": 1}
                   for i in range(3)],
        "request_id": {"client_id": "bootstrap-test", "seq": 1}})
    assert answer["created"] == 3
    log = cluster.tail(leader, 200)
    assert re.search(r"new cluster: bootstrap command appended at index \d+", log), log
    for node_id in cluster.nodes:
        assert " ERROR " not in cluster.tail(node_id, 400)
        assert " CRITICAL " not in cluster.tail(node_id, 400)
    print(f"\nfresh 3-node cluster: every node at metadata version {NEWEST} "
          f"{seconds:.2f} s after start")


def test_a_cluster_started_at_version_1_stays_there_across_restarts_until_upgraded(
        make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(3, app="metadata", settings={"broker_session_timeout": 86_400.0,
                                                        "bootstrap_metadata_version": 1})
    cluster.start()
    client = cluster.client(cluster.wait_for_leader())
    client.request("POST", "/v1/brokers", {"broker_id": 0, "endpoint": "b0:9092",
                                           "fenced": False})
    client.request("POST", "/v1/topics", {"name": "t", "partitions": 1,
                                          "replication_factor": 1})
    _all_at(cluster, 1)

    def restart_all() -> None:
        for node_id in cluster.nodes:
            cluster.stop(node_id)
        cluster.start()
        cluster.wait_for_leader()
        # Every node has applied what was committed before it stopped.
        cluster.client().request("POST", "/v1/topics", {
            "name": f"after-{time.monotonic_ns()}", "partitions": 1, "replication_factor": 1})

    # Whatever the configs say now: the version is in the log.
    for node in cluster.nodes.values():
        text = node.config_path.read_text()
        assert "bootstrap_metadata_version = 1\n" in text
        node.config_path.write_text(text.replace("bootstrap_metadata_version = 1\n",
                                                 f"bootstrap_metadata_version = {NEWEST}\n"))
    restart_all()
    offsets: dict[str, int] = {}

    def settled() -> bool:
        for node_id in cluster.nodes:
            found = cluster.client(node_id).request("GET", "/v1/features")
            offsets[node_id] = found["offset"]
            assert found["finalized"] == 1, (node_id, found)
        return len(set(offsets.values())) == 1

    wait_until(settled, 20, "every node at the same offset")
    answer = cluster.client().request("POST", "/v1/features", {"metadata_version": NEWEST})
    assert answer["finalized"] == NEWEST
    _all_at(cluster, NEWEST)
    restart_all()
    _all_at(cluster, NEWEST)
