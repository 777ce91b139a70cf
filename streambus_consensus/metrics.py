"""Prometheus metrics for a node, named by the Prometheus guide under ``streambus_consensus_``.

Gauges and counters are read at scrape time by :class:`NodeCollector` from
attributes the node keeps anyway (nothing is pushed from the Raft thread, and
nothing here waits for it). The histograms (proposal latency, apply duration,
fsync duration) are observed where the work happens, which costs one bucket
update each.

Naming: every name starts with :data:`PREFIX`; durations are ``_seconds``,
sizes ``_bytes``; counters are declared without the suffix and
``prometheus_client`` exposes them as ``<name>_total``; every series carries a
``node_id`` label and no label takes unbounded values (``reason`` is an error
class name, ``state`` a role or broker state).

=============================================  ========  ==================================
name (after the prefix)                        type      what
=============================================  ========  ==================================
``build_info{version,pysyncobj}``              gauge     always 1
``node_state{state}``                          gauge     1 for the current Raft role
``is_leader``, ``has_leader``                  gauge     0 or 1
``term``                                       gauge     current Raft term
``commit_index``, ``applied_index``            gauge     log indexes
``connected_peers``                            gauge     peers with a live link
``proposals_pending``                          gauge     proposals waiting for an outcome
``last_snapshot_duration_seconds``             gauge     time the last snapshot took
``last_snapshot_size_bytes``                   gauge     size of the last snapshot
``leader_changes_seen_total``                  counter   leader changes seen
``proposals_committed_total``                  counter   proposals applied
``proposals_failed_total{reason}``             counter   proposals failed, by error class
``entries_applied_total``                      counter   log entries applied here
``proposal_batches_total``                     counter   entries carrying several commands
``batched_commands_total``                     counter   commands proposed in those entries
``read_index_rounds_total``                    counter   leadership confirmations for reads
``snapshots_total``                            counter   snapshots written
``fast_elections_total``                       counter   early elections (leader gone)
``pre_vote_rounds_total``                      counter   pre-votes asked (timer ran out)
``pre_vote_rounds_won_total``                  counter   pre-votes won: elections started
``pre_votes_refused_total``                    counter   pre-votes this node refused
``engine_commit_clamps_total``                 counter   engine fix E1 at work
``engine_stale_appends_total``                 counter   engine fix E2 at work
``engine_conflict_skips_total``                counter   engine fix E22 at work
``members``                                    gauge     voting members (sampled each second)
``learners``                                   gauge     members catching up, not yet voting
``peer_replication_lag_entries{peer}``         gauge     on the leader: entries a peer lacks
``process_*``                                  mixed     memory, open fds, CPU of the process
``proposal_duration_seconds``                  hist.     submit to outcome
``apply_duration_seconds``                     hist.     state machine apply per entry
``fsync_duration_seconds``                     hist.     write-ahead log fsync
``api_connections``                            gauge     open API connections
``api_requests_in_flight``                     gauge     API requests being handled
``api_refused_total{kind}``                    counter   503s at a bound (connections|requests)
``api_request_timeouts_total``                 counter   connections cut: request too slow
=============================================  ========  ==================================

The metadata application adds its own gauges (``metadata_*``) through
``collect_metrics``; see :mod:`streambus_consensus.metadata.service`.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .interfaces import NodeState
from .raft.node import RaftNode

if TYPE_CHECKING:
    from .api import ApiServer

__all__ = ["PREFIX", "NodeCollector", "NodeMetrics", "ProcessMetrics", "api_metrics",
           "metrics_endpoint"]

PREFIX = "streambus_consensus_"
"""The one prefix of every metric name."""

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)
_APPLY_BUCKETS = (0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0)
# etcd's WAL fsync buckets (1 ms doubling to 8 s), with three below 1 ms for fast disks.
_FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064,
                  0.128, 0.256, 0.512, 1.024, 2.048, 4.096, 8.192)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class NodeCollector(Collector):
    """Reads a node's Raft figures when Prometheus scrapes.

    Every value is a single attribute read (or a copy of a small dict), safe
    from the HTTP thread without asking the Raft thread anything.

    Args:
        node: the node to describe.
        extra: more metrics to yield (the application's ``collect_metrics``).
    """

    def __init__(self, node: RaftNode, extra: Callable[[], Iterator[Metric]] | None = None):
        self._node = node
        self._extra = extra
        self._versions = (_version("streambus-consensus"), _version("pysyncobj"))

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family, read now."""
        node = self._node
        node_id = node.node_id
        nid = [node_id]
        info = GaugeMetricFamily(PREFIX + "build_info",
                                 "Versions of this node's software; always 1",
                                 labels=["node_id", "version", "pysyncobj"])
        info.add_metric([node_id, *self._versions], 1.0)
        yield info
        state = node.state
        roles = GaugeMetricFamily(PREFIX + "node_state", "1 for the node's current Raft role",
                                  labels=["node_id", "state"])
        for s in NodeState:
            roles.add_metric([node_id, s.value], 1.0 if s is state else 0.0)
        yield roles
        for name, doc, value in (
            ("is_leader", "1 if this node is the leader", state is NodeState.LEADER),
            ("has_leader", "1 if this node knows a leader", node.leader_id is not None),
            ("term", "Current Raft term", node.term),
            ("commit_index", "Highest log index known committed", node.commit_index),
            ("applied_index", "Highest log index applied", node.applied_index),
            ("connected_peers", "Peers with a live authenticated link", _connected(node)),
            ("proposals_pending", "Proposals waiting for an outcome", node.pending_proposals),
            ("last_snapshot_duration_seconds", "Time the last snapshot took to write",
             node.last_snapshot_seconds),
            ("last_snapshot_size_bytes", "Size of the last snapshot written",
             node.last_snapshot_bytes),
        ):
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=["node_id"])
            gauge.add_metric(nid, float(value))
            yield gauge
        # CounterMetricFamily appends "_total" to these names in the exposition.
        for name, doc, value in (
            ("leader_changes_seen", "Leader changes seen by this node", node.leader_changes),
            ("proposals_committed", "Proposals made on this node that were applied",
             node.proposals_committed),
            ("entries_applied", "Log entries applied to the state machine on this node",
             node.applied_entries),
            ("snapshots", "Snapshots written", node.snapshots_taken),
            ("proposal_batches", "Log entries proposed here carrying several commands",
             node.batches_proposed),
            ("batched_commands", "Commands proposed here inside batch entries",
             node.batched_commands),
            ("read_index_rounds", "Leadership confirmation rounds for linearizable reads, "
             "as leader", node.reads.rounds),
            ("fast_elections", "Elections started early because the leader's address "
             "refused connections", node.fast_elections),
            ("pre_vote_rounds", "Pre-vote rounds started because the election timer ran "
             "out or the leader was gone", node.gate.rounds_started),
            ("pre_vote_rounds_won", "Pre-vote rounds won by a majority: elections this "
             "node started", node.gate.rounds_won),
            ("pre_votes_refused", "Pre-votes this node refused (a live leader, a longer "
             "log or a promise to another candidate)", node.gate.pre_votes_refused),
            ("engine_commit_clamps", "Commit indexes lowered by engine fix E1",
             node.guard.commit_clamps),
            ("engine_stale_appends", "Stale appends answered by engine fix E2",
             node.guard.stale_appends),
            ("engine_conflict_skips", "Conflicting log runs skipped in one round trip by "
             "engine fix E22", node.guard.conflict_skips),
        ):
            counter = CounterMetricFamily(PREFIX + name, doc, labels=["node_id"])
            counter.add_metric(nid, float(value))
            yield counter
        members = GaugeMetricFamily(PREFIX + "members", "Voting members of the cluster",
                                    labels=["node_id"])
        members.add_metric(nid, float(node.member_count))
        yield members
        learners = GaugeMetricFamily(PREFIX + "learners",
                                     "Members catching up before they vote (learners)",
                                     labels=["node_id"])
        learners.add_metric(nid, float(node.learner_count))
        yield learners
        lag = GaugeMetricFamily(PREFIX + "peer_replication_lag_entries",
                                "On the leader: log entries each peer has yet to acknowledge",
                                labels=["node_id", "peer"])
        for peer, behind in sorted(node.replication_lag.items()):  # a whole dict, swapped in
            lag.add_metric([node_id, peer], float(behind))
        yield lag
        failed = CounterMetricFamily(PREFIX + "proposals_failed",
                                     "Proposals made on this node that failed, by error class",
                                     labels=["node_id", "reason"])
        # A copy: the worker thread may add a reason while we iterate.
        for reason, count in sorted(node.proposals_failed.copy().items()):
            failed.add_metric([node_id, reason], float(count))
        yield failed
        if self._extra is not None:
            yield from self._extra()


def _connected(node: RaftNode) -> int:
    # The transport's connection map belongs to the Raft thread; copying it
    # can meet a concurrent change. A scrape must not fail for that: retry.
    for _ in range(3):
        try:
            return len(node.connected_peers)
        except RuntimeError:  # dictionary changed size during iteration
            continue
    return 0


class ProcessMetrics(Collector):
    """prometheus-client's process metrics (resident and virtual memory, open and
    maximum file descriptors, CPU seconds, start time) read from ``/proc`` at
    scrape time, named ``streambus_consensus_process_*`` and labelled with the
    node id like every other series. Empty where ``/proc`` is missing."""

    def __init__(self, node_id: str) -> None:
        self._inner = ProcessCollector(namespace=PREFIX.rstrip("_"), registry=None)
        self._node_id = node_id

    def collect(self) -> Iterator[Metric]:
        """The process collector's families, each sample given a ``node_id`` label."""
        for family in self._inner.collect():
            labelled = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                labelled.add_sample(sample.name, {**sample.labels, "node_id": self._node_id},
                                    sample.value)
            yield labelled


class NodeMetrics:
    """The metrics of one node: the collector plus histograms wired into the node.

    Args:
        node: the node; its ``*_observer`` hooks are set to the histograms.
        registry: where to register (default: a new registry of this node's own,
            never the process-global one, so several nodes can share a process).
        extra: more metrics for the collector (the application's).
    """

    def __init__(
        self,
        node: RaftNode,
        *,
        registry: CollectorRegistry | None = None,
        extra: Callable[[], Iterator[Metric]] | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(NodeCollector(node, extra))
        self.registry.register(ProcessMetrics(node.node_id))
        labels = ["node_id"]
        self.proposal_seconds = Histogram(
            PREFIX + "proposal_duration_seconds",
            "Proposal latency on this node, submit to outcome (success or failure)",
            labels, registry=self.registry, buckets=_LATENCY_BUCKETS).labels(node.node_id)
        self.apply_seconds = Histogram(
            PREFIX + "apply_duration_seconds", "State machine apply time per entry",
            labels, registry=self.registry, buckets=_APPLY_BUCKETS).labels(node.node_id)
        self.fsync_seconds = Histogram(
            PREFIX + "fsync_duration_seconds", "Write-ahead log fsync time",
            labels, registry=self.registry, buckets=_FSYNC_BUCKETS).labels(node.node_id)
        node.proposal_observer = self.proposal_seconds.observe
        node.apply_observer = self.apply_seconds.observe
        node.fsync_observer = self.fsync_seconds.observe

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def metrics_endpoint(node: RaftNode, application: Any, *,
                     api: Callable[[], ApiServer | None] | None = None
                     ) -> Callable[[], tuple[bytes, str]]:
    """Build the node's metrics and return the ``/metrics`` renderer.

    ``application.collect_metrics`` (optional) adds the application's metrics;
    ``api`` (optional) gives the node's API server, whose figures are added.
    """
    application_metrics = getattr(application, "collect_metrics", None)

    def extra() -> Iterator[Metric]:
        if application_metrics is not None:
            yield from application_metrics()
        server = api() if api is not None else None
        if server is not None:
            yield from api_metrics(server, node.node_id)

    return NodeMetrics(node, extra=extra).render


def api_metrics(server: ApiServer, node_id: str) -> Iterator[Metric]:
    """The HTTP front end's figures: connections, requests in flight, refusals."""
    nid = [node_id]
    for name, doc, value in (
        ("api_connections", "Open API connections (refused ones still closing included)",
         server.open_connections),
        ("api_requests_in_flight", "API requests being handled", server.in_flight),
    ):
        gauge = GaugeMetricFamily(PREFIX + name, doc, labels=["node_id"])
        gauge.add_metric(nid, float(value))
        yield gauge
    refused = CounterMetricFamily(PREFIX + "api_refused",
                                  "API connections or requests answered 503 at a bound "
                                  "(api_max_connections, api_max_in_flight)",
                                  labels=["node_id", "kind"])
    refused.add_metric([node_id, "connections"], float(server.refused_connections))
    refused.add_metric([node_id, "requests"], float(server.refused_requests))
    yield refused
    timeouts = CounterMetricFamily(PREFIX + "api_request_timeouts",
                                   "API connections cut because a request did not arrive "
                                   "within api_request_timeout", labels=["node_id"])
    timeouts.add_metric(nid, float(server.timed_out_connections))
    yield timeouts
