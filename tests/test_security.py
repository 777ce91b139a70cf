"""Bad input and hostile peers against real node processes.

- The Raft port and the HTTP API/metrics port get random, truncated,
  oversized and slow (byte-at-a-time) input: the node keeps serving, its
  memory (VmRSS of the process) stays bounded, and the connection is dropped.
- Peers that do not know the cluster secret never reach the engine, and a
  pickle payload that would create a file when unpickled never does. There is
  no secretless mode to fall back to: a node refuses to start without one.
- A peer that knows the secret still cannot make a node buffer more than the
  frame limit per connection, nor hold a frame open by trickling it.
- The HTTP API refuses unsigned and badly signed requests with 401;
  ``/metrics`` answers unsigned and exposes no metadata names or secrets.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import math
import os
import pickle
import random
import re
import resource
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from streambus_consensus import codec
from streambus_consensus.api import sign_request
from streambus_consensus.testing.harness import LocalCluster, free_ports
from streambus_consensus.testing.workload import NodeApi

pytestmark = pytest.mark.cluster

MEMORY_SLACK = 32 << 20
ATTACK_SLACK = 16 << 20
"""Most a node may grow while an authenticated peer streams oversized or trickled frames."""
MAX_PENDING_HANDSHAKES = 64
"""Unauthenticated connections a node holds at once (raft/transport.py)."""
"""Most the node's resident memory may grow over one test's abuse."""
HANDSHAKE_TIMEOUT = 5.0
"""The transport's limit for an unauthenticated connection (raft/transport.py)."""
API_SOCKET_TIMEOUT = 10.0
"""The HTTP server's socket timeout (api.py)."""
SETTINGS = {"broker_session_timeout": 86_400.0}
"""The test's broker never heartbeats; it must stay active."""


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Three metadata nodes with a cluster secret, shared by the module's tests."""
    with LocalCluster(3, tmp_path_factory.mktemp("security"), app="metadata",
                      settings=SETTINGS) as cluster:
        cluster.start()
        cluster.wait_for_leader()
        cluster.client().request("POST", "/v1/brokers", {
            "broker_id": 1, "endpoint": "b1.test:9092", "fenced": False})
        yield cluster


class _Topics:
    count = 0


def assert_serving(cluster: LocalCluster) -> None:
    """A write through the log succeeds and every node is alive."""
    _Topics.count += 1
    cluster.client(timeout=15).request("POST", "/v1/topics", {
        "name": f"alive-{_Topics.count}", "partitions": 1, "replication_factor": 1})
    assert all(node.alive for node in cluster.nodes.values())


def wait_dropped(sock: socket.socket, timeout: float,
                 trickle: bytes = b"", interval: float = 0.5) -> float | None:
    """Seconds until the peer closes ``sock`` (``None``: still open after ``timeout``).

    With ``trickle``, one byte of it is sent every ``interval`` meanwhile.
    """
    started = time.monotonic()
    sock.settimeout(0.05)
    sent = 0
    next_send = started
    while time.monotonic() - started < timeout:
        now = time.monotonic()
        if trickle and sent < len(trickle) and now >= next_send:
            try:
                sock.send(trickle[sent:sent + 1])
            except OSError:
                return now - started
            sent += 1
            next_send = now + interval
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
        if not data:
            return time.monotonic() - started
    return None


def trickle_until_dropped(socks: list[socket.socket], timeout: float,
                          interval: float) -> list[float]:
    """Send one byte on every socket each ``interval`` (never silent, so only a frame
    deadline can end them) until the peer closes it; return when each was closed
    (``time.monotonic()``; ``inf`` if still open after ``timeout``)."""
    closed = [math.inf] * len(socks)
    for sock in socks:
        sock.settimeout(0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and math.inf in closed:
        for i, sock in enumerate(socks):
            if closed[i] != math.inf:
                continue
            try:
                sock.send(b"z")
                if sock.recv(65536) == b"":
                    closed[i] = time.monotonic()
            except BlockingIOError:
                pass
            except OSError:
                closed[i] = time.monotonic()
        time.sleep(interval)
    return closed


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


class _Memory:
    def __init__(self, cluster: LocalCluster, node: str) -> None:
        self.cluster, self.node = cluster, node
        self.before = cluster.rss_bytes(node)

    def assert_bounded(self) -> None:
        grown = self.cluster.rss_bytes(self.node) - self.before
        assert grown < MEMORY_SLACK, f"{self.node} grew by {grown >> 20} MiB"


# -- the Raft port ----------------------------------------------------------------------


def test_random_frames_on_the_raft_port_are_dropped(cluster: LocalCluster) -> None:
    node = cluster.leader() or "n1"
    port = cluster.nodes[node].raft_port
    memory = _Memory(cluster, node)
    rng = random.Random(5)
    socks = []
    for _ in range(40):
        sock = connect(port)
        length = rng.choice([rng.randrange(1 << 32), rng.randrange(64), rng.randrange(4096)])
        sock.sendall(struct.pack(">I", length) + rng.randbytes(rng.randrange(1, 8192)))
        socks.append(sock)
    try:
        for sock in socks:
            assert wait_dropped(sock, HANDSHAKE_TIMEOUT + 5) is not None
    finally:
        for sock in socks:
            sock.close()
    assert_serving(cluster)
    memory.assert_bounded()


def test_oversized_frame_on_the_raft_port_is_dropped_at_once(cluster: LocalCluster) -> None:
    node = cluster.leader() or "n1"
    memory = _Memory(cluster, node)
    for claimed in (0xFFFFFFFF, 64 << 20, 4097):
        with connect(cluster.nodes[node].raft_port) as sock:
            sock.sendall(struct.pack(">I", claimed) + b"x" * 100)
            dropped = wait_dropped(sock, 5)
            assert dropped is not None and dropped < 2, f"claim of {claimed} bytes: {dropped}"
    assert_serving(cluster)
    memory.assert_bounded()


def test_truncated_frame_on_the_raft_port_is_dropped(cluster: LocalCluster) -> None:
    """Half a frame, then silence: dropped after the handshake timeout."""
    node = cluster.leader() or "n1"
    with connect(cluster.nodes[node].raft_port) as sock:
        sock.sendall(struct.pack(">I", 1000) + b"y" * 10)
        dropped = wait_dropped(sock, HANDSHAKE_TIMEOUT + 5)
    assert dropped is not None, "a stalled half frame must not hold a connection forever"
    assert_serving(cluster)


def test_slow_frame_on_the_raft_port_is_dropped(cluster: LocalCluster) -> None:
    node = cluster.leader() or "n1"
    with connect(cluster.nodes[node].raft_port) as sock:
        dropped = wait_dropped(sock, HANDSHAKE_TIMEOUT + 5,
                               trickle=struct.pack(">I", 4000) + b"z" * 4000)
    assert dropped is not None, "an unauthenticated byte-at-a-time sender must be dropped"


def test_many_stalled_connections_keep_memory_bounded(cluster: LocalCluster) -> None:
    node = cluster.leader() or "n1"
    memory = _Memory(cluster, node)
    socks = [connect(cluster.nodes[node].raft_port) for _ in range(200)]
    try:
        for sock in socks:
            with contextlib.suppress(OSError):  # past the cap of pending handshakes: closed
                sock.sendall(struct.pack(">I", 4096) + b"w" * 4000)
        assert_serving(cluster)
        memory.assert_bounded()
        still_open = sum(wait_dropped(sock, 0.1) is None for sock in socks)
        assert still_open <= MAX_PENDING_HANDSHAKES
    finally:
        for sock in socks:
            sock.close()


# -- pickle -------------------------------------------------------------------------------


class _CreatesFile:
    """Unpickling this calls ``open(path, "w")``: the file appears."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return (open, (str(self.path), "w"))


def _evil(path: Path) -> bytes:
    return pickle.dumps(_CreatesFile(path), protocol=2)


def test_pickle_from_an_unauthenticated_peer_is_never_unpickled(
        cluster: LocalCluster, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = _evil(marker)
    node = cluster.nodes[cluster.leader() or "n1"]
    frames = [
        struct.pack("<i", len(zpay := zlib.compress(payload))) + zpay,  # PySyncObj's framing
        struct.pack(">I", len(payload)) + payload,  # ours, as the client hello
        struct.pack(">I", len(payload) + 16) + payload + bytes(16),  # ours, as a MACed frame
    ]
    for frame in frames:
        with connect(node.raft_port) as sock:
            sock.recv(64)  # the server's hello
            sock.sendall(frame)
            wait_dropped(sock, 3)
    # And as the client hello after a proper server hello, with a wrong secret.
    with connect(node.raft_port) as sock:
        session = _handshake(sock, "n2", b"not-the-cluster-secret")
        assert session is None, "a peer with the wrong secret must not be authenticated"
    api = NodeApi(cluster.secret, 5)
    answer = api.call(node.api_address, "POST", "/v1/topics", None)
    assert answer.status != 200
    raw = NodeApi(None, 5)
    assert raw.call(node.api_address, "POST", "/v1/topics", None).status == 401
    time.sleep(0.5)
    assert not marker.exists(), "a pickle from an unauthenticated peer was unpickled"
    assert_serving(cluster)


def _read_frame(sock: socket.socket) -> bytes | None:
    header = b""
    while len(header) < 4:
        chunk = sock.recv(4 - len(header))
        if not chunk:
            return None
        header += chunk
    (length,) = struct.unpack(">I", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            return None
        body += chunk
    return body


def _handshake(sock: socket.socket, claimed_id: str, key: bytes) -> bytes | None:
    """The dialer's side of the transport handshake; the session key, or ``None``."""
    sock.settimeout(5)
    hello = _read_frame(sock)
    assert hello is not None and hello[:4] == b"SBC1"
    server_nonce, client_nonce, ident = hello[4:], os.urandom(16), claimed_id.encode()
    mac = hmac.new(key, b"|".join([b"c", server_nonce, client_nonce, ident]),
                   hashlib.sha256).digest()
    reply = codec.encode((ident, client_nonce, mac))
    sock.sendall(struct.pack(">I", len(reply)) + reply)
    try:
        answer = _read_frame(sock)
    except OSError:
        return None
    if answer is None:
        return None
    return hmac.new(key, b"|".join([b"k", server_nonce, client_nonce]), hashlib.sha256).digest()


def _send_framed(sock: socket.socket, session: bytes, seq: int, payload: bytes) -> None:
    mac = hmac.new(session, struct.pack(">Q", seq) + payload, hashlib.sha256).digest()[:16]
    sock.sendall(struct.pack(">I", len(payload) + 16) + payload + mac)


def test_pickle_from_a_local_process_without_the_secret_is_never_unpickled(
        cluster: LocalCluster, tmp_path: Path) -> None:
    """The attack that owned a secretless cluster, against one started the documented way:
    the empty-key handshake a local process could complete before is refused, and the
    append_entries carrying a pickle that follows goes nowhere."""
    marker = tmp_path / "pwned"
    leader = cluster.wait_for_leader()
    victim = next(n for n in cluster.nodes if n != leader)
    status = cluster.status(victim)
    assert status is not None
    with connect(cluster.nodes[victim].raft_port) as sock:
        session = _handshake(sock, leader, b"")
        assert session is None, "the empty-key handshake must be refused"
        fake_session = hmac.new(b"", b"k", hashlib.sha256).digest()
        entry = b"\x02" + _evil(marker)  # PySyncObj's MEMBERSHIP command type, then pickle
        with contextlib.suppress(OSError):
            _send_framed(sock, fake_session, 0, codec.encode({
                "type": "append_entries", "term": status["term"], "commit_index": 0,
                "entries": [(entry, status["last_log_index"] + 1, status["term"])],
                "prevLogIdx": status["last_log_index"], "prevLogTerm": status["term"]}))
        assert wait_dropped(sock, 5) is not None
    time.sleep(0.5)
    assert not marker.exists(), "a pickle sent by an unauthenticated peer was unpickled"
    assert "failed authentication" in cluster.tail(victim, 50)
    assert_serving(cluster)


def test_a_node_without_a_secret_refuses_to_start_and_says_how_to_make_one(
        tmp_path: Path) -> None:
    raft, api = free_ports(2)
    config = tmp_path / "node.toml"
    config.write_text(f'node_id = "n1"\ndata_dir = "data"\napi_address = "127.0.0.1:{api}"\n'
                      f'[cluster]\nn1 = "127.0.0.1:{raft}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "streambus_consensus", "node", "run", "--config", str(config)],
        capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cluster_secret" in lines[0] and "streambus-consensus cluster init" in lines[0]
    assert not (tmp_path / "data").exists(), "nothing may be created before the refusal"


def test_undecodable_frames_with_a_valid_mac_drop_the_connection(
        cluster: LocalCluster) -> None:
    """Past the handshake, payloads are decoded with the codec: a pickle is garbage."""
    leader = cluster.wait_for_leader()
    victim = next(n for n in cluster.nodes if n != leader)
    for _ in range(5):
        # Posing as the leader replaces its link to the victim; if the real leader
        # redials first, ours is replaced before the frame lands. Then try again.
        with connect(cluster.nodes[victim].raft_port) as sock:
            session = _handshake(sock, leader, cluster.secret.encode())
            assert session is not None
            _send_framed(sock, session, 0, pickle.dumps({"type": "append_entries"}, protocol=2))
            assert wait_dropped(sock, 5) is not None
        if "undecodable message" in cluster.tail(victim, 50):
            break
    assert "undecodable message" in cluster.tail(victim, 50)
    assert_serving(cluster)


def _authenticated(cluster: LocalCluster, victim: str, claimed: str) -> tuple[socket.socket,
                                                                             bytes]:
    sock = connect(cluster.nodes[victim].raft_port)
    session = _handshake(sock, claimed, cluster.secret.encode())
    assert session is not None
    return sock, session


def test_an_authenticated_peer_cannot_grow_a_node_with_big_or_trickled_frames(
        cluster: LocalCluster) -> None:
    """The attack that grew a node by 238 MB (4 frames of 63 MiB held by trickling),
    rerun by a peer that knows the secret, plus frames just under the limit held
    open by trickling until the per-frame deadline drops them."""
    leader = cluster.wait_for_leader()
    victim = next(n for n in cluster.nodes if n != leader)
    claims = [n for n in cluster.nodes if n != victim]
    memory = _Memory(cluster, victim)
    socks: list[socket.socket] = []
    drops: list[float] = []
    try:
        for i in range(4):  # 63 MiB announced: refused from the header, nothing buffered
            sock, _ = _authenticated(cluster, victim, claims[i % len(claims)])
            socks.append(sock)
            with contextlib.suppress(OSError):
                sock.sendall(struct.pack(">I", 63 << 20) + b"x" * 65536)
            dropped = wait_dropped(sock, 5)
            assert dropped is not None and dropped < 2
            drops.append(dropped)
        print(f"frames announcing 63 MiB dropped after "
              f"{', '.join(f'{d * 1000:.0f}' for d in drops)} ms")
        # Frames just under the limit, all but their last 64 bytes, then trickled a
        # byte at a time (at most 40: the frame never completes). Each
        # member has one incoming link and a newer one replaces it, so the members
        # we pose as are paused: otherwise their redials would drop our links before
        # the frame deadline is ever reached, and the test would prove nothing.
        for member in claims:
            cluster.pause(member)
        limit = (2 << 20) + (64 << 10)  # max_frame_bytes with the default sizes
        started = time.monotonic()
        for member in claims:
            sock, _ = _authenticated(cluster, victim, member)
            socks.append(sock)
            with contextlib.suppress(OSError):
                sock.sendall(struct.pack(">I", limit) + b"y" * (limit - 64))
        early = trickle_until_dropped(socks[4:], 1.0, interval=0.3)
        assert early == [math.inf] * len(claims), "a trickled frame was dropped at once"
        grown = cluster.rss_bytes(victim) - memory.before
        print(f"RSS growth of {victim} with {len(claims)} frames held just under the "
              f"limit: {grown / (1 << 20):.1f} MiB")
        assert grown < ATTACK_SLACK, f"{victim} grew by {grown >> 20} MiB"
        held = trickle_until_dropped(socks[4:], 11.0, interval=0.3)
        print(f"trickled frames dropped {', '.join(f'{h - started:.1f}' for h in held)} s "
              f"after they began (peer_frame_timeout 5 s)")
        assert all(4.5 < h - started < 8 for h in held), (
            f"trickled frames were dropped {[h - started for h in held]} s after they "
            f"began: not by the 5 s frame deadline")
    finally:
        for sock in socks:
            sock.close()
        for member in claims:
            cluster.resume(member)
    cluster.wait_for_leader()
    assert_serving(cluster)
    grown = cluster.rss_bytes(victim) - memory.before
    print(f"RSS growth of {victim} over the whole attack: {grown / (1 << 20):.1f} MiB")
    assert grown < ATTACK_SLACK, f"{victim} grew by {grown >> 20} MiB"


# -- the HTTP API / metrics port -------------------------------------------------------------


def _http_status(sock: socket.socket, timeout: float = 5) -> int | None:
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        return None
    if not data.startswith(b"HTTP/"):
        return None
    return int(data.split(b" ", 2)[1])


def test_random_bytes_on_the_api_port_are_dropped(cluster: LocalCluster) -> None:
    node = cluster.leader() or "n1"
    memory = _Memory(cluster, node)
    rng = random.Random(7)
    for _ in range(20):
        with connect(cluster.nodes[node].api_port) as sock:
            sock.sendall(rng.randbytes(rng.randrange(1, 4096)) + b"\r\n\r\n")
            assert wait_dropped(sock, API_SOCKET_TIMEOUT + 5) is not None
    assert_serving(cluster)
    memory.assert_bounded()


def test_oversized_requests_on_the_api_port_are_refused(cluster: LocalCluster) -> None:
    node = cluster.nodes[cluster.leader() or "n1"]
    memory = _Memory(cluster, node.node_id)
    with connect(node.api_port) as sock:
        sock.sendall(b"POST /v1/topics HTTP/1.1\r\nHost: x\r\nContent-Length: 4000000000\r\n\r\n")
        assert _http_status(sock) == 413
        assert wait_dropped(sock, 5) is not None
    with connect(node.api_port) as sock:
        sock.sendall(b"GET /v1/status HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        status = _http_status(sock)
        assert status is None or status >= 400
        assert wait_dropped(sock, 5) is not None
    with connect(node.api_port) as sock:
        sock.sendall(b"GET /" + b"p" * 100_000 + b" HTTP/1.1\r\n\r\n")
        status = _http_status(sock)
        assert status is None or status >= 400
        assert wait_dropped(sock, 5) is not None
    assert_serving(cluster)
    memory.assert_bounded()


def test_truncated_request_on_the_api_port_is_dropped(cluster: LocalCluster) -> None:
    node = cluster.nodes[cluster.leader() or "n1"]
    with connect(node.api_port) as sock:
        sock.sendall(b"POST /v1/topics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"na")
        dropped = wait_dropped(sock, API_SOCKET_TIMEOUT + 5)
    assert dropped is not None, "a request body that never completes must not hold a thread"
    assert_serving(cluster)


def test_slow_request_on_the_api_port_is_dropped(cluster: LocalCluster) -> None:
    node = cluster.nodes[cluster.leader() or "n1"]
    request = b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 200 + b"\r\n\r\n"
    with connect(node.api_port) as sock:
        dropped = wait_dropped(sock, 2 * API_SOCKET_TIMEOUT, trickle=request)
    assert dropped is not None, "a byte-at-a-time client must be dropped"


def test_many_stalled_api_connections_keep_the_node_serving(cluster: LocalCluster) -> None:
    node = cluster.nodes[cluster.leader() or "n1"]
    memory = _Memory(cluster, node.node_id)
    socks = [connect(node.api_port) for _ in range(60)]
    try:
        for sock in socks:
            sock.sendall(b"POST /v1/topics HTTP/1.1\r\nContent-Length: 500000\r\n\r\n"
                         + b"{" * 1000)
        assert_serving(cluster)
        memory.assert_bounded()
    finally:
        for sock in socks:
            sock.close()


# -- HTTP authentication --------------------------------------------------------------------


def _raw_request(address: str, method: str, path: str, headers: dict[str, str],
                 body: bytes = b"") -> int:
    import http.client

    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body=body, headers={**headers,
                                                       "Content-Length": str(len(body))})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_unsigned_and_badly_signed_requests_get_401(cluster: LocalCluster) -> None:
    assert cluster.secret is not None
    address = cluster.nodes["n1"].api_address
    secret = cluster.secret
    body = b'{"name": "forged", "partitions": 1, "replication_factor": 1}'
    now = f"{time.time():.3f}"
    good = sign_request(secret, "POST", "/v1/topics", now, body)
    cases = {
        "unsigned": {},
        "no timestamp": {"X-SBC-Signature": good},
        "garbage timestamp": {"X-SBC-Timestamp": "soon", "X-SBC-Signature": good},
        "wrong secret": {"X-SBC-Timestamp": now, "X-SBC-Signature": sign_request(
            "another-secret-0123456789", "POST", "/v1/topics", now, body)},
        "signature of another body": {"X-SBC-Timestamp": now, "X-SBC-Signature": sign_request(
            secret, "POST", "/v1/topics", now, b"{}")},
        "signature of another path": {"X-SBC-Timestamp": now, "X-SBC-Signature": sign_request(
            secret, "POST", "/v1/brokers", now, body)},
        "replayed a minute later": {
            "X-SBC-Timestamp": (stale := f"{time.time() - 120:.3f}"),
            "X-SBC-Signature": sign_request(secret, "POST", "/v1/topics", stale, body)},
    }
    for name, headers in cases.items():
        assert _raw_request(address, "POST", "/v1/topics", headers, body) == 401, name
    assert _raw_request(address, "GET", "/v1/status", {}) == 401
    assert _raw_request(address, "POST", "/v1/topics",
                        {"X-SBC-Timestamp": now, "X-SBC-Signature": good}, body) == 200
    topics = cluster.client().request("GET", "/v1/topics?linearizable=1")["topics"]
    assert topics.count("forged") == 1
    assert _raw_request(address, "GET", "/metrics", {}) == 200  # Prometheus scrapes openly


ALLOWED_METRIC_LABELS = {"node_id", "state", "reason", "le", "version", "pysyncobj", "peer",
                         "kind", "quantile"}
"""Label names /metrics may use: ids, roles, error classes and histogram buckets only."""


def test_metrics_answer_unsigned_and_expose_no_metadata_or_secrets(
        cluster: LocalCluster) -> None:
    """The documented decision (api.py, docs/operations.md): /metrics needs no signature,
    so it may carry only operational numbers, never names, endpoints or secrets."""
    client = cluster.client()
    client.request("POST", "/v1/topics", {"name": "payroll-confidential", "partitions": 1,
                                           "replication_factor": 1,
                                           "config": {"retention.ms": 123456789}})
    for node in cluster.nodes.values():
        host, _, port = node.api_address.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            conn.request("GET", "/metrics")  # no signature headers
            response = conn.getresponse()
            text = response.read().decode()
        finally:
            conn.close()
        assert response.status == 200
        assert "streambus_consensus_term" in text
        for secret_or_name in (cluster.secret, "payroll-confidential", "b1.test", "123456789"):
            assert secret_or_name not in text, f"/metrics on {node.node_id} leaks it"
        labels = set(re.findall(r"[{,]([a-z_]+)=\"", text))
        assert labels <= ALLOWED_METRIC_LABELS, labels - ALLOWED_METRIC_LABELS


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_running_out_of_file_descriptors_costs_one_log_line_not_a_spin(
        make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(1, app="kv")
    cluster.start()
    cluster.wait_for_leader()
    pid = cluster.pid("n1")
    assert pid is not None
    original = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 8, original[1]))
    socks: list[socket.socket] = []
    try:
        for _ in range(40):
            with contextlib.suppress(OSError):
                socks.append(connect(cluster.nodes["n1"].raft_port))
        started = _cpu_seconds(pid)
        time.sleep(3.0)  # the listener stays readable all this time
        busy = _cpu_seconds(pid) - started
    finally:
        for sock in socks:
            sock.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, original)
    assert busy < 1.0, f"the node spun: {busy:.2f} s of CPU in 3 s"
    lines = [line for line in cluster.tail("n1", 200).splitlines() if "accept failed" in line]
    assert 1 <= len(lines) <= 2, lines
    cluster.client().request("PUT", "/v1/kv/after-emfile", {"value": "ok"})
