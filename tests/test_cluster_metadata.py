"""StreamBus metadata on real node processes (``node run --app metadata``) over HTTP.

What the broker relies on, shown on three processes on loopback: topics
created on any node are seen by every node; a create retried across a leader
kill applies once; a broker that stops heartbeating is fenced and its
partitions get new leaders; a watcher on a surviving node sees every change
once, in order, across a leader change; bad arguments get a clear 400.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from streambus_consensus.api import sign_request
from streambus_consensus.client import ApiClient
from streambus_consensus.errors import CommandRefusedError, ConsensusError
from streambus_consensus.testing.harness import LocalCluster, wait_until
from tests.conftest import ClusterFactory

pytestmark = pytest.mark.cluster

SESSION = 2.0
"""Broker session timeout of every cluster here (KRaft's default is 9 s)."""

SETTINGS = {"broker_session_timeout": SESSION}


def start(make_cluster: ClusterFactory) -> tuple[LocalCluster, str]:
    """A started three-node metadata cluster and its leader."""
    cluster = make_cluster(3, app="metadata", settings=SETTINGS)
    cluster.start()
    return cluster, cluster.wait_for_leader()


def raw(cluster: LocalCluster, node_id: str, method: str, path: str,
        body: bytes = b"") -> tuple[int, Any]:
    """One signed request with exactly these body bytes: the status and the JSON answer."""
    conn = send(cluster, node_id, method, path, body)
    try:
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def send(cluster: LocalCluster, node_id: str, method: str, path: str,
         body: bytes) -> http.client.HTTPConnection:
    """Send a signed request and return the connection, without reading the answer."""
    assert cluster.secret is not None
    timestamp = f"{time.time():.3f}"
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)),
               "X-SBC-Timestamp": timestamp,
               "X-SBC-Signature": sign_request(cluster.secret, method, path, timestamp, body)}
    conn = http.client.HTTPConnection("127.0.0.1", cluster.nodes[node_id].api_port, timeout=10)
    conn.request(method, path, body=body, headers=headers)
    return conn


def until_answered(client: ApiClient, method: str, path: str, body: Any,
                   timeout: float = 20.0) -> Any:
    """Send the same request until it has an answer, as a careful client does.

    Retries only retriable errors (no leader, node down, outcome unknown); a
    refusal or a bad request is raised at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.request(method, path, body)
        except ConsensusError as exc:
            if not exc.retriable or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


class Brokers:
    """StreamBus brokers as the metadata cluster sees them: each registers over
    HTTP, then heartbeats (``POST /v1/brokers/{id}/heartbeat``) every
    ``interval`` from a thread, through any node that answers."""

    def __init__(self, cluster: LocalCluster, count: int, interval: float = SESSION / 5) -> None:
        self.cluster = cluster
        self.epochs: dict[int, int] = {}
        self.silent: set[int] = set()
        self._interval = interval
        self._stop = threading.Event()
        client = cluster.client(*cluster.running())
        for broker_id in range(count):
            broker = until_answered(client, "POST", "/v1/brokers", {
                "broker_id": broker_id, "endpoint": f"broker{broker_id}.test:9092",
                "rack": f"rack-{broker_id}"})
            assert broker["state"] == "fenced", "brokers register fenced"
            self.epochs[broker_id] = broker["broker_epoch"]
        self._thread = threading.Thread(target=self._run, name="test-brokers", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        client = self.cluster.client(*self.cluster.running(), timeout=2)
        while not self._stop.wait(self._interval):
            for broker_id, epoch in list(self.epochs.items()):
                if broker_id in self.silent:
                    continue
                with contextlib.suppress(ConsensusError, OSError):
                    client.request("POST", f"/v1/brokers/{broker_id}/heartbeat",
                                   {"broker_epoch": epoch})

    def wait_active(self, node_id: str, timeout: float = 10.0) -> None:
        """Wait until ``node_id`` sees every broker active (the controller unfenced them)."""
        client = self.cluster.client(node_id)

        def active() -> bool:
            brokers = client.request("GET", "/v1/brokers")["brokers"]
            return {b["broker_id"] for b in brokers if b["state"] == "active"} == set(self.epochs)

        wait_until(active, timeout, "every broker to be unfenced")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def brokers() -> Iterator[Callable[[LocalCluster, int], Brokers]]:
    """Start :class:`Brokers`; their heartbeat threads stop when the test ends."""
    made: list[Brokers] = []

    def factory(cluster: LocalCluster, count: int) -> Brokers:
        made.append(Brokers(cluster, count))
        return made[-1]

    yield factory
    for b in made:
        b.close()


def create_body(name: str, seq: int | None = None, client_id: str = "test-client",
                partitions: int = 3) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "partitions": partitions, "replication_factor": 3}
    if seq is not None:
        body["request_id"] = {"client_id": client_id, "seq": seq}
    return body


def watch_events(client: ApiClient, after: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = client.request("GET", f"/v1/watch?after={after}")["events"]
    return events


def created_topics(events: list[dict[str, Any]]) -> list[str]:
    return [c["key"] for e in events for c in e["changes"] if c["kind"] == "topic_created"]


# --------------------------------------------------------------------------


def test_topics_created_on_leader_and_follower_are_visible_on_every_node(
        make_cluster: ClusterFactory, brokers: Callable[[LocalCluster, int], Brokers]) -> None:
    cluster, leader = start(make_cluster)
    follower = next(n for n in cluster.nodes if n != leader)
    brokers(cluster, 3).wait_active(leader)
    made = {
        "on-leader": cluster.client(leader).request("POST", "/v1/topics",
                                                    create_body("on-leader")),
        "on-follower": cluster.client(follower).request("POST", "/v1/topics",
                                                        create_body("on-follower")),
    }
    for name, topic in made.items():
        assert topic["name"] == name and len(topic["partitions"]) == 3
        for node_id in cluster.nodes:
            client = cluster.client(node_id)
            seen = wait_until(lambda c=client, n=name: c.request("GET", f"/v1/topics/{n}"),
                              5, f"{node_id} to see {name}")
            assert seen["topic_id"] == topic["topic_id"]
            assert seen["partitions"] == topic["partitions"]
    for node_id in cluster.nodes:
        names = cluster.client(node_id).request("GET", "/v1/topics?linearizable=1")["topics"]
        assert names == ["on-follower", "on-leader"]


def test_a_create_retried_across_a_leader_kill_applies_once(
        make_cluster: ClusterFactory, brokers: Callable[[LocalCluster, int], Brokers]) -> None:
    cluster, leader = start(make_cluster)
    brokers(cluster, 3).wait_active(leader)
    answered = create_body("answered", seq=1)
    in_flight = create_body("in-flight", seq=2)
    # One create is answered before the kill: a retry must return that very answer.
    first = cluster.client(leader).request("POST", "/v1/topics", answered)
    # The other is sent and the leader is killed before its answer is read: its
    # outcome is unknown (lost, committed, or committed and answered in between).
    conn = send(cluster, leader, "POST", "/v1/topics", json.dumps(in_flight).encode())
    cluster.kill(leader)
    try:
        lost_answer: Any = json.loads(conn.getresponse().read()).get("result")
    except (OSError, http.client.HTTPException, ValueError):
        lost_answer = None
    finally:
        conn.close()
    survivors = cluster.client(*cluster.running())
    retried_answered = until_answered(survivors, "POST", "/v1/topics", answered)
    retried_in_flight = until_answered(survivors, "POST", "/v1/topics", in_flight)

    assert retried_answered["topic_id"] == first["topic_id"], "the original result came back"
    if lost_answer is not None:
        assert retried_in_flight["topic_id"] == lost_answer["topic_id"]
    for seq, (name, topic) in enumerate((("answered", retried_answered),
                                         ("in-flight", retried_in_flight)), start=3):
        seen = survivors.request("GET", f"/v1/topics/{name}?linearizable=1")
        assert seen["topic_id"] == topic["topic_id"]
        status, refused = raw(cluster, cluster.running()[0], "POST", "/v1/topics",
                              json.dumps(create_body(name, seq=seq)).encode())
        assert status == 409 and refused["error"]["code"] == "topic_exists", refused
    for node_id in cluster.running():  # the log holds each create exactly once
        events = watch_events(cluster.client(node_id), 0)
        assert not any(e["reset"] for e in events)
        assert sorted(created_topics(events)) == ["answered", "in-flight"]
    assert survivors.request("GET", "/v1/topics?linearizable=1")["topics"] == [
        "answered", "in-flight"]


def test_a_broker_that_stops_heartbeating_is_fenced_and_its_partitions_move(
        make_cluster: ClusterFactory, brokers: Callable[[LocalCluster, int], Brokers]) -> None:
    cluster, leader = start(make_cluster)
    fleet = brokers(cluster, 3)
    fleet.wait_active(leader)
    client = cluster.client(leader)
    before = {p["index"]: p for p in client.request(
        "POST", "/v1/topics", create_body("moving", partitions=6))["partitions"]}
    victim = 1
    led = [i for i, p in before.items() if p["leader"] == victim]
    assert led, "the victim leads something"

    fleet.silent.add(victim)
    silenced = time.monotonic()
    wait_until(lambda: client.request("GET", f"/v1/brokers/{victim}")["state"] == "fenced",
               SESSION * 4, "the silent broker to be fenced")
    assert time.monotonic() - silenced >= SESSION * 0.8 - 0.1, "fenced before its session ended"
    for node_id in cluster.nodes:
        node = cluster.client(node_id)
        wait_until(lambda c=node: c.request("GET", f"/v1/brokers/{victim}")["state"] == "fenced",
                   5, f"{node_id} to apply the fencing")
        after = {p["index"]: p for p in node.request("GET", "/v1/topics/moving")["partitions"]}
        for i, p in after.items():
            assert p["leader"] != victim and victim not in p["isr"], p
            assert p["partition_epoch"] > before[i]["partition_epoch"], "every epoch moved on"
            if i in led:
                assert p["leader"] in (0, 2), "a new leader from the active ISR"
                assert p["leader_epoch"] == before[i]["leader_epoch"] + 1
            else:
                assert p["leader"] == before[i]["leader"]
    states = {b["broker_id"]: b["state"] for b in client.request("GET", "/v1/brokers")["brokers"]}
    assert states == {0: "active", 1: "fenced", 2: "active"}

    fleet.silent.discard(victim)  # it comes back: unfenced, though it leads nothing yet
    wait_until(lambda: client.request("GET", f"/v1/brokers/{victim}")["state"] == "active",
               SESSION * 4, "the returning broker to be unfenced")


def test_a_watcher_sees_every_change_once_in_order_across_a_leader_change(
        make_cluster: ClusterFactory, brokers: Callable[[LocalCluster, int], Brokers]) -> None:
    cluster, leader = start(make_cluster)
    watched = next(n for n in cluster.nodes if n != leader)  # never killed
    brokers(cluster, 3).wait_active(leader)
    watcher_client = cluster.client(watched, timeout=10)
    start_offset = watcher_client.request("GET", "/v1/topics")["offset"]
    events: list[dict[str, Any]] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def watch() -> None:
        after = start_offset
        while not stop.is_set():
            try:
                got = watcher_client.request("GET", f"/v1/watch?after={after}&wait=2")["events"]
            except (ConsensusError, OSError) as exc:  # not expected: the node stays up
                errors.append(exc)
                time.sleep(0.1)
                continue
            events.extend(got)
            if got:
                after = got[-1]["offset"]

    watcher = threading.Thread(target=watch, name="test-watcher")
    watcher.start()
    acknowledged: list[str] = []
    try:
        writer = cluster.client(*cluster.nodes, timeout=10)
        for i in range(30):
            if i == 10:
                cluster.kill(leader)
            name = f"w-{i:02d}"
            until_answered(writer, "POST", "/v1/topics",
                           create_body(name, seq=i + 1, client_id="watch-test", partitions=1))
            acknowledged.append(name)
        assert cluster.wait_for_leader(10) != leader
        wait_until(lambda: len(created_topics(events)) >= len(acknowledged), 10,
                   "the watcher to catch up")
    finally:
        stop.set()
        watcher.join(10)
    assert not errors, errors
    offsets = [e["offset"] for e in events]
    assert all(a < b for a, b in itertools.pairwise(offsets)), (
        "offsets strictly increase: in log order, none twice")
    assert offsets[0] > start_offset
    assert not any(e["reset"] for e in events), "the watcher never fell behind"
    assert created_topics(events) == acknowledged, "every acknowledged create, once, in order"
    partitions = [tuple(c["key"]) for e in events for c in e["changes"]
                  if c["kind"] == "partition_created"]
    assert partitions == [(name, 0) for name in acknowledged]


BAD_REQUESTS: list[tuple[str, str, str, bytes, str]] = [
    ("bad json", "POST", "/v1/topics", b'{"name": "t", "partitions": ', "not JSON"),
    ("not an object", "POST", "/v1/topics", b'["t", 1, 1]', "must be an object"),
    ("missing field", "POST", "/v1/topics", b'{"name": "t", "partitions": 1}',
     "'replication_factor'"),
    ("wrong type", "POST", "/v1/topics",
     b'{"name": "t", "partitions": "3", "replication_factor": 1}', "'partitions'"),
    ("bool for int", "POST", "/v1/topics",
     b'{"name": "t", "partitions": true, "replication_factor": 1}', "'partitions'"),
    ("null name", "POST", "/v1/topics",
     b'{"name": null, "partitions": 1, "replication_factor": 1}', "'name'"),
    ("out of range", "POST", "/v1/topics",
     b'{"name": "t", "partitions": 1099511627776, "replication_factor": 1}', "partitions"),
    ("config value type", "POST", "/v1/topics",
     b'{"name": "t", "partitions": 1, "replication_factor": 1, "config": {"retention.ms": []}}',
     "retention.ms"),
    ("config not object", "POST", "/v1/topics",
     b'{"name": "t", "partitions": 1, "replication_factor": 1, "config": "x"}', "'config'"),
    ("request id shape", "POST", "/v1/topics",
     b'{"name": "t", "partitions": 1, "replication_factor": 1, "request_id": "r-1"}',
     "request_id"),
    ("broker id in path", "POST", "/v1/brokers/one/heartbeat", b'{"broker_epoch": 1}',
     "broker id"),
    ("epoch type", "POST", "/v1/brokers/1/heartbeat", b'{"broker_epoch": "1"}',
     "'broker_epoch'"),
    ("broker id range", "POST", "/v1/brokers", b'{"broker_id": -1, "endpoint": "h:1"}',
     "broker_id"),
    ("isr items", "POST", "/v1/topics/t/partitions/0/isr",
     b'{"leader": 0, "leader_epoch": 0, "isr": ["a"], "partition_epoch": 0}', "new_isr"),
    ("partition index", "POST", "/v1/topics/t/partitions/x/isr",
     b'{"leader": 0, "leader_epoch": 0, "isr": [0], "partition_epoch": 0}', "partition"),
    ("watch after", "GET", "/v1/watch?after=soon", b"", "after"),
    ("watch wait", "GET", "/v1/watch?after=0&wait=nan", b"", "wait"),
]


def test_invalid_arguments_get_one_clear_400_each(
        make_cluster: ClusterFactory, brokers: Callable[[LocalCluster, int], Brokers]) -> None:
    cluster, leader = start(make_cluster)
    node = next(n for n in cluster.nodes if n != leader)  # a follower answers the same way
    client = cluster.client(node)
    brokers(cluster, 1).wait_active(leader)  # heartbeating: the controller leaves it alone
    offset = client.request("GET", "/v1/topics?linearizable=1")["offset"]
    failures = []
    for what, method, path, body, mention in BAD_REQUESTS:
        status, answer = raw(cluster, node, method, path, body)
        error = answer.get("error", {}) if isinstance(answer, dict) else {}
        if not (status == 400 and error.get("code") in ("invalid_argument", "invalid_json")
                and mention in error.get("message", "") and error.get("retriable") is False):
            failures.append((what, status, answer))
    assert not failures, "\n".join(map(str, failures))
    after = client.request("GET", "/v1/topics?linearizable=1")["offset"]
    # Linearizable reads add nothing to the metadata log (a read index, not a command).
    assert after == offset, "no bad request reached the log"

    # Well-formed but refused by the state machine: 409 with the refusal code.
    status, answer = raw(cluster, node, "POST", "/v1/topics", json.dumps(
        {"name": "t", "partitions": 1, "replication_factor": 1,
         "config": {"retention.hours": 1}}).encode())
    assert (status, answer["error"]["code"]) == (409, "invalid_config")
    # Optional fields may be null: "partition": null elects for every partition.
    client.request("POST", "/v1/topics", {"name": "t", "partitions": 2, "replication_factor": 1})
    changed = client.request("POST", "/v1/topics/t/elect", {"partition": None,
                                                            "kind": "preferred"})
    assert changed == {"changed": []}, "already led by their preferred replicas"
    with pytest.raises(CommandRefusedError) as refused:
        client.request("POST", "/v1/topics", {"name": "t", "partitions": 1,
                                              "replication_factor": 1})
    assert refused.value.code == "topic_exists"


def test_long_polls_hold_no_handler_thread_and_all_wake_on_a_change(
        make_cluster: ClusterFactory) -> None:
    """Brokers long-poll ``/v1/watch``. Each poll used to hold one of the
    node's ``api_handler_threads`` (8) for its whole wait, so a ninth watcher,
    and every route that needs a thread (membership, features, snapshots),
    waited for a poll to end. Now polls wait on the event loop."""
    cluster, leader = start(make_cluster)
    node = next(n for n in cluster.nodes if n != leader)
    offset = cluster.client(node).request("GET", "/v1/topics")["offset"]
    watchers = 24  # three times api_handler_threads
    answers: list[tuple[float, list[Any]]] = []
    lock = threading.Lock()

    def poll() -> None:
        client = cluster.client(node, timeout=30)
        try:
            got = client.request("GET", f"/v1/watch?after={offset}&wait=20")["events"]
            with lock:
                answers.append((time.monotonic(), got))
        finally:
            client.close()

    threads = [threading.Thread(target=poll, name=f"test-poll-{i}") for i in range(watchers)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)  # every poll is waiting now
        started = time.monotonic()
        features = cluster.client(node, timeout=10).request("GET", "/v1/features")
        assert time.monotonic() - started < 2.0, "a route that needs a thread waited for polls"
        assert features is not None
        assert not answers, "a poll answered before any change"
        created = time.monotonic()
        cluster.client(leader).request("POST", "/v1/brokers", {
            "broker_id": 7, "endpoint": "broker7.test:9092", "rack": "rack-7"})
    finally:
        for thread in threads:
            thread.join(30)
    assert len(answers) == watchers
    assert all(e[0] - created < 5.0 for e in answers)
    assert all(got and got[0]["offset"] > offset for _, got in answers)
