"""TcpTransport on loopback: authenticated connections, held-until-release
delivery in order, reconnects, and hostile clients that cost only their own
connection.

All transports are polled from the test thread (``Net.pump``), so there is no
locking to get wrong and every wait is a bounded loop. ``RawClient`` speaks
the wire protocol from the module docstring by hand, to send what a real
transport never would.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import pickle
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from streambus_consensus import codec
from streambus_consensus.errors import ConfigError, TransportError
from streambus_consensus.raft import transport as transport_module
from streambus_consensus.raft.transport import TcpTransport
from streambus_consensus.testing.harness import free_ports

SECRET = "unit-test-cluster-secret-0123456789"
OTHER_SECRET = "a-different-cluster-secret-987654"
MAX_MESSAGE = 64 * 1024
_LEN = struct.Struct(">I")


def free_port() -> int:
    return free_ports(1)[0]


def addresses(*node_ids: str) -> dict[str, str]:
    """Distinct free ports: all are held at once while they are picked."""
    ports = free_ports(len(node_ids))
    return {n: f"127.0.0.1:{port}" for n, port in zip(node_ids, ports, strict=True)}


@dataclass
class Peer:
    """A transport and everything its callbacks reported."""

    node_id: str
    address: str
    transport: TcpTransport
    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    connected: list[str] = field(default_factory=list)
    disconnected: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    closed: bool = False

    def received_from(self, sender: str) -> list[dict[str, Any]]:
        return [m for s, m in self.messages if s == sender]

    def close(self) -> None:
        self.transport.close()
        self.closed = True


class RawClient:
    """A hand-driven TCP client speaking (or abusing) the documented protocol."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=2.0)
        self.sock.setblocking(False)
        self.inbuf = bytearray()
        self.eof = False
        self.session_key = b""
        self.send_seq = 0

    def poll(self) -> None:
        while not self.eof:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError:  # reset by the server
                self.eof = True
                return
            if not data:
                self.eof = True
                return
            self.inbuf += data

    def send(self, data: bytes) -> None:
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        except OSError:
            self.eof = True  # the server already hung up
        finally:
            self.sock.setblocking(False)

    def take_frame(self) -> bytes | None:
        if len(self.inbuf) < 4:
            return None
        (length,) = _LEN.unpack_from(self.inbuf, 0)
        if len(self.inbuf) < 4 + length:
            return None
        frame = bytes(self.inbuf[4 : 4 + length])
        del self.inbuf[: 4 + length]
        return frame

    def frame(self, payload: bytes, *, mac: bytes | None = None) -> bytes:
        """An authenticated frame: u32 length | payload | HMAC(session, seq | payload)[:16]."""
        if mac is None:
            mac = hmac.new(self.session_key, struct.pack(">Q", self.send_seq) + payload,
                           hashlib.sha256).digest()[:16]
        self.send_seq += 1
        return _LEN.pack(len(payload) + len(mac)) + payload + mac

    def close(self) -> None:
        self.sock.close()


class Net:
    """Transports and raw clients on loopback, pumped from the test thread."""

    def __init__(self) -> None:
        self.peers: dict[str, Peer] = {}
        self.raw: list[RawClient] = []
        self._all: list[Peer] = []

    def start(self, node_id: str, cluster: Mapping[str, str], *, secret: str = SECRET,
              address: str | None = None, **options: Any) -> Peer:
        address = address or cluster[node_id]
        options.setdefault("max_frame_bytes", MAX_MESSAGE)
        options.setdefault("ping_interval", 0.05)
        options.setdefault("dead_timeout", 1.0)
        options.setdefault("retry_interval", 0.05)
        transport = TcpTransport(node_id, address, dict(cluster), secret=secret, **options)
        peer = Peer(node_id, address, transport)
        self._all.append(peer)
        self.peers[node_id] = peer
        try:
            transport.start(
                lambda sender, message: peer.messages.append((sender, dict(message))),
                peer.connected.append,
                peer.disconnected.append,
                peer.refused.append,
            )
        except BaseException:
            peer.close()
            raise
        return peer

    def cluster(self, *node_ids: str, **options: Any) -> dict[str, Peer]:
        members = addresses(*node_ids)
        started = {n: self.start(n, members, **options) for n in node_ids}
        self.pump(lambda: all(p.transport.connected_peers() == set(members) - {n}
                              for n, p in started.items()), what="full mesh")
        return started

    def raw_client(self, address: str) -> RawClient:
        client = RawClient(address)
        self.raw.append(client)
        return client

    def _poll_once(self) -> None:
        for peer in self._all:
            if not peer.closed:
                peer.transport.poll(0.002)
        for client in self.raw:
            client.poll()

    def pump(self, until: Callable[[], bool], *, timeout: float = 5.0, what: str = "it") -> None:
        """Poll everything until ``until()`` holds; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self._poll_once()
            if until():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def pump_for(self, seconds: float) -> None:
        """Poll everything for ``seconds`` (for checking that something does NOT happen)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._poll_once()

    def close(self) -> None:
        for client in self.raw:
            client.close()
        for peer in self._all:
            if not peer.closed:
                peer.close()


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net()
    try:
        yield n
    finally:
        n.close()


def exchange(net: Net, a: Peer, b: Peer, tag: str) -> None:
    """Assert a and b can still talk both ways."""
    assert a.transport.send(b.node_id, {"type": "probe", "tag": tag})
    assert b.transport.send(a.node_id, {"type": "probe", "tag": tag})
    a.transport.release()
    b.transport.release()
    net.pump(lambda: {"type": "probe", "tag": tag} in b.received_from(a.node_id)
             and {"type": "probe", "tag": tag} in a.received_from(b.node_id),
             what=f"probe {tag} both ways")


def authenticate(net: Net, client: RawClient, as_node: str, secret: str = SECRET) -> None:
    """Run the client side of the documented handshake; the server must accept it."""
    key = secret.encode()
    net.pump(lambda: len(client.inbuf) >= 4 + 20, what="server hello")
    hello = client.take_frame()
    assert hello is not None and hello[:4] == transport_module.PROTOCOL and len(hello) == 20
    nonce_s, nonce_c, ident = hello[4:], os.urandom(16), as_node.encode()
    mac = hmac.new(key, b"|".join((b"c", nonce_s, nonce_c, ident)), hashlib.sha256).digest()
    client.send(_LEN.pack(len(payload := codec.encode((ident, nonce_c, mac)))) + payload)
    net.pump(lambda: len(client.inbuf) >= 4 + 32 or client.eof, what="server proof")
    proof = client.take_frame()
    expected = hmac.new(key, b"|".join((b"s", nonce_c, nonce_s)), hashlib.sha256).digest()
    assert proof == expected, "server did not prove it knows the secret"
    client.session_key = hmac.new(key, b"|".join((b"k", nonce_s, nonce_c)),
                                  hashlib.sha256).digest()


class _CreatesFile:
    """Unpickling this object calls open(path, "w"): a file appears."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def evil_pickle(path: Path) -> bytes:
    return pickle.dumps(_CreatesFile(str(path)))


# -- connecting ---------------------------------------------------------------

def test_full_mesh_connects_and_reports_each_peer_once(net: Net) -> None:
    peers = net.cluster("a", "b", "c")
    net.pump_for(0.3)  # several ping intervals: nothing flaps
    for node_id, peer in peers.items():
        others = {"a", "b", "c"} - {node_id}
        assert peer.transport.connected_peers() == others
        assert sorted(peer.connected) == sorted(others)
        assert peer.disconnected == []
        assert peer.messages == []  # pings are not messages
        assert peer.transport.dropped_connections == 0


def test_nothing_is_connected_before_the_peer_exists(net: Net) -> None:
    cluster = addresses("a", "b")
    a = net.start("a", cluster)
    net.pump_for(0.2)
    assert a.transport.connected_peers() == frozenset()
    assert a.transport.send("b", {"type": "x"}) is False
    assert a.transport.send("nobody", {"type": "x"}) is False
    b = net.start("b", cluster)
    net.pump(lambda: a.transport.connected_peers() == {"b"}
             and b.transport.connected_peers() == {"a"}, what="late peer")
    assert a.connected == ["b"] and b.connected == ["a"]


@pytest.mark.parametrize("secret", [None, ""])
def test_there_is_no_transport_without_a_secret(secret: Any) -> None:
    """An empty key would let any local process complete the handshake as a member."""
    with pytest.raises(ConfigError, match="cluster_secret"):
        TcpTransport("a", f"127.0.0.1:{free_port()}", {}, secret=secret)


# -- sending --------------------------------------------------------------------

def test_messages_are_held_until_release(net: Net) -> None:
    peers = net.cluster("a", "b", "c")
    a, b, c = peers["a"], peers["b"], peers["c"]
    message = {"type": "append", "term": 3, "entries": [(b"cmd", 7, 3)], "ok": True}
    assert a.transport.send("b", message) is True
    assert a.transport.send("c", {"type": "vote", "term": 3}) is True
    net.pump_for(0.3)  # pings go out meanwhile; held messages must not
    assert b.messages == [] and c.messages == []
    a.transport.release()
    net.pump(lambda: bool(b.messages) and bool(c.messages), what="released messages")
    assert b.messages == [("a", message)]
    assert c.messages == [("a", {"type": "vote", "term": 3})]
    net.pump_for(0.1)
    assert len(b.messages) == 1  # delivered once


def test_release_sends_only_what_is_held(net: Net) -> None:
    peers = net.cluster("a", "b")
    a, b = peers["a"], peers["b"]
    a.transport.release()  # nothing held: a no-op
    a.transport.send("b", {"type": "one"})
    a.transport.release()
    net.pump(lambda: len(b.messages) == 1, what="first")
    a.transport.send("b", {"type": "two"})
    net.pump_for(0.15)
    assert [m["type"] for _, m in b.messages] == ["one"]
    a.transport.release()
    net.pump(lambda: len(b.messages) == 2, what="second")
    assert [m["type"] for _, m in b.messages] == ["one", "two"]


def test_release_ahead_sends_only_the_leading_ahead_messages_in_order(net: Net) -> None:
    peers = net.cluster("a", "b", "c")
    a, b, c = peers["a"], peers["b"], peers["c"]
    a.transport.send("b", {"type": "append", "n": 1}, ahead=True)
    a.transport.send("b", {"type": "append", "n": 2}, ahead=True)
    a.transport.send("b", {"type": "ack", "n": 3})
    a.transport.send("b", {"type": "append", "n": 4}, ahead=True)  # behind a held ack
    a.transport.send("c", {"type": "vote", "n": 1})
    a.transport.send("c", {"type": "append", "n": 2}, ahead=True)  # behind a held vote
    a.transport.release_ahead()
    net.pump(lambda: len(b.messages) == 2, what="the leading ahead messages")
    net.pump_for(0.15)
    assert [m["n"] for _, m in b.messages] == [1, 2]
    assert c.messages == []
    assert a.transport.sent_ahead == 2
    a.transport.release_ahead()  # nothing is at the front any more
    net.pump_for(0.1)
    assert len(b.messages) == 2 and c.messages == []
    a.transport.release()
    net.pump(lambda: len(b.messages) == 4 and len(c.messages) == 2, what="the rest")
    assert [m["n"] for _, m in b.messages] == [1, 2, 3, 4]
    assert [m["n"] for _, m in c.messages] == [1, 2]
    a.transport.send("b", {"type": "append", "n": 5}, ahead=True)  # the queue is empty again
    a.transport.release_ahead()
    net.pump(lambda: len(b.messages) == 5, what="a new leading ahead message")
    assert a.transport.sent_ahead == 3


def _pad(n: int) -> bytes:
    return bytes([n % 256]) * (n * 97 % 2_000)  # frames of many sizes


def test_delivery_order_is_preserved(net: Net) -> None:
    peers = net.cluster("a", "b", "c")
    a, b, c = peers["a"], peers["b"], peers["c"]
    count = 300
    for seq in range(count):
        assert a.transport.send("b", {"type": "seq", "n": seq, "pad": _pad(seq)})
        assert a.transport.send("c", {"type": "seq", "n": seq})
        if seq % 17 == 0:
            a.transport.release()
            net.pump_for(0.001)
    a.transport.release()
    net.pump(lambda: len(b.messages) == count and len(c.messages) == count, timeout=10,
             what=f"all {count} messages")
    assert [m["n"] for _, m in b.messages] == list(range(count))
    assert [m["n"] for _, m in c.messages] == list(range(count))
    assert all(m["pad"] == _pad(m["n"]) for _, m in b.messages)
    assert a.disconnected == []


def test_large_release_to_a_healthy_peer_is_delivered(net: Net) -> None:
    peers = net.cluster("a", "b")
    a, b = peers["a"], peers["b"]
    chunk = b"z" * (MAX_MESSAGE - 1024)  # each message is within the limit
    for i in range(6):  # ~6 x 63 KiB held: more than 4 x max_frame_bytes in total
        assert a.transport.send("b", {"type": "chunk", "i": i, "data": chunk})
    a.transport.release()
    net.pump(lambda: len(b.messages) == 6 or bool(a.disconnected), what="delivery")
    assert a.disconnected == []
    assert [m["i"] for _, m in b.messages] == list(range(6))


def test_both_directions_are_independent(net: Net) -> None:
    peers = net.cluster("a", "b")
    a, b = peers["a"], peers["b"]
    for i in range(20):
        a.transport.send("b", {"type": "ab", "i": i})
        b.transport.send("a", {"type": "ba", "i": i})
    b.transport.release()
    net.pump(lambda: len(a.messages) == 20, what="b->a")
    assert b.messages == []  # a has not released yet
    a.transport.release()
    net.pump(lambda: len(b.messages) == 20, what="a->b")
    assert [m["i"] for _, m in a.messages] == list(range(20))
    assert all(sender == "b" and m["type"] == "ba" for sender, m in a.messages)


# -- restarts and membership ----------------------------------------------------------

def test_peer_restart_reconnects(net: Net) -> None:
    peers = net.cluster("a", "b", "c")
    a, b = peers["a"], peers["b"]
    cluster = {p.node_id: p.address for p in peers.values()}
    b.close()
    net.pump(lambda: "b" not in a.transport.connected_peers() and a.disconnected == ["b"]
             and peers["c"].disconnected == ["b"], what="b's departure noticed")
    assert a.transport.send("b", {"type": "lost"}) is False
    b2 = net.start("b", cluster)  # same port, right away
    net.pump(lambda: a.transport.connected_peers() == {"b", "c"}
             and b2.transport.connected_peers() == {"a", "c"}, what="b back")
    assert a.connected.count("b") == 2
    exchange(net, a, b2, "after-restart")
    assert b2.received_from("a") == [{"type": "probe", "tag": "after-restart"}]


def test_remove_peer_drops_the_connection(net: Net) -> None:
    peers = net.cluster("a", "b", "c")
    a, b, c = peers["a"], peers["b"], peers["c"]
    a.transport.remove_peer("b")
    assert a.transport.connected_peers() == {"c"}
    assert a.transport.send("b", {"type": "x"}) is False
    # b loses its link to a and, no longer a member for a, cannot get back in.
    net.pump(lambda: b.disconnected == ["a"] and a.transport.dropped_connections >= 1,
             what="b refused by a")
    net.pump_for(0.2)
    assert "a" not in b.transport.connected_peers()
    assert b.connected == ["a", "c"]
    exchange(net, a, c, "a-c still fine")
    a.transport.add_peer("b", b.address)
    net.pump(lambda: a.transport.connected_peers() == {"b", "c"}
             and "a" in b.transport.connected_peers(), what="b re-added")
    exchange(net, a, b, "re-added")


def test_close_is_idempotent_and_releases_the_port(net: Net) -> None:
    peers = net.cluster("a", "b")
    a, b = peers["a"], peers["b"]
    cluster = {"a": a.address, "b": b.address}
    a.transport.close()
    a.transport.close()
    a.closed = True
    assert a.transport.connected_peers() == frozenset()
    assert a.disconnected == []  # closing ourselves is not a peer event
    a2 = net.start("a", cluster)  # binds the same port at once
    net.pump(lambda: a2.transport.connected_peers() == {"b"}
             and b.connected.count("a") == 2, what="new a connected")
    exchange(net, a2, b, "after-close")


def test_close_before_start_is_harmless() -> None:
    transport = TcpTransport("a", f"127.0.0.1:{free_port()}", {}, secret=SECRET)
    transport.close()
    transport.close()


def test_binding_a_port_in_use_raises_transport_error(net: Net) -> None:
    cluster = addresses("a")
    net.start("a", cluster)
    with pytest.raises(TransportError, match="cannot bind"):
        net.start("a2", {"a2": cluster["a"]})


# -- authentication -----------------------------------------------------------------

def test_wrong_secret_fails_the_handshake(net: Net) -> None:
    cluster = addresses("a", "b")
    a = net.start("a", cluster, secret=SECRET)
    b = net.start("b", cluster, secret=OTHER_SECRET)
    net.pump(lambda: a.transport.dropped_connections >= 2
             and b.transport.dropped_connections >= 2, what="handshakes refused")
    assert a.transport.connected_peers() == b.transport.connected_peers() == frozenset()
    assert a.transport.send("b", {"type": "x"}) is False
    assert b.transport.send("a", {"type": "x"}) is False
    a.transport.release()
    b.transport.release()
    net.pump_for(0.2)
    assert a.connected == b.connected == []
    assert a.messages == b.messages == []


def test_unknown_node_id_is_refused(net: Net) -> None:
    peers = net.cluster("a", "b")
    a, b = peers["a"], peers["b"]
    mallory = net.start("mallory", {"mallory": f"127.0.0.1:{free_port()}", "a": a.address})
    net.pump(lambda: a.transport.dropped_connections >= 2, what="mallory refused twice")
    assert mallory.transport.connected_peers() == frozenset()
    assert mallory.connected == []
    assert mallory.transport.send("a", {"type": "x"}) is False
    assert a.messages == []
    exchange(net, a, b, "members unaffected")


def test_hand_written_client_can_authenticate_and_deliver(net: Net) -> None:
    # The positive control for the hostile-client tests below: the raw
    # client speaks the protocol correctly, so their failures are real refusals.
    cluster = addresses("a", "b", "c")
    a = net.start("a", cluster)
    client = net.raw_client(a.address)
    authenticate(net, client, "c")
    client.send(client.frame(codec.encode({"type": "hello", "from": "raw"})))
    net.pump(lambda: bool(a.messages), what="raw message")
    assert a.messages == [("c", {"type": "hello", "from": "raw"})]
    assert a.transport.dropped_connections == 0


def test_raw_client_with_wrong_secret_is_refused(net: Net) -> None:
    cluster = addresses("a", "b", "c")
    a = net.start("a", cluster)
    client = net.raw_client(a.address)
    with pytest.raises(AssertionError, match="server did not prove"):
        authenticate(net, client, "c", secret=OTHER_SECRET)
    net.pump(lambda: client.eof, what="connection closed")
    assert a.transport.dropped_connections == 1


# -- hostile bytes: each costs only its own connection ---------------------------------------

@pytest.fixture
def pair(net: Net) -> tuple[Peer, Peer, dict[str, str]]:
    """Members a and b connected, plus an address for member c that nobody serves."""
    cluster = addresses("a", "b", "c")
    a = net.start("a", cluster)
    b = net.start("b", cluster)
    net.pump(lambda: "b" in a.transport.connected_peers() and "a" in b.transport.connected_peers(),
             what="a<->b")
    return a, b, cluster


def _assert_only_that_connection_dropped(
    net: Net, client: RawClient, a: Peer, b: Peer, *, refused: bool = True
) -> None:
    net.pump(lambda: client.eof, what="the hostile connection to be closed")
    if refused:  # (a silent connection is timed out, not refused)
        assert a.transport.dropped_connections >= 1
    assert a.transport.connected_peers() == {"b"}
    assert a.disconnected == [] and b.disconnected == []
    exchange(net, a, b, f"after-{id(client)}")


@pytest.mark.parametrize("payload", [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"\x00\x00\x00\x05hello",
    os.urandom(64),
    b"\x00\x00\x00\x00",
], ids=["http", "small-frame-garbage", "random", "empty-hello"])
def test_garbage_before_handshake_closes_only_that_connection(
    net: Net, pair: tuple[Peer, Peer, dict[str, str]], payload: bytes
) -> None:
    a, b, _ = pair
    client = net.raw_client(a.address)
    client.send(payload)
    _assert_only_that_connection_dropped(net, client, a, b)
    assert {sender for sender, _ in a.messages} == {"b"}  # only the probe


@pytest.mark.parametrize("length", [0xFFFFFFFF, transport_module.HANDSHAKE_MAX + 1])
def test_oversized_length_prefix_before_handshake(
    net: Net, pair: tuple[Peer, Peer, dict[str, str]], length: int
) -> None:
    a, b, _ = pair
    client = net.raw_client(a.address)
    client.send(_LEN.pack(length) + b"x" * 16)
    _assert_only_that_connection_dropped(net, client, a, b)


def test_oversized_frame_after_handshake(
    net: Net, pair: tuple[Peer, Peer, dict[str, str]]
) -> None:
    a, b, _ = pair
    client = net.raw_client(a.address)
    authenticate(net, client, "c")
    client.send(_LEN.pack(MAX_MESSAGE + 1) + b"y" * 1024)
    _assert_only_that_connection_dropped(net, client, a, b)
    assert a.received_from("c") == []


@pytest.mark.parametrize("attack", ["bad-mac", "replay", "untyped", "not-codec"])
def test_bad_frames_after_handshake(
    net: Net, pair: tuple[Peer, Peer, dict[str, str]], attack: str
) -> None:
    a, b, _ = pair
    client = net.raw_client(a.address)
    authenticate(net, client, "c")
    good = codec.encode({"type": "ok"})
    if attack == "bad-mac":
        client.send(client.frame(good, mac=b"\x00" * 16))
    elif attack == "replay":
        client.send_seq = 0
        frame = client.frame(good)
        client.send(frame)
        net.pump(lambda: len(a.messages) == 1, what="original frame")
        client.send(frame)  # same sequence number again
    elif attack == "untyped":
        client.send(client.frame(codec.encode({"no": "type"})))
    else:
        client.send(client.frame(b"\xffnot codec"))
    _assert_only_that_connection_dropped(net, client, a, b)
    assert a.received_from("c") == ([{"type": "ok"}] if attack == "replay" else [])


@pytest.mark.parametrize("authenticated", [False, True], ids=["before-auth", "after-auth"])
def test_pickle_payload_is_never_unpickled(
    net: Net, pair: tuple[Peer, Peer, dict[str, str]], tmp_path: Path, authenticated: bool
) -> None:
    # Control: the payload really is live.
    control = tmp_path / "control-created"
    with pickle.loads(evil_pickle(control)):
        pass
    assert control.exists()

    a, b, _ = pair
    target = tmp_path / "pwned"
    client = net.raw_client(a.address)
    payload = evil_pickle(target)
    if authenticated:
        authenticate(net, client, "c")
        client.send(client.frame(payload))
    else:
        client.send(_LEN.pack(len(payload)) + payload)
    _assert_only_that_connection_dropped(net, client, a, b)
    assert not target.exists()
    assert a.received_from("c") == []


def test_silent_authenticated_client_is_closed_after_dead_timeout(
    net: Net, pair: tuple[Peer, Peer, dict[str, str]]
) -> None:
    a, b, _ = pair
    client = net.raw_client(a.address)
    authenticate(net, client, "c")
    started = time.monotonic()
    client.send(client.frame(b"half a frame")[:9])  # then nothing, not even pings
    _assert_only_that_connection_dropped(net, client, a, b, refused=False)
    assert time.monotonic() - started < 1.0 + 2.0


def test_stalled_clients_do_not_block_and_are_closed_after_handshake_timeout(
    net: Net, pair: tuple[Peer, Peer, dict[str, str]]
) -> None:
    a, b, _ = pair
    started = time.monotonic()
    silent = net.raw_client(a.address)  # connects, sends nothing
    half = net.raw_client(a.address)
    half.send(_LEN.pack(200) + b"only twenty bytes...")  # half a frame, then stops
    # While they hang, members keep talking.
    exchange(net, a, b, "during-stall")
    assert not silent.eof and not half.eof
    limit = transport_module.HANDSHAKE_TIMEOUT
    net.pump(lambda: silent.eof and half.eof, timeout=limit + 3.0, what="stalled clients closed")
    assert time.monotonic() - started >= limit - 0.5
    assert a.transport.connected_peers() == {"b"}
    exchange(net, a, b, "after-stall")


def test_closing_a_connection_mid_handshake_is_harmless(
    net: Net, pair: tuple[Peer, Peer, dict[str, str]]
) -> None:
    a, b, _ = pair
    for _ in range(5):
        client = RawClient(a.address)
        client.send(b"\x00\x00")
        client.close()
    net.pump_for(0.1)
    exchange(net, a, b, "after-hangups")


def test_wake_interrupts_a_long_poll(net: Net) -> None:
    a = net.start("a", addresses("a"))
    elapsed: list[float] = []

    def long_poll() -> None:
        started = time.monotonic()
        a.transport.poll(10.0)
        elapsed.append(time.monotonic() - started)

    thread = threading.Thread(target=long_poll, daemon=True)
    thread.start()
    try:
        a.transport.wake()  # from another thread; pending or in progress, poll must return
    finally:
        thread.join(timeout=5.0)
    assert not thread.is_alive()
    assert elapsed and elapsed[0] < 2.0


# -- bounded memory per peer ---------------------------------------------------------------


def test_a_trickled_frame_is_dropped_by_its_deadline(net: Net) -> None:
    """A member trickling one frame a byte at a time is never silent, so only the
    per-frame deadline can free what it holds."""
    cluster = addresses("a", "b", "c")
    a = net.start("a", cluster, frame_timeout=0.6)
    client = net.raw_client(a.address)
    authenticate(net, client, "c")
    frame = client.frame(codec.encode({"type": "slow"}))
    started = time.monotonic()
    sent = 0
    while not client.eof and time.monotonic() - started < 5.0:
        if sent < len(frame) - 1:  # never the last byte
            client.send(frame[sent:sent + 1])
            sent += 1
        net.pump_for(0.1)
    assert client.eof, "a trickling peer held its frame open"
    assert 0.5 <= time.monotonic() - started < 2.0
    assert a.received_from("c") == []


def test_a_member_has_one_incoming_connection(net: Net) -> None:
    cluster = addresses("a", "b", "c")
    a = net.start("a", cluster)
    first = net.raw_client(a.address)
    authenticate(net, first, "c")
    second = net.raw_client(a.address)
    authenticate(net, second, "c")
    net.pump(lambda: first.eof, what="the older connection to be replaced")
    assert not second.eof
    second.send(second.frame(codec.encode({"type": "hello"})))
    net.pump(lambda: a.received_from("c") == [{"type": "hello"}], what="delivery")


def test_pending_handshakes_are_capped(net: Net, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_module, "MAX_PENDING_HANDSHAKES", 4)
    cluster = addresses("a", "b", "c")
    a = net.start("a", cluster)
    b = net.start("b", cluster)
    net.pump(lambda: a.transport.connected_peers() == {"b"}
             and b.transport.connected_peers() == {"a"}, what="a<->b")
    clients = [net.raw_client(a.address) for _ in range(10)]
    net.pump(lambda: sum(c.eof for c in clients) >= 6, what="the extra connections closed")
    net.pump_for(0.2)
    assert sum(not c.eof for c in clients) == 4
    exchange(net, a, b, "while-capped")


def test_a_message_over_the_frame_limit_is_not_sent(
        net: Net, caplog: pytest.LogCaptureFixture) -> None:
    peers = net.cluster("a", "b")
    a, b = peers["a"], peers["b"]
    with caplog.at_level("ERROR", logger=transport_module.__name__):
        assert a.transport.send("b", {"type": "huge", "data": b"x" * MAX_MESSAGE}) is False
    assert "over the 65536-byte frame limit" in caplog.text
    exchange(net, a, b, "after-huge")


def test_repeated_failures_are_logged_once_per_interval(
        net: Net, caplog: pytest.LogCaptureFixture) -> None:
    cluster = addresses("a", "b")
    a = net.start("a", cluster)
    with caplog.at_level("WARNING", logger=transport_module.__name__):
        for _ in range(20):
            client = net.raw_client(a.address)
            with contextlib.suppress(AssertionError):
                authenticate(net, client, "intruder")
            net.pump(lambda c=client: c.eof, what="intruder dropped")  # type: ignore[misc]
    assert a.transport.dropped_connections == 20
    lines = [r for r in caplog.records if "not a cluster member" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]


def test_a_frame_late_because_this_node_was_paused_is_not_dropped(net: Net) -> None:
    """After a pause (SIGSTOP, a long apply) the rest of a frame may wait in the kernel
    past the frame deadline: the delay is ours, not the peer's."""
    cluster = addresses("a", "b", "c")
    a = net.start("a", cluster, frame_timeout=0.3, max_frame_bytes=1 << 20)
    client = net.raw_client(a.address)
    authenticate(net, client, "c")
    frame = client.frame(codec.encode({"type": "big", "data": b"q" * 600_000}))
    client.send(frame[:100])
    net.pump_for(0.1)  # the frame has begun
    client.send(frame[100:])  # lands in the kernel while "a" is not polled
    time.sleep(0.5)  # "a" is paused past the frame deadline
    net.pump(lambda: len(a.received_from("c")) == 1 or client.eof, what="the frame")
    assert not client.eof
    assert a.received_from("c")[0]["type"] == "big"


def test_a_refused_dial_is_not_reported_while_the_peer_talks_to_us(net: Net) -> None:
    """``fast_failover`` campaigns when the leader's address refuses a dial. A
    refusal is stale while the peer's own connection to us is open (a dial
    made before it listened, answered late): a node then started a needless
    election right after the first one. A killed process's sockets all close
    at once, so only then is the refusal news."""
    cluster = addresses("a", "b")  # nothing listens at b's address
    a = net.start("a", cluster)
    client = net.raw_client(a.address)
    authenticate(net, client, "b")
    a.refused.clear()  # (dials before b's connection was up were refused, rightly)
    held_until = time.monotonic() + 0.4  # a redials b every 50 ms meanwhile
    while time.monotonic() < held_until:
        net._poll_once()
    assert a.refused == []
    client.sock.close()
    net.pump(lambda: "b" in a.refused, what="a refusal reported once b's connection closed")


def test_a_peer_that_dials_in_is_dialled_back_at_once(net: Net) -> None:
    """A node whose dial was refused (the peer was not listening yet) dials
    again as soon as the peer's own connection arrives, not after its retry
    interval: until then it cannot send to the peer (a forward to a new
    leader waited on that link, E20)."""
    cluster = addresses("a", "b")
    a = net.start("a", cluster, retry_interval=30.0)
    net.pump(lambda: "b" in a.refused, what="a's first dial to be refused")
    b = net.start("b", cluster)
    started = time.monotonic()
    net.pump(lambda: "b" in a.connected and "a" in b.connected, timeout=5.0,
             what="links both ways")
    assert time.monotonic() - started < 2.0


# -- the output queue --------------------------------------------------------------------


def test_the_output_queue_sends_every_byte_in_order_across_partial_sends() -> None:
    """Frames of every size, queued while the reader is slow, arrive intact and in
    order; what a partial send leaves is sent next, and ``len`` counts what waits."""
    from streambus_consensus.raft.transport import _Outgoing

    rng = random.Random(7)
    chunks = [rng.randbytes(rng.choice((1, 17, 300, 70_000, 1 << 20))) for _ in range(120)]
    expected = b"".join(chunks)
    writer, reader = socket.socketpair()
    writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16_384)
    writer.setblocking(False)
    received = bytearray()

    def read() -> None:
        reader.settimeout(10)
        while len(received) < len(expected):
            data = reader.recv(1 << 16)
            if not data:
                return
            received.extend(data)
            time.sleep(0.0005)  # a slow reader: the writer's buffer fills often

    thread = threading.Thread(target=read)
    thread.start()
    queue = _Outgoing()
    try:
        for chunk in chunks:
            queue.add(chunk)
        queue.add(b"")
        assert len(queue) == len(expected)
        deadline = time.monotonic() + 20
        while queue and time.monotonic() < deadline:
            before = len(queue)
            with contextlib.suppress(BlockingIOError):
                queue.send_to(writer)
            assert len(queue) <= before
            select.select([], [writer], [], 0.1)
        thread.join(20)
    finally:
        writer.close()
        reader.close()
    assert len(queue) == 0
    assert bytes(received) == expected


def test_a_queued_chunk_is_never_copied() -> None:
    """Appending to a slow peer's queue costs the same whatever is queued before it
    (one growing buffer moved all of it on each append)."""
    from streambus_consensus.raft.transport import _Outgoing

    queue = _Outgoing()
    big = bytes(8 << 20)
    queue.add(big)
    queue.add(b"x" * 10)
    assert queue._chunks[0] is big and len(queue) == (8 << 20) + 10
