"""Shared fixtures: real node processes on loopback, always cleaned up."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from streambus_consensus.testing.harness import LocalCluster

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
