"""Fault injection on real node processes, checked for linearizability and durability.

The bounded CI profile: a 3-node and a 5-node cluster, at least 100 faults each
across every fault kind (SIGKILL of the leader, of a random node and of every
node; SIGSTOP of the leader and of a random node past the election timeout;
graceful restarts; the leader isolated, a minority split off, one direction
of a link cut), with 0 linearizability violations, 0 lost acknowledged
operations and 0 duplicates. Then the standing scenario of issue 7 (compaction
every 50 entries, the leader paused for 2-4 election timeouts), short.

Before those, fast tests of the pieces: the link proxy really cuts traffic,
and the checks really catch what they look for.

``STREAMBUS_CHAOS_SEED`` changes the seeds (the default keeps CI reproducible).
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from streambus_consensus.testing.chaos import (
    NETWORK_FAULTS,
    PROCESS_FAULTS,
    ChaosOptions,
    ChaosReport,
    run_chaos,
)
from streambus_consensus.testing.faults import LinkProxy, link_name
from streambus_consensus.testing.linearizability import History
from streambus_consensus.testing.workload import (
    Answer,
    FeedRecorder,
    MetadataWorkload,
    OpRecord,
    check_feeds,
)

SEED = int(os.environ.get("STREAMBUS_CHAOS_SEED", "1126"))


# -- the link proxy (no node processes) ---------------------------------------------------


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A TCP server on loopback that echoes every byte back."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(2)
    listener.close()


def _read(sock: socket.socket, size: int, timeout: float) -> bytes:
    sock.settimeout(timeout)
    received = b""
    try:
        while len(received) < size:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    except TimeoutError:
        pass
    return received


def _echo(sock: socket.socket, payload: bytes, timeout: float) -> bytes:
    sock.sendall(payload)
    return _read(sock, len(payload), timeout)


def test_a_cut_link_carries_nothing_until_healed(echo_server: int) -> None:
    proxy = LinkProxy({link_name("a", "b"): f"127.0.0.1:{echo_server}",
                       link_name("b", "a"): f"127.0.0.1:{echo_server}"})
    ports = proxy.start()
    try:
        with socket.create_connection(("127.0.0.1", ports["a>b"])) as ab, \
                socket.create_connection(("127.0.0.1", ports["b>a"])) as ba:
            assert _echo(ab, b"hello", 2) == b"hello"
            proxy.cut(["a>b"])  # one way: a's link only
            assert _echo(ab, b"lost?", 0.5) == b""
            assert _echo(ba, b"other way", 2) == b"other way"
            with socket.create_connection(("127.0.0.1", ports["a>b"])) as late:
                assert _echo(late, b"new", 0.5) == b"", "new connections must not pass either"
                proxy.heal(["a>b"])
                assert _read(late, 3, 2) == b"new"
            # Held bytes are delivered late, as TCP retransmission would.
            assert _read(ab, 5, 2) == b"lost?"
            assert _echo(ab, b"again", 2) == b"again"
        stats = proxy.stats()
        assert stats["a>b"]["connections"] == 2 and not stats["a>b"]["cut"]
    finally:
        proxy.close()
    assert proxy.process is None


def test_the_proxy_exits_with_its_controller(echo_server: int) -> None:
    proxy = LinkProxy({"a>b": f"127.0.0.1:{echo_server}"})
    proxy.start()
    process = proxy.process
    assert process is not None and process.stdin is not None
    process.stdin.close()  # what the controller's death looks like
    assert process.wait(5) == 0
    proxy.close()


# -- the checks (no node processes) ------------------------------------------------------


def _record(op: tuple[object, ...], outcome: str, output: object = "ok") -> OpRecord:
    return OpRecord(client="c", seq=1, input=op, outcome=outcome, output=output)


def _feeds(per_node: dict[str, dict[int, list[dict[str, object]]]]) -> FeedRecorder:
    recorder = FeedRecorder({n: "127.0.0.1:1" for n in per_node}, None)
    for node, events in per_node.items():
        for offset, changes in events.items():
            recorder.feeds[node].events[offset] = json.dumps(changes, sort_keys=True)
    return recorder


def _created(name: str, topic_id: str) -> dict[str, object]:
    return {"kind": "topic_created", "key": name, "record": {"topic_id": topic_id}}


def test_feed_check_finds_a_command_applied_twice() -> None:
    records = [_record(("create", "t", 1, {}), "ok")]
    once = _feeds({"n1": {5: [_created("t", "id-1")]}, "n2": {5: [_created("t", "id-1")]}})
    assert check_feeds(once, records).ok
    twice = _feeds({"n1": {5: [_created("t", "id-1")], 9: [_created("t", "id-2")]}})
    check = check_feeds(twice, records)
    assert not check.ok and "2 x create of 't'" in check.duplicates[0]
    refused = [_record(("create", "t", 1, {}), "ok", "exists")]
    assert not check_feeds(once, refused).ok, "a refused create cannot have created anything"


def test_feed_check_finds_replicas_that_disagree() -> None:
    recorder = _feeds({"n1": {5: [_created("t", "id-1")]}, "n2": {5: [_created("u", "id-2")]}})
    check = check_feeds(recorder, [_record(("create", "t", 1, {}), "unknown"),
                                   _record(("create", "u", 1, {}), "unknown")])
    assert check.divergent_offsets == (5,)


def _event(offset: int, reset: bool = False) -> dict[str, Any]:
    return {"offset": offset, "reset": reset,
            "changes": [] if reset else [_created(f"t{offset}", f"id-{offset}")]}


def test_feed_recorder_reports_offsets_delivered_again() -> None:
    """A node that answers a poll with an offset at or below the one the
    recorder had (a repeat, or a full image below it) is reported, and the
    recorder's cursor does not move back."""
    answers = [[_event(3, reset=True)], [_event(4), _event(5)], [_event(5)],
               [_event(2, reset=True)], [_event(6)]]
    asked: list[str] = []

    class Feed(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            events = answers.pop(0) if answers else []
            if not answers:
                time.sleep(0.05)
            body = json.dumps({"result": {"events": events}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Feed)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    recorder = FeedRecorder({"n1": f"127.0.0.1:{server.server_address[1]}"}, None, wait=0.1)
    try:
        recorder.start()
        deadline = time.monotonic() + 10
        while recorder.cursor("n1") != 6 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        recorder.stop()
        server.shutdown()
        server.server_close()
    feed = recorder.feeds["n1"]
    assert [(o["offset"], o.get("reset"), o["cursor"]) for o in feed.out_of_order] == [
        (5, False, 5), (2, True, 5)]
    assert sorted(feed.events) == [4, 5, 6] and feed.resets == 1
    assert asked[:5] == ["/v1/watch?wait=0.1", "/v1/watch?wait=0.1&after=3",
                         "/v1/watch?wait=0.1&after=5", "/v1/watch?wait=0.1&after=5",
                         "/v1/watch?wait=0.1&after=5"]
    assert check_feeds(recorder, []).out_of_order == 2


def test_workload_classifies_answers() -> None:
    workload = MetadataWorkload({"n1": "127.0.0.1:1"}, None, History())
    record = _record(("create", "t", 1, {}), "pending")

    def answer(status: int, kind: str = "", code: str = "") -> tuple[str, object]:
        body = {"error": {"type": kind, "code": code}} if status != 200 else {"result": {}}
        return workload._interpret(record.input[0], Answer(status, body), record)

    assert answer(200) == ("ok", "ok")
    assert answer(409, "CommandRefusedError", "topic_exists") == ("ok", "exists")
    assert answer(503, "NotLeaderError", "unavailable") == ("retry", None)
    assert answer(503, "NoLeaderError", "unavailable") == ("retry", None)
    assert answer(504, "ProposalTimeoutError", "outcome_unknown") == ("unknown", None)
    assert answer(500, "NodeStoppedError", "internal") == ("unknown", None)
    assert answer(409, "CommandRefusedError", "request_expired") == ("expired", None)
    assert answer(409, "CommandRefusedError", "not_enough_brokers")[0] == "unexpected"
    assert answer(401, "ApiError", "unauthenticated")[0] == "unexpected"


def test_an_operation_to_a_dead_cluster_fails_and_stays_out_of_the_history() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{server.getsockname()[1]}"
    server.close()  # nothing listens: every attempt is refused before it is sent
    history = History()
    workload = MetadataWorkload({"n1": address}, None, history)
    record = workload.perform("c", ("delete", "t"), deadline=0.3)
    assert record.outcome == "fail" and record.attempts >= 1
    assert history.operations() == []


def test_a_fanned_out_operation_ends_at_the_first_success_while_a_node_hangs() -> None:
    """The chaos probe's write asks every node at once: a node that never answers
    (cut off by the other fault lane) must not hold the outcome for its attempt's
    timeout, and every copy carries the same request id (one operation)."""
    release = threading.Event()
    bodies: list[tuple[str, Any]] = []
    refusals = {"ok": 2}

    class Handler(BaseHTTPRequestHandler):
        def do_DELETE(self) -> None:
            role = self.server.role  # type: ignore[attr-defined]
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null")
            bodies.append((role, body))
            if role == "hang":
                release.wait(10)
                return
            if refusals["ok"]:
                refusals["ok"] -= 1
                self._answer(503, {"error": {"type": "NotLeaderError", "code": "unavailable"}})
            else:
                self._answer(200, {"result": {}})

        def _answer(self, status: int, payload: dict[str, Any]) -> None:
            raw = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args: Any) -> None:
            pass

    servers = {}
    for role in ("hang", "ok"):
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.role = role  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[role] = server
    try:
        nodes = {role: f"127.0.0.1:{s.server_address[1]}" for role, s in servers.items()}
        history = History()
        workload = MetadataWorkload(nodes, None, history)
        record = workload.perform("c", ("delete", "t"), deadline=5.0, timeout=3.0,
                                  nodes=["hang", "ok"], fan_out=True)
        took = record.finished - record.started
        assert record.outcome == "ok", record
        assert took < 1.5, f"waited {took:.2f}s for the node that hangs"
        assert set(record.nodes) == {"hang", "ok"} and record.attempts == 4
        assert [role for role, _ in bodies].count("ok") == 3
        assert len({json.dumps(body["request_id"]) for _, body in bodies}) == 1
        assert len(history.operations()) == 1
    finally:
        release.set()
        for server in servers.values():
            server.shutdown()
            server.server_close()


# -- chaos on real processes ------------------------------------------------------------------


def _run(capsys: pytest.CaptureFixture[str], **kwargs: object) -> ChaosReport:
    report = run_chaos(ChaosOptions(**kwargs))  # type: ignore[arg-type]
    with capsys.disabled():
        print("\n" + report.summary())
        if report.explanation:
            print(report.explanation)
    return report


def _assert_clean(report: ChaosReport) -> None:
    assert report.passed, report.summary() + "\n" + report.explanation
    assert report.log_alarms == []
    assert report.lost_acks == 0 and report.stale_reads == 0 and report.duplicates == 0
    acknowledged = sum(c["ok"] for c in report.op_counts.values())
    assert acknowledged > 200, "too few operations to mean anything"
    recoveries = [f.recovery for f in report.faults]
    assert all(r is not None and math.isfinite(r) for r in recoveries)


@pytest.mark.cluster
@pytest.mark.timeout(600)
@pytest.mark.parametrize("nodes", [3, 5])
def test_ci_chaos_profile(nodes: int, capsys: pytest.CaptureFixture[str]) -> None:
    """At least 100 faults of every kind per cluster size: 200 or more in all."""
    started = time.monotonic()
    report = _run(capsys, duration=240, max_faults=100, seed=SEED + nodes, nodes=nodes,
                  profile="ci")
    _assert_clean(report)
    assert report.faults_total >= 100
    assert {f.kind for f in report.faults} == set(PROCESS_FAULTS) | set(NETWORK_FAULTS)
    assert time.monotonic() - started < 270


@pytest.mark.cluster
@pytest.mark.timeout(400)
def test_compaction_and_leader_pauses_lose_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 7's standing scenario, short: compaction every 50 entries, the leader
    SIGSTOPped for 2-4 election timeouts again and again (half the time after it
    was cut off holding writes it could not commit), reads and writes through the
    log; every acknowledged operation kept, no stale read. With the engine fixes
    disabled this profile fails (docs/testing.md)."""
    report = _run(capsys, duration=50, seed=SEED + 7, nodes=3, profile="compaction-pauses")
    _assert_clean(report)
    assert report.faults_total >= 8
    assert {f.kind for f in report.faults} == {"pause-leader", "pause-isolated-leader"}
    assert report.op_counts["read"]["ok"] > 50
    # The scenario reaches the dangerous path: the E1 guard had to lower commit indexes.
    assert report.engine_fixes.get("engine_commit_clamps_total", 0) > 0


def test_recoveries_measured_under_the_other_lanes_fault_are_told_apart(tmp_path: Path) -> None:
    from streambus_consensus.testing.chaos import Fault

    def fault(lane: str, started: float, healed: float, recovery: float) -> Fault:
        return Fault(kind="pause-random" if lane == "process" else "partition-leader",
                     lane=lane, targets=("n1",), started=started, hold=healed - started,
                     healed=healed, recovery=recovery)

    alone = fault("network", 0.0, 2.0, 0.1)
    during_a_pause = fault("network", 5.0, 7.0, 1.1)
    pause = fault("process", 6.0, 8.0, 0.2)
    report = ChaosReport(options=ChaosOptions(duration=1, seed=1), run_dir=tmp_path,
                         faults=[alone, during_a_pause, pause])
    assert not report.overlapped(alone)
    assert report.overlapped(during_a_pause) and report.overlapped(pause)
    row = next(line for line in report.summary().splitlines()
               if line.startswith("partition-leader"))
    assert row.split()[-2:] == ["1", "0.10s"]


def test_log_alarms_pick_critical_and_error_lines() -> None:
    from streambus_consensus.testing.chaos import log_alarms

    text = "\n".join([
        "2026-12-02 01:24:28,337 CRITICAL pysyncobj.syncobj: truncating already-applied log "
        "entries from index 98 (last applied: 98) - state machine may have diverged",
        "2026-12-02 01:24:28,338 INFO streambus_consensus.raft.node: n1: leader is now n2",
        "2026-12-02 01:24:28,339 ERROR streambus_consensus.raft.node: n1: state machine raised",
        "2026-12-02 01:24:28,340 WARNING streambus_consensus.raft.transport: an ERROR here",
        "    Traceback (most recent call last):",
    ])
    assert [line.split()[2] for line in log_alarms(text)] == ["CRITICAL", "ERROR"]


def test_profiles_cover_every_fault_kind() -> None:
    from streambus_consensus.testing.chaos import PROFILES

    ci = PROFILES["ci"]
    kinds = {k for k, _ in ci.process_faults} | {k for k, _ in ci.network_faults}
    assert kinds == set(PROCESS_FAULTS) | set(NETWORK_FAULTS)
    assert PROFILES["compaction-pauses"].settings["snapshot_interval_entries"] == 50


def test_run_chaos_validates_its_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown profile"):
        run_chaos(ChaosOptions(duration=1, seed=1, profile="nope"))
    with pytest.raises(ValueError, match="at least 3 nodes"):
        run_chaos(ChaosOptions(duration=1, seed=1, nodes=1, keep=tmp_path))
