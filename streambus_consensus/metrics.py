"""Prometheus metrics for a node, named by the Prometheus guide under ``streambus_consensus_``.

Gauges and counters are read at scrape time by :class:`NodeCollector` (nothing
is pushed from the Raft thread); the three histograms (proposal latency,
apply duration, fsync duration) are observed where the work happens, which
costs one lock-protected bucket update each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .interfaces import NodeState
from .raft.node import RaftNode

__all__ = ["PREFIX", "NodeCollector", "NodeMetrics", "metrics_endpoint"]

PREFIX = "streambus_consensus_"

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)
_FAST_BUCKETS = (0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0)


class NodeCollector(Collector):
    """Reads a node's Raft figures when Prometheus scrapes."""

    def __init__(self, node: RaftNode, extra: Callable[[], Iterator[Metric]] | None = None):
        self._node = node
        self._extra = extra

    def collect(self) -> Iterator[Metric]:
        node = self._node
        state = node.state
        labels = ["node_id"]
        nid = [node.node_id]
        g = GaugeMetricFamily(PREFIX + "node_state",
                              "1 for the node's current Raft role", labels=["node_id", "state"])
        for s in NodeState:
            g.add_metric([node.node_id, s.value], 1.0 if s is state else 0.0)
        yield g
        for name, doc, value in (
            ("is_leader", "1 if this node is the leader", state is NodeState.LEADER),
            ("has_leader", "1 if this node knows a leader", node.leader_id is not None),
            ("term", "Current Raft term", node.term),
            ("commit_index", "Highest log index known committed", node.commit_index),
            ("applied_index", "Highest log index applied", node.applied_index),
            ("connected_peers", "Peers with a live authenticated link",
             len(node.connected_peers)),
            ("proposals_pending", "Proposals waiting for an outcome", node.pending_proposals),
            ("last_snapshot_duration_seconds", "Time the last snapshot took",
             node.last_snapshot_seconds),
            ("last_snapshot_size_bytes", "Size of the last snapshot", node.last_snapshot_bytes),
        ):
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            gauge.add_metric(nid, float(value))
            yield gauge
        for name, doc, value in (
            ("leader_changes_seen", "Leader changes seen by this node", node.leader_changes),
            ("proposals_committed", "Proposals applied with an outcome",
             node.proposals_committed),
            ("snapshots", "Snapshots written", node.snapshots_taken),
            ("engine_commit_clamps", "Commit indexes lowered by engine fix E1",
             node.guard.commit_clamps),
            ("engine_stale_appends", "Stale appends answered by engine fix E2",
             node.guard.stale_appends),
        ):
            counter = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            counter.add_metric(nid, float(value))
            yield counter
        failed = CounterMetricFamily(PREFIX + "proposals_failed",
                                     "Proposals that failed, by reason",
                                     labels=["node_id", "reason"])
        for reason, count in sorted(node.proposals_failed.items()):
            failed.add_metric([node.node_id, reason], float(count))
        yield failed
        if self._extra is not None:
            yield from self._extra()


class NodeMetrics:
    """The registry of one node: the collector plus histograms wired into the node."""

    def __init__(
        self,
        node: RaftNode,
        *,
        registry: CollectorRegistry | None = None,
        extra: Callable[[], Iterator[Metric]] | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.registry.register(NodeCollector(node, extra))
        self.proposal_seconds = Histogram(
            PREFIX + "proposal_duration_seconds", "Proposal latency, submit to outcome",
            registry=self.registry, buckets=_LATENCY_BUCKETS)
        self.apply_seconds = Histogram(
            PREFIX + "apply_duration_seconds", "State machine apply time per entry",
            registry=self.registry, buckets=_FAST_BUCKETS)
        self.fsync_seconds = Histogram(
            PREFIX + "fsync_duration_seconds", "Write-ahead log fsync time",
            registry=self.registry, buckets=_FAST_BUCKETS)
        node.proposal_observer = self.proposal_seconds.observe
        node.apply_observer = self.apply_seconds.observe
        node.fsync_observer = self.fsync_seconds.observe

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def metrics_endpoint(node: RaftNode, application: Any) -> Callable[[], tuple[bytes, str]]:
    """Build the node's metrics and return the ``/metrics`` renderer."""
    extra = getattr(application, "collect_metrics", None)
    return NodeMetrics(node, extra=extra).render
