"""Shared fixtures: real node processes on loopback, always cleaned up."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from streambus_consensus.raft.node import RaftNode
from streambus_consensus.testing.harness import LocalCluster, free_ports, wait_until

ClusterFactory = Callable[..., LocalCluster]

# A suite started in the background by a shell without job control (`make
# test &`, nohup) inherits SIGINT ignored, and so would every CLI process it
# starts: the tests that stop a `brokers heartbeat --every` loop with Ctrl-C
# (SIGINT) would wait for it forever. Children of a process that handles the
# signal start with the default disposition again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def make_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ClusterFactory]:
    """Build LocalClusters that are killed (every process) when the test ends.

    On failure the tail of each node's log is printed, so the cause is in the
    test report.
    """
    clusters: list[LocalCluster] = []

    def factory(size: int = 3, **kwargs: Any) -> LocalCluster:
        cluster = LocalCluster(size, tmp_path / f"cluster{len(clusters)}", **kwargs)
        clusters.append(cluster)
        return cluster

    yield factory
    failed = getattr(request.node, "rep_call", None)
    for cluster in clusters:
        cluster.close()
        if failed is not None and failed.failed:
            for node_id, path in cluster.logs():
                print(f"--- {node_id} log ({path}) ---")
                print(cluster.tail(node_id, 40))


@pytest.fixture(scope="module")
def metadata_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Three metadata node processes shared by a module's tests (brokers stay
    registered: a session timeout of 600 s)."""
    local = LocalCluster(3, tmp_path_factory.mktemp("metadata"), app="metadata",
                         settings={"broker_session_timeout": 600.0})
    try:
        local.start()
        local.wait_for_leader()
        yield local
    finally:
        local.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report


def loopback_cluster(size: int = 3) -> dict[str, str]:
    """``{node_id: address}`` for ``size`` in-process nodes on free loopback ports."""
    return {f"n{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(free_ports(size))}


@contextlib.contextmanager
def started(nodes: Mapping[str, RaftNode], timeout: float = 10.0) -> Iterator[str]:
    """Start every node and wait until all of them know the same leader
    (yielded); stop every node afterwards, also when starting failed."""
    try:
        for node in nodes.values():
            node.start()
        leader = next(iter(nodes.values())).wait_for_leader(timeout)
        wait_until(lambda: all(n.leader_id == leader for n in nodes.values()), timeout,
                   "every node to know the leader")
        yield leader
    finally:
        for node in nodes.values():
            node.stop()
