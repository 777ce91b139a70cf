"""Authenticated TCP transport between cluster nodes.

Each node listens on its bind address and keeps one *outgoing* connection to
every peer; a node's messages to a peer travel on its own outgoing
connection, so each direction reconnects on its own and a one-way cut is a
real one-way cut.

**Handshake.** The listener sends a 16-byte nonce; the dialer answers with its
node id, its own nonce and ``HMAC(secret, "c" | nonce_s | nonce_c | id)``; the
listener checks that the id is a member and the MAC is right and answers with
``HMAC(secret, "s" | nonce_c | nonce_s)``, which the dialer checks. Both then
derive a session key from the two nonces. There is no mode without a
secret: an empty one is refused.

**TLS** (optional, ``peer_tls``): the same bytes travel inside mutual TLS
1.2+, run over the non-blocking sockets through memory BIOs so the Raft
thread never blocks on a handshake. The secret handshake above still runs
inside the tunnel: a certificate alone does not make a member.

**Frames.** ``u32 length | payload | 16-byte HMAC(session key, seq | payload)``,
with a per-direction sequence number, so frames cannot be forged, replayed or
reordered. Payloads are :mod:`streambus_consensus.codec` (never pickle); an
empty payload is a ping. A bad MAC, undecodable bytes or a peer silent for
``dead_timeout`` close that one connection and nothing else.

**Bounded memory.** A frame whose length header exceeds ``max_frame_bytes``
(derived from the append and snapshot chunk sizes, see
:attr:`~streambus_consensus.config.NodeConfig.max_frame_bytes`) is refused
before any of its bytes are buffered; a frame must arrive whole within
``frame_timeout`` of its first byte; each member has at most one incoming
connection (a newer one replaces it) and at most
``MAX_PENDING_HANDSHAKES`` unauthenticated connections wait at once.

**Liveness.** Both ends of every connection send a ping after
``ping_interval`` without traffic. This keeps follower-to-follower links
alive while a leader is healthy, so that when it dies the first vote request
goes out at once (PySyncObj's own transport dropped it: trap 7 in the
reference notes).

**Holding.** :meth:`TcpTransport.send` queues; :meth:`TcpTransport.release`
lets queued frames go out. The node releases only after its storage sync.
A message queued with ``ahead=True`` asserts nothing about the sender's
disk (a leader's ``append_entries``): :meth:`TcpTransport.release_ahead` lets
each peer's leading run of such messages go before the sync, in order.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import itertools
import logging
import os
import selectors
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from .. import codec
from ..config import parse_address
from ..errors import CodecError, ConfigError, TransportError
from ..logutil import RateLimitedLog
from ..tls import describe_failure

__all__ = ["TcpTransport"]

logger = logging.getLogger(__name__)

PROTOCOL = b"SBC1"
_LEN = struct.Struct(">I")
_SEQ = struct.Struct(">Q")
MAC_SIZE = 16
NONCE_SIZE = 16
HANDSHAKE_MAX = 4096
HANDSHAKE_TIMEOUT = 5.0
MAX_PENDING_HANDSHAKES = 64
"""Unauthenticated incoming connections held at once; more are closed on accept."""
OUTBUF_LIMIT = 64 << 20
"""Bytes queued to a peer that does not read before its connection is closed
(Raft re-sends what is lost); a snapshot in flight stays well under it."""
_IOV_BATCH = 256
"""Most queued chunks handed to one ``sendmsg`` (below every system's IOV_MAX)."""
ACCEPT_BACKOFF = 0.5
"""Seconds the listener is not watched after accept ran out of file descriptors."""
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
LOG_EVERY = 10.0
"""Seconds between two log lines about the same kind of dropped connection."""
_TLS_RECORD_START = b"\x16\x03"
_PING = b""

MessageHandler = Callable[[str, Mapping[str, Any]], None]
PeerHandler = Callable[[str], None]


class _Outgoing:
    """Bytes waiting for a socket, as the chunks they were queued in.

    A queued chunk is never copied again: a socket that drains slowly (a peer
    busy loading a snapshot while the leader streams the next chunks to it)
    used to make every append to one growing ``bytearray`` move the whole
    buffer, tens of megabytes at a time on the Raft thread. Chunks go out
    several at a time with ``sendmsg``.
    """

    __slots__ = ("_chunks", "size")

    def __init__(self) -> None:
        self._chunks: deque[bytes | memoryview] = deque()
        self.size = 0
        """Bytes queued."""

    def __len__(self) -> int:
        return self.size

    def add(self, data: bytes) -> None:
        """Queue ``data`` (kept as it is: do not change it afterwards)."""
        if data:
            self._chunks.append(data)
            self.size += len(data)

    def send_to(self, sock: socket.socket) -> None:
        """Send what the socket takes now (raises ``BlockingIOError`` when it
        takes nothing, ``OSError`` when the connection failed)."""
        chunks = self._chunks
        while chunks:
            sent = sock.sendmsg(list(itertools.islice(chunks, _IOV_BATCH)))
            self.size -= sent
            while sent:
                head = chunks[0]
                if sent < len(head):
                    chunks[0] = memoryview(head)[sent:]
                    return  # the socket's buffer is full
                sent -= len(head)
                chunks.popleft()


class _Conn:
    """One TCP connection, either direction, with its framing state."""

    def __init__(self, sock: socket.socket, outgoing: bool, peer: str | None) -> None:
        self.sock = sock
        self.outgoing = outgoing
        self.peer = peer
        self.ready = False
        self.connecting = outgoing
        self.inbuf = bytearray()
        self.outbuf = _Outgoing()
        self.held: list[bytes] = []
        self.ahead = 0
        """How many of the first ``held`` messages may go before the sync."""
        self.nonce_mine = os.urandom(NONCE_SIZE)
        self.nonce_theirs = b""
        self.session_key = b""
        self.send_seq = 0
        self.recv_seq = 0
        self.frame_started: float | None = None
        """When the first byte of the frame being received arrived."""
        self.tls: ssl.SSLObject | None = None
        self.tls_in = ssl.MemoryBIO()
        self.tls_out = ssl.MemoryBIO()
        self.tls_done = False
        self.plain_pending = bytearray()
        """Plaintext written before the TLS handshake finished."""
        self.address = ""
        now = time.monotonic()
        self.created = now
        self.last_recv = now
        self.last_send = now
        self.closed = False


class TcpTransport:
    """The cluster transport over TCP. See the module docstring.

    Args:
        node_id: this node's id.
        bind_address: ``"host:port"`` to listen on.
        peers: ``{node_id: "host:port"}`` of the other members.
        secret: the cluster secret (required, non-empty).
        max_frame_bytes: largest frame accepted.
        frame_timeout: longest a frame may take to arrive once begun.
        ping_interval: idle time before a ping is sent.
        dead_timeout: silence after which a connection is closed.
        retry_interval: wait between connection attempts to a peer.
        server_tls: with ``client_tls``, run every connection inside TLS:
            the context incoming connections are accepted with.
        client_tls: the context peers are dialled with.
    """

    def __init__(
        self,
        node_id: str,
        bind_address: str,
        peers: Mapping[str, str],
        *,
        secret: str,
        max_frame_bytes: int = (2 << 20) + (64 << 10),
        frame_timeout: float = 5.0,
        ping_interval: float = 0.1,
        dead_timeout: float = 1.0,
        retry_interval: float = 0.2,
        server_tls: ssl.SSLContext | None = None,
        client_tls: ssl.SSLContext | None = None,
    ) -> None:
        if not isinstance(secret, str) or not secret:
            raise ConfigError("cluster_secret", "<redacted>",
                              "the transport needs a non-empty cluster secret")
        if (server_tls is None) != (client_tls is None):
            raise ConfigError("server_tls + client_tls", None, "give both TLS contexts or neither")
        self.node_id = node_id
        self.bind_address = bind_address
        self._peers: dict[str, tuple[str, int]] = {}
        self._key = secret.encode("utf-8")
        self._max = max_frame_bytes
        self._frame_timeout = frame_timeout
        self._outbuf_limit = max(OUTBUF_LIMIT, 4 * max_frame_bytes)
        self._server_tls, self._client_tls = server_tls, client_tls
        self._limited = RateLimitedLog(logger, LOG_EVERY)
        self._accept_resumes_at: float | None = None
        self._ping_interval = ping_interval
        self._dead_timeout = dead_timeout
        self._retry_interval = retry_interval
        self._selector = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._out: dict[str, _Conn] = {}
        self._in: set[_Conn] = set()
        self._next_attempt: dict[str, float] = {}
        self._on_message: MessageHandler = _ignore_message
        self._on_connected: PeerHandler = _ignore_peer
        self._on_disconnected: PeerHandler = _ignore_peer
        self._on_refused: PeerHandler = _ignore_peer
        self._waker_r, self._waker_w = socket.socketpair()
        self._waker_r.setblocking(False)
        self._waker_w.setblocking(False)
        self.dropped_connections = 0
        self.sent_ahead = 0
        """Messages :meth:`release_ahead` let out (before the node's sync)."""
        for peer_id, address in peers.items():
            if peer_id != node_id:
                self._peers[peer_id] = parse_address(address, field_name=f"peer {peer_id}")

    # -- lifecycle -------------------------------------------------------------

    def start(
        self,
        on_message: MessageHandler,
        on_connected: PeerHandler,
        on_disconnected: PeerHandler,
        on_refused: PeerHandler | None = None,
    ) -> None:
        """Bind the listener and begin connecting to peers.

        ``on_refused(peer)`` is told when a dial is refused outright (nothing
        listens at the peer's address: its process is gone), but not while the
        peer's own authenticated connection to us is open (a stale refusal).
        """
        self._on_message, self._on_connected = on_message, on_connected
        self._on_disconnected = on_disconnected
        self._on_refused = on_refused or _ignore_peer
        host, port = parse_address(self.bind_address, field_name="bind_address")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise TransportError(
                f"cannot bind {self.bind_address}: {exc.strerror}", node_id=self.node_id
            ) from None
        sock.listen(64)
        sock.setblocking(False)
        self._listener = sock
        self._selector.register(sock, selectors.EVENT_READ, None)
        self._selector.register(self._waker_r, selectors.EVENT_READ, None)
        self._maintain()

    def close(self) -> None:
        """Close every socket. Idempotent."""
        for conn in [*self._out.values(), *self._in]:
            self._close(conn, notify=False)
        self._out.clear()
        self._in.clear()
        if self._listener is not None:
            if self._accept_resumes_at is None:
                self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
            self._selector.unregister(self._waker_r)
        self._waker_r.close()
        self._waker_w.close()
        self._selector.close()

    def add_peer(self, node_id: str, address: str) -> None:
        """Start talking to a new member."""
        if node_id != self.node_id:
            self._peers[node_id] = parse_address(address, field_name=f"peer {node_id}")
            self._next_attempt.pop(node_id, None)

    def remove_peer(self, node_id: str) -> None:
        """Stop talking to a member; drop its connections."""
        self._peers.pop(node_id, None)
        conn = self._out.pop(node_id, None)
        if conn is not None:
            self._close(conn, notify=False)
        for conn in [c for c in self._in if c.peer == node_id]:
            self._close(conn, notify=False)

    def probe(self, address: str, timeout: float = 2.0) -> None:
        """Dial ``address`` and run the client side of the handshake as this node,
        then hang up: is a node there, with the cluster's secret (and TLS
        setting), accepting this node as a member? Blocking; safe from any
        thread (it touches no connection of the transport's).

        Raises :class:`TransportError` saying what failed.
        """
        host, port = parse_address(address, field_name="address")
        try:
            with socket.create_connection((host, port), timeout=timeout) as raw:
                sock: socket.socket = (raw if self._client_tls is None else
                                       self._client_tls.wrap_socket(raw, server_hostname=host))
                with sock:
                    hello = _read_frame(sock)
                    if len(hello) != 4 + NONCE_SIZE or hello[:4] != PROTOCOL:
                        raise TransportError(f"{address} does not speak the cluster protocol")
                    theirs, mine = hello[4:], os.urandom(NONCE_SIZE)
                    ident = self.node_id.encode("utf-8")
                    payload = codec.encode((ident, mine, self._mac(b"c", theirs, mine, ident)))
                    sock.sendall(_LEN.pack(len(payload)) + payload)
                    answer = _read_frame(sock)
                    if not hmac.compare_digest(answer, self._mac(b"s", mine, theirs)):
                        raise TransportError(f"{address} failed authentication (another "
                                             "cluster secret?)")
        except ssl.SSLError as exc:
            raise TransportError(f"TLS handshake with {address} failed: "
                                 f"{describe_failure(exc)}") from None
        except EOFError:
            raise TransportError(
                f"{address} hung up during the handshake: its [cluster] does not list "
                f"{self.node_id}, or it has another cluster secret") from None
        except OSError as exc:
            raise TransportError(f"nothing answers at {address}: "
                                 f"{exc.strerror or exc}") from None

    def connected_peers(self) -> frozenset[str]:
        """Peers whose outgoing connection is authenticated and open."""
        return frozenset(p for p, c in self._out.items() if c.ready)

    # -- sending ---------------------------------------------------------------

    def send(self, node_id: str, message: Mapping[str, Any], *, ahead: bool = False) -> bool:
        """Queue ``message`` for ``node_id``; ``False`` when not connected.

        ``ahead``: the message asserts nothing about this node's disk, so
        :meth:`release_ahead` may let it out before the storage sync (only
        while no held message precedes it: order per peer is kept).
        """
        conn = self._out.get(node_id)
        if conn is None or not conn.ready:
            return False
        payload = codec.encode(dict(message))
        if len(payload) + MAC_SIZE > self._max:
            self._log_limited("oversized", logging.ERROR,
                              "not sending a %s message of %d bytes to %s: over the %d-byte "
                              "frame limit that every member enforces", message.get("type"),
                              len(payload), node_id, self._max)
            return False
        if ahead and conn.ahead == len(conn.held):
            conn.ahead += 1
        conn.held.append(payload)
        return True

    def release(self) -> None:
        """Frame and start writing every held message."""
        for conn in list(self._out.values()):
            if conn.held and conn.ready:
                self._release(conn, len(conn.held))

    def release_ahead(self) -> None:
        """Frame and start writing, per peer, the held messages queued with
        ``ahead=True`` before any other held message (the node calls this
        before its storage sync, :meth:`release` after it)."""
        for conn in list(self._out.values()):
            if conn.ahead and conn.ready:
                self.sent_ahead += conn.ahead
                self._release(conn, conn.ahead)

    def _release(self, conn: _Conn, count: int) -> None:
        for payload in conn.held[:count]:
            self._frame(conn, payload)
            if len(conn.outbuf) > self._max:
                self._flush(conn)
        del conn.held[:count]
        conn.ahead = 0
        self._flush(conn)
        if not conn.closed and len(conn.outbuf) > self._outbuf_limit:
            # Raft re-sends what is lost; memory must stay bounded.
            self._close(conn, reason="peer is not reading; output buffer full")

    def wake(self) -> None:
        """Interrupt a :meth:`poll` in progress (from any thread)."""
        with contextlib.suppress(OSError):  # already pending, or closing
            self._waker_w.send(b"\0")

    # -- the event loop -------------------------------------------------------

    def poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` for network events and handle them."""
        if self._listener is None:
            time.sleep(timeout)
            return
        for key, events in self._selector.select(timeout):
            sock = key.fileobj
            if sock is self._listener:
                self._accept()
            elif sock is self._waker_r:
                try:
                    while self._waker_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
            else:
                conn: _Conn = key.data
                if events & selectors.EVENT_WRITE and not conn.closed:
                    self._on_writable(conn)
                if events & selectors.EVENT_READ and not conn.closed:
                    self._on_readable(conn)
        self._maintain()

    def _maintain(self) -> None:
        """Reconnect, ping idle links, close dead ones."""
        now = time.monotonic()
        if (self._accept_resumes_at is not None and now >= self._accept_resumes_at
                and self._listener is not None):
            self._accept_resumes_at = None
            self._selector.register(self._listener, selectors.EVENT_READ, None)
        for peer in list(self._peers):
            conn = self._out.get(peer)
            if conn is None and now >= self._next_attempt.get(peer, 0.0):
                self._dial(peer)
        for conn in [*self._out.values(), *self._in]:
            if conn.closed:
                continue
            if conn.ready and conn.frame_started is not None and (
                    now - conn.frame_started > self._frame_timeout) and not _unread(conn):
                self._drop(conn, f"a frame took over {self._frame_timeout:g}s to arrive "
                                 "(peer trickling?)")
                continue
            if conn.ready:
                silent_for = now - conn.last_recv
                limit = self._dead_timeout
            else:
                # A handshake has one deadline from the connection's start, so a
                # peer trickling a byte at a time cannot hold it open.
                silent_for = now - conn.created
                limit = self._dead_timeout if conn.outgoing else HANDSHAKE_TIMEOUT
                if silent_for > limit and not conn.connecting:
                    # A paused or overloaded peer looks the same, so this is not a warning.
                    self._drop(conn, f"handshake not finished within {limit:g}s (peer paused "
                               "or overloaded, or TLS on at one end only?)", logging.INFO)
                    continue
            if silent_for > limit:
                logger.info("%s: connection %s silent or stalled for %.1fs, closing",
                            self.node_id, _describe(conn), silent_for)
                self._close(conn)
            elif conn.ready and now - conn.last_send >= self._ping_interval:
                self._frame(conn, _PING)
                self._flush(conn)

    # -- connection set-up ------------------------------------------------------

    def _refused(self, peer: str) -> None:
        """Report a refused dial, unless ``peer`` still talks to us on its own
        connection: a killed process's sockets all close at once, so an open,
        authenticated incoming connection means the process lives and the
        refusal is stale (a dial made before it listened, answered late)."""
        if any(c.peer == peer and c.ready for c in self._in):
            logger.debug("%s: a dial to %s was refused while its own connection is open; "
                         "not reporting it down", self.node_id, peer)
            return
        self._on_refused(peer)

    def _dial(self, peer: str) -> None:
        host, port = self._peers[peer]
        self._next_attempt[peer] = time.monotonic() + self._retry_interval
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            err = sock.connect_ex((host, port))
        except OSError as exc:  # e.g. unresolvable host
            logger.debug("%s: cannot dial %s: %s", self.node_id, peer, exc)
            sock.close()
            return
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            if err == errno.ECONNREFUSED:
                self._refused(peer)
            return
        conn = _Conn(sock, outgoing=True, peer=peer)
        conn.address = f"{host}:{port}"
        if self._client_tls is not None:
            conn.tls = self._client_tls.wrap_bio(conn.tls_in, conn.tls_out, server_side=False,
                                                 server_hostname=host)
        self._out[peer] = conn
        self._selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _accept(self) -> None:
        if self._listener is None:
            return
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._log_limited("accept", logging.WARNING, "accept failed: %s", exc)
                if exc.errno in _OUT_OF_RESOURCES:
                    # The pending connection stays queued, so the listener stays
                    # readable: stop watching it for a while instead of spinning.
                    self._selector.unregister(self._listener)
                    self._accept_resumes_at = time.monotonic() + ACCEPT_BACKOFF
                return
            if sum(1 for c in self._in if not c.ready) >= MAX_PENDING_HANDSHAKES:
                sock.close()
                self.dropped_connections += 1
                self._log_limited("pending", logging.WARNING,
                                  "refusing a connection: %d handshakes already pending",
                                  MAX_PENDING_HANDSHAKES)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, outgoing=False, peer=None)
            with contextlib.suppress(OSError):
                conn.address = "{}:{}".format(*sock.getpeername()[:2])
            if self._server_tls is not None:
                conn.tls = self._server_tls.wrap_bio(conn.tls_in, conn.tls_out, server_side=True)
            self._in.add(conn)
            self._selector.register(sock, selectors.EVENT_READ, conn)
            self._raw_frame(conn, PROTOCOL + conn.nonce_mine)
            self._flush(conn)

    def _handshake(self, conn: _Conn, payload: bytes) -> None:
        if conn.outgoing and not conn.nonce_theirs:
            if len(payload) != 4 + NONCE_SIZE or payload[:4] != PROTOCOL:
                raise _Dropped("bad server hello")
            conn.nonce_theirs = payload[4:]
            ident = self.node_id.encode("utf-8")
            mac = self._mac(b"c", conn.nonce_theirs, conn.nonce_mine, ident)
            self._raw_frame(conn, codec.encode((ident, conn.nonce_mine, mac)))
        elif conn.outgoing:
            want = self._mac(b"s", conn.nonce_mine, conn.nonce_theirs)
            if not hmac.compare_digest(payload, want):
                raise _Dropped("peer failed authentication (wrong cluster secret?)")
            self._become_ready(conn, conn.nonce_theirs, conn.nonce_mine)
        else:
            try:
                ident, nonce, mac = codec.decode(payload)
                peer = ident.decode("utf-8")
            except (CodecError, ValueError, TypeError, AttributeError, UnicodeDecodeError):
                raise _Dropped("malformed client hello") from None
            if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
                raise _Dropped("malformed client hello")
            want = self._mac(b"c", conn.nonce_mine, nonce, ident)
            if not isinstance(mac, bytes) or not hmac.compare_digest(mac, want):
                raise _Dropped(f"{peer!r} failed authentication (wrong cluster secret?)")
            if peer not in self._peers:
                raise _Dropped(f"{peer!r} is not a cluster member")
            for older in [c for c in self._in if c.peer == peer and c is not conn]:
                # A member reconnecting replaces its old link: one per member.
                self._close(older, reason="replaced by a newer connection", quiet=True)
            conn.peer = peer
            conn.nonce_theirs = nonce
            self._raw_frame(conn, self._mac(b"s", nonce, conn.nonce_mine))
            self._become_ready(conn, conn.nonce_mine, nonce)

    def _become_ready(self, conn: _Conn, server_nonce: bytes, client_nonce: bytes) -> None:
        conn.session_key = self._mac(b"k", server_nonce, client_nonce)
        conn.ready = True
        self._flush(conn)
        if conn.outgoing and conn.peer is not None:
            logger.info("%s: connected to %s", self.node_id, conn.peer)
            self._on_connected(conn.peer)
        elif conn.peer is not None and conn.peer in self._peers and conn.peer not in self._out:
            # The peer is up (it just dialled us): dial it back now rather than
            # after the retry interval, so that what we send it (a forward to
            # a new leader, E20) does not wait for our link.
            self._next_attempt[conn.peer] = 0.0

    def _mac(self, *parts: bytes) -> bytes:
        return hmac.new(self._key, b"|".join(parts), hashlib.sha256).digest()

    # -- bytes in and out --------------------------------------------------------

    def _raw_frame(self, conn: _Conn, payload: bytes) -> None:
        self._emit(conn, _LEN.pack(len(payload)) + payload)

    def _frame(self, conn: _Conn, payload: bytes) -> None:
        mac = hmac.new(conn.session_key, _SEQ.pack(conn.send_seq) + payload, hashlib.sha256)
        conn.send_seq += 1
        self._emit(conn, _LEN.pack(len(payload) + MAC_SIZE) + payload + mac.digest()[:MAC_SIZE])
        conn.last_send = time.monotonic()

    def _emit(self, conn: _Conn, data: bytes) -> None:
        """Queue bytes for the wire (through TLS when the link has it)."""
        if conn.tls is None:
            conn.outbuf.add(data)
        elif not conn.tls_done:
            conn.plain_pending += data
        else:
            try:
                view = memoryview(data)
                while view:
                    view = view[conn.tls.write(view):]
            except ssl.SSLError as exc:
                self._close(conn, reason=f"TLS write failed: {describe_failure(exc)}")
                return
            conn.outbuf.add(conn.tls_out.read())

    def _tls_advance(self, conn: _Conn, data: bytes) -> bytes:
        """Feed received ciphertext to the TLS layer; return the plaintext it yields."""
        tls = conn.tls
        if tls is None:
            return data
        conn.tls_in.write(data)
        plain = bytearray()
        try:
            if not conn.tls_done:
                tls.do_handshake()
                conn.tls_done = True
                pending, conn.plain_pending = bytes(conn.plain_pending), bytearray()
                self._emit(conn, pending)
            while True:
                chunk = tls.read(1 << 18)
                if not chunk:
                    break
                plain += chunk
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            pass
        except (ssl.SSLError, ssl.CertificateError) as exc:
            conn.outbuf.add(conn.tls_out.read())  # the alert, so the peer learns why
            self._flush(conn)
            raise _Dropped(f"TLS handshake failed: {describe_failure(exc)}") from None
        conn.outbuf.add(conn.tls_out.read())
        return bytes(plain)

    def _start_tls(self, conn: _Conn) -> None:
        """The dialler's first TLS flight, once its TCP connection is up."""
        if conn.tls is not None and conn.outgoing:
            with contextlib.suppress(ssl.SSLWantReadError):
                conn.tls.do_handshake()
            conn.outbuf.add(conn.tls_out.read())

    def _flush(self, conn: _Conn) -> None:
        if conn.closed or conn.connecting:
            return
        try:
            conn.outbuf.send_to(conn.sock)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._close(conn, reason=f"send failed: {exc.strerror}")
            return
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0)
        self._selector.modify(conn.sock, mask, conn)

    def _on_writable(self, conn: _Conn) -> None:
        if conn.connecting:
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._close(conn, reason=os.strerror(err), quiet=True)
                if err == errno.ECONNREFUSED and conn.peer is not None:
                    self._refused(conn.peer)
                return
            conn.connecting = False
            conn.last_recv = time.monotonic()
            self._start_tls(conn)
        self._flush(conn)

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(1 << 18)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(conn, reason=exc.strerror or "recv failed", quiet=conn.connecting)
            return
        if not data:
            self._close(conn, reason="closed by peer", quiet=True)
            return
        conn.last_recv = time.monotonic()
        try:
            if conn.tls is not None:
                data = self._tls_advance(conn, data)
                self._flush(conn)
                if conn.closed:
                    return
            elif not conn.ready and not conn.outgoing and data.startswith(_TLS_RECORD_START):
                raise _Dropped("the other side speaks TLS: is peer_tls on there and off here?")
            conn.inbuf += data
            self._consume(conn)
        except _Dropped as drop:
            self._drop(conn, str(drop))

    def _drop(self, conn: _Conn, reason: str, level: int = logging.WARNING) -> None:
        self.dropped_connections += 1
        source = conn.peer or conn.address.rpartition(":")[0]  # not the ephemeral port
        self._log_limited(f"{conn.outgoing}|{source}|{reason}", level,
                          "dropping connection %s: %s", _describe(conn), reason)
        self._close(conn)

    def _log_limited(self, key: str, level: int, message: str, *args: Any) -> None:
        self._limited.log(key, level, "%s: " + message, self.node_id, *args)

    def _consume(self, conn: _Conn) -> None:
        buf = conn.inbuf
        pos = 0
        if conn.frame_started is None:
            conn.frame_started = conn.last_recv
        try:
            while len(buf) - pos >= 4:
                (length,) = _LEN.unpack_from(buf, pos)
                limit = self._max if conn.ready else HANDSHAKE_MAX
                if length > limit:
                    raise _Dropped(f"frame of {length} bytes exceeds the {limit}-byte limit")
                if len(buf) - pos - 4 < length:
                    break
                payload = bytes(buf[pos + 4 : pos + 4 + length])
                pos += 4 + length
                conn.frame_started = conn.last_recv
                if conn.ready:
                    self._on_frame(conn, payload)
                else:
                    self._handshake(conn, payload)
                    self._flush(conn)
                if conn.closed:
                    return
        finally:
            del buf[:pos]
            if not buf:
                conn.frame_started = None

    def _on_frame(self, conn: _Conn, frame: bytes) -> None:
        if len(frame) < MAC_SIZE:
            raise _Dropped("frame shorter than its MAC")
        payload, mac = frame[:-MAC_SIZE], frame[-MAC_SIZE:]
        want = hmac.new(conn.session_key, _SEQ.pack(conn.recv_seq) + payload, hashlib.sha256)
        if not hmac.compare_digest(mac, want.digest()[:MAC_SIZE]):
            raise _Dropped("frame MAC mismatch (forged, replayed or corrupted)")
        conn.recv_seq += 1
        if payload == _PING or conn.outgoing:
            return  # only pings travel back on our own outgoing connections
        try:
            message = codec.decode(payload)
        except CodecError as exc:
            raise _Dropped(f"undecodable message: {exc}") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise _Dropped("message is not a typed mapping")
        if conn.peer is not None:
            self._on_message(conn.peer, message)

    def _close(self, conn: _Conn, *, notify: bool = True, reason: str = "",
               quiet: bool = False) -> None:
        if conn.closed:
            return
        if reason and not quiet:
            logger.info("%s: closing %s: %s", self.node_id, _describe(conn), reason)
        conn.closed = True
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()
        if conn.outgoing and conn.peer is not None:
            if self._out.get(conn.peer) is conn:
                del self._out[conn.peer]
                if conn.ready:
                    self._next_attempt.pop(conn.peer, None)  # redial at once
            if conn.ready and notify:
                self._on_disconnected(conn.peer)
        else:
            self._in.discard(conn)


class _Dropped(Exception):  # noqa: N818 - internal control flow, never escapes
    """Internal: the connection must be closed for the given reason."""


def _unread(conn: _Conn) -> bool:
    """Whether bytes wait in the kernel for us: then a late frame is our delay (this node
    was paused or busy), not the peer's, and its deadline is not enforced yet."""
    try:
        return bool(conn.sock.recv(1, socket.MSG_PEEK))
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # let the read path see the error and close


def _describe(conn: _Conn) -> str:
    arrow = "to" if conn.outgoing else "from"
    who = conn.peer or "unauthenticated peer"
    return f"{arrow} {who} ({conn.address})" if conn.address else f"{arrow} {who}"


def _ignore_message(peer: str, message: Mapping[str, Any]) -> None:
    return None


def _ignore_peer(peer: str) -> None:
    return None


def _read_frame(sock: socket.socket) -> bytes:
    """One handshake frame (``u32 length | payload``) from a blocking socket."""
    (length,) = _LEN.unpack(_read_exactly(sock, _LEN.size))
    if length > HANDSHAKE_MAX:
        raise TransportError(f"handshake frame of {length} bytes: not a cluster node")
    return _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(size - got)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
