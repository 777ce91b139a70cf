"""The node's HTTP API: JSON over HTTP/1.1, one server per node.

One asyncio event loop on its own thread serves every connection (see
:class:`ApiServer`): keep-alive and pipelined requests, bounded connections
and requests in flight (``503`` with ``Retry-After`` past them), a deadline
for receiving each request, ``async`` routes on the loop and plain ones on a
small thread pool. It is a small HTTP/1.1 parser of our own: measured
against aiohttp and uvicorn (``tools/api_frontend_compare.py``) it served
more requests per second, and it enforces the deadlines and bounds exactly.

Requests to ``/v1/...`` are authenticated with the cluster secret: the
client sends ``X-SBC-Timestamp`` (Unix seconds) and ``X-SBC-Signature``, the
hex HMAC-SHA256 of ``METHOD \\n PATH?QUERY \\n TIMESTAMP \\n BODY`` under the
secret; requests more than 60 s old or new are refused, as is anything
unsigned. With ``api_tls`` the server speaks TLS and, by default, requires a
client certificate from the cluster's CA before any request is read.

``/healthz`` needs no signature either (load balancers and liveness probes
cannot sign): 200 while the node's Raft thread runs, 503 once it stopped,
with a body of node id, Raft role, leader id and term only.

``/metrics`` needs no signature (Prometheus cannot sign), so it exposes only
operational numbers whose labels are node ids, Raft roles, error class names
and broker states: never topic names, broker ids or endpoints, config values
or secrets (a test holds it to that). Behind ``api_tls`` with client
certificates, scrapers need a certificate like every other client.

Errors come back as ``{"error": {"type", "code", "message", "retriable",
"leader_hint"}}`` with a status that says what the caller can do: 400 bad
request, 401 unauthenticated, 404 unknown path, 409 refused by the state
machine, 503 retry later or elsewhere (no leader, not leader, queue full;
``overloaded`` with ``Retry-After`` when the node is at a bound and did not
handle the request), 504 outcome unknown (retry only with the same request
id). Past the input limits: 413 (body), 431 (head), 411 (chunked body).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import inspect
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qs

from .config import parse_address
from .errors import (
    CommandRefusedError,
    ConfigError,
    ConsensusError,
    NotLeaderError,
    OutcomeUnknownError,
)
from .logutil import RateLimitedLog
from .tls import describe_failure

__all__ = ["ApiError", "ApiRequest", "ApiServer", "InPool", "Route", "sign_request"]

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
"""Largest request body; a longer one is answered 413 and its connection closed."""
MAX_HEAD_BYTES = 64 * 1024
"""Largest request line plus header fields; more is answered 431 and closed."""
MAX_HEADERS = 100
"""Most header fields in one request."""
CLOCK_SKEW_SECONDS = 60
SOCKET_TIMEOUT = 10.0
"""Default longest a client may take to send one whole request, and to stay idle
between requests (``api_request_timeout``, ``api_idle_timeout``)."""
RETRY_AFTER_SECONDS = 1
"""``Retry-After`` of a 503 answered because the node is at a bound."""
REFUSED_GRACE_SECONDS = 1.0
"""How long a refused connection may linger (half-closed) before it is cut."""
SWEEP_INTERVAL = 0.25
"""How often the deadlines of all connections are checked (the server's one timer)."""
LISTEN_BACKLOG = 1024


def sign_request(secret: str, method: str, target: str, timestamp: str, body: bytes) -> str:
    """The ``X-SBC-Signature`` for a request (shared by server and client)."""
    message = f"{method}\n{target}\n{timestamp}\n".encode() + body
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


class ApiError(Exception):
    """An HTTP-level error with a status and a stable code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retriable = status == 503
        """A 503 (the node is at a bound, or not ready) may succeed if repeated."""


@dataclass(frozen=True)
class ApiRequest:
    """One parsed request, handed to a route."""

    method: str
    path: str
    params: dict[str, str]
    body: Any
    path_args: tuple[str, ...] = field(default=())

    def param(self, name: str, default: str | None = None) -> str | None:
        """A query parameter."""
        return self.params.get(name, default)

    def flag(self, name: str) -> bool:
        """A boolean query parameter (``1``, ``true``, ``yes``)."""
        return self.params.get(name, "").lower() in ("1", "true", "yes")


Handler = Callable[[ApiRequest], Any]
"""A route's handler: a plain function (run on a handler thread) or an ``async``
one (run on the event loop: it must not block; await Raft instead)."""


@dataclass(frozen=True)
class InPool:
    """What an ``async`` route returns to build its answer on a handler thread.

    The route waits on the event loop without holding a thread (a long poll),
    then hands over the work that would stall the loop: ``build()`` runs on a
    handler thread, and its JSON-able result is encoded there.
    """

    build: Callable[[], Any]


@dataclass(frozen=True)
class Route:
    """``METHOD /path/{arg}/...`` mapped to a handler returning JSON-able data."""

    method: str
    pattern: str
    handler: Handler

    def match(self, method: str, path: str) -> tuple[str, ...] | None:
        """The path arguments if ``method`` and ``path`` are this route's, else ``None``."""
        want, got = _pattern_parts(self.pattern), path.strip("/").split("/")
        if method != self.method or len(want) != len(got):
            return None
        return _match(want, got)


def _pattern_parts(pattern: str) -> tuple[str | None, ...]:
    """A route pattern's segments, ``None`` for each ``{argument}``."""
    return tuple(None if w.startswith("{") and w.endswith("}") else w
                 for w in pattern.strip("/").split("/"))


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """Map an exception to an HTTP status and JSON error body."""
    if isinstance(exc, ApiError):
        status, code = exc.status, exc.code
    elif isinstance(exc, CommandRefusedError):
        status, code = 409, exc.code
    elif isinstance(exc, ConfigError):
        status, code = 400, "invalid_argument"
    elif isinstance(exc, OutcomeUnknownError):
        status, code = 504, "outcome_unknown"
    elif isinstance(exc, ConsensusError) and exc.retriable:
        status, code = 503, "unavailable"
    elif isinstance(exc, ConsensusError):
        status, code = 500, "internal"
    else:
        status, code = 500, "internal"
    return status, {"error": {
        "type": type(exc).__name__,
        "code": code,
        "message": str(exc),
        "retriable": bool(getattr(exc, "retriable", False)),
        "leader_hint": exc.leader_hint if isinstance(exc, NotLeaderError) else None,
    }}


class ApiServer:
    """The node's HTTP/1.1 API on one asyncio event loop, on a thread of its own.

    One loop parses every connection's requests (keep-alive and pipelined:
    answers go out in order), checks signatures and decodes JSON; ``async``
    routes run on the loop, plain ones in a pool of ``handler_threads``
    threads. Nothing is started per request: one sweep a quarter second
    enforces the deadlines. Past ``max_connections`` open connections a new
    one is answered ``503`` with ``Retry-After`` and closed; past
    ``max_in_flight`` requests being handled, a request is answered the same
    way on its own connection, which stays open.

    Args:
        address: ``host:port`` to listen on (bound by the constructor).
        routes: what to serve.
        secret: the cluster secret requests are signed with.
        metrics: ``/metrics`` (no signature); runs in the handler pool.
        tls_context: serve TLS with this context (see :func:`.tls.api_server_context`).
        health: ``/healthz`` (no signature); runs on the loop and must not block.
        max_connections: open connections kept; more are refused.
        max_in_flight: requests handled at once; more are refused.
        handler_threads: threads running plain (not ``async``) routes.
        request_timeout: longest a client may take to send one whole request
            (a byte-at-a-time client is cut off); handling is not bounded by it.
        idle_timeout: a kept-alive connection idle for longer is closed.
    """

    def __init__(
        self,
        address: str,
        routes: list[Route],
        *,
        secret: str,
        metrics: Callable[[], tuple[bytes, str]] | None = None,
        tls_context: ssl.SSLContext | None = None,
        health: Callable[[], tuple[int, dict[str, Any]]] | None = None,
        max_connections: int = 1024,
        max_in_flight: int = 256,
        handler_threads: int = 8,
        request_timeout: float = SOCKET_TIMEOUT,
        idle_timeout: float = SOCKET_TIMEOUT,
    ) -> None:
        if not secret:
            raise ConfigError("cluster_secret", "<redacted>", "the API needs the cluster secret")
        self.address = address
        self.routes = routes
        self._secret = secret.encode("utf-8")
        self._metrics = metrics
        self._health = health
        self._tls = tls_context
        self.max_connections = max_connections
        self.max_in_flight = max_in_flight
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self._table: dict[tuple[str, int], list[tuple[Route, tuple[str | None, ...], bool]]] = {}
        for route in routes:
            want = _pattern_parts(route.pattern)
            self._table.setdefault((route.method, len(want)), []).append(
                (route, want, inspect.iscoroutinefunction(route.handler)))
        host, port = parse_address(address, field_name="api_address")
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, port))
            self._sock.listen(LISTEN_BACKLOG)
            self._sock.setblocking(False)
            self._port = int(self._sock.getsockname()[1])
        except OSError as exc:
            self._sock.close()
            raise ConfigError("api_address", address, f"cannot listen: {exc.strerror}") from None
        self._pool = ThreadPoolExecutor(max_workers=handler_threads,
                                        thread_name_prefix=f"api-{address}-handler")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._stop: asyncio.Event | None = None
        self._connections: set[_Connection] = set()
        self._open = 0
        """Connections being served (refused ones not counted)."""
        self.in_flight = 0
        """Requests being handled now."""
        self.refused_connections = 0
        """Connections answered 503 because ``max_connections`` were open."""
        self.refused_requests = 0
        """Requests answered 503 because ``max_in_flight`` were being handled."""
        self.timed_out_connections = 0
        """Connections closed because a request did not arrive within ``request_timeout``."""

    @property
    def port(self) -> int:
        """The bound port."""
        return self._port

    @property
    def open_connections(self) -> int:
        """Connections open now (refused ones still closing included)."""
        return len(self._connections)

    def start(self) -> None:
        """Serve on a background thread running the event loop."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._serve, name=f"api-{self.address}",
                                        daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        """Stop serving: close the listener and every connection and wait for the
        loop thread. Handlers still running on the pool finish on their own (a
        long poll or a proposal ends when the node stops); their answers are
        dropped. Idempotent."""
        self._stopping.set()
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(self._stop.set)
            thread.join(10)
        self._thread = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._sock.close()

    # -- the loop thread -----------------------------------------------------------

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        loop.set_exception_handler(_loop_exception(self._stopping))
        try:
            loop.run_until_complete(self._main())
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._ready.set()

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await loop.create_server(lambda: _Connection(self), sock=self._sock,
                                          backlog=LISTEN_BACKLOG)
        sweeper = loop.create_task(self._sweep())
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            sweeper.cancel()
            server.close()
            for conn in list(self._connections):
                conn.abort()
            tasks = [t for t in asyncio.all_tasks(loop) if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.wait_closed()

    async def _sweep(self) -> None:
        """The one timer of the server: cut off slow requests and idle connections."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            for conn in list(self._connections):
                conn.check_deadlines(now)

    # -- requests ------------------------------------------------------------------

    def authorize(self, method: str, target: str, headers: Mapping[str, str],
                  body: bytes) -> None:
        """Check a request's signature headers (lower-case names); ApiError 401 if bad."""
        timestamp = headers.get("x-sbc-timestamp", "")
        signature = headers.get("x-sbc-signature", "")
        try:
            skew = abs(time.time() - float(timestamp))
        except ValueError:
            raise ApiError(401, "unauthenticated", "missing or malformed X-SBC-Timestamp") from None
        if skew > CLOCK_SKEW_SECONDS:
            raise ApiError(401, "unauthenticated", "request timestamp too far from server time")
        message = f"{method}\n{target}\n{timestamp}\n".encode() + body
        want = hmac.new(self._secret, message, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, signature):
            raise ApiError(401, "unauthenticated", "bad signature (wrong cluster secret?)")

    def _resolve(self, method: str, target: str, headers: Mapping[str, str],
                 raw: bytes) -> tuple[Route, ApiRequest, bool]:
        """Authenticate and parse a request, and find its route (on the loop)."""
        path, _, query = target.partition("?")
        self.authorize(method, target, headers, raw)
        params = {k: v[-1] for k, v in parse_qs(query).items()} if query else {}
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                raise ApiError(400, "invalid_json", "request body is not JSON") from None
        got = path.strip("/").split("/")
        for route, want, is_async in self._table.get((method, len(got)), ()):
            args = _match(want, got)
            if args is not None:
                return route, ApiRequest(method, path, params, body, args), is_async
        raise ApiError(404, "not_found", f"no route for {method} {path}")

    def dispatch(self, method: str, target: str, headers: Mapping[str, str],
                 raw: bytes) -> tuple[int, Any]:
        """Handle one request synchronously (a plain route only): status and result."""
        route, request, is_async = self._resolve(method, target, headers, raw)
        if is_async:
            raise ApiError(500, "internal", f"{route.pattern} is async; serve it on the loop")
        return 200, route.handler(request)

    def _handle(self, conn: _Connection, method: str, target: str,
                headers: Mapping[str, str], raw: bytes) -> None:
        """Start handling a complete request; ``conn.respond`` is called exactly once."""
        path = target.partition("?")[0]
        # Health and metrics are answered past the in-flight bound: a busy
        # node is alive, and its figures are what an operator needs then.
        if method == "GET" and path == "/healthz" and self._health is not None:
            status, health = self._health()
            conn.respond(status, json.dumps(health).encode(), JSON, ())
            return
        if method == "GET" and path == "/metrics" and self._metrics is not None:
            self.in_flight += 1
            self._offload(conn, functools.partial(_metrics_response, self._metrics))
            return
        if self.in_flight >= self.max_in_flight:
            self.refused_requests += 1
            _overload_log.log("in-flight", logging.WARNING,
                              "api %s: %d requests in flight (api_max_in_flight); answering 503",
                              self.address, self.in_flight)
            conn.respond(*_busy_response("requests"))
            return
        self.in_flight += 1
        try:
            route, request, is_async = self._resolve(method, target, headers, raw)
        except Exception as exc:
            self.in_flight -= 1
            conn.respond(*_error_response(exc, method, path))
            return
        if is_async:
            asyncio.get_running_loop().create_task(self._run_async(conn, route, request))
        else:
            self._offload(conn, functools.partial(_run_sync, functools.partial(
                route.handler, request), request))


    def _offload(self, conn: _Connection, work: Callable[[], _Response]) -> None:
        try:
            future = self._pool.submit(work)
        except RuntimeError:  # shutting down
            self.in_flight -= 1
            conn.respond(*_busy_response("shutdown"))
            return
        loop = asyncio.get_running_loop()

        def done(finished: Future[_Response]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the server stopped
                loop.call_soon_threadsafe(self._finish_offloaded, conn, finished)

        future.add_done_callback(done)

    def _finish_offloaded(self, conn: _Connection, finished: Future[_Response]) -> None:
        self.in_flight -= 1
        if finished.cancelled():
            conn.respond(*_busy_response("shutdown"))
            return
        conn.respond(*finished.result())  # _run_sync never raises

    async def _run_async(self, conn: _Connection, route: Route, request: ApiRequest) -> None:
        try:
            result = await route.handler(request)
            if isinstance(result, InPool):  # in flight until the handler thread is done
                self._offload(conn, functools.partial(_run_sync, result.build, request))
                return
            response: _Response = (200, json.dumps({"result": result}).encode(), JSON, ())
        except asyncio.CancelledError:
            self.in_flight -= 1
            conn.abort()
            raise
        except Exception as exc:
            response = _error_response(exc, request.method, request.path)
        self.in_flight -= 1
        conn.respond(*response)


_Response = tuple[int, bytes, str, tuple[tuple[str, str], ...]]
JSON = "application/json"


def _match(want: tuple[str | None, ...], got: list[str]) -> tuple[str, ...] | None:
    args = []
    for w, g in zip(want, got, strict=True):
        if w is None:
            if not g:
                return None
            args.append(g)
        elif w != g:
            return None
    return tuple(args)


def _metrics_response(metrics: Callable[[], tuple[bytes, str]]) -> _Response:
    payload, content_type = metrics()
    return 200, payload, content_type, ()


def _run_sync(build: Callable[[], Any], request: ApiRequest) -> _Response:
    """A plain route (or an :class:`InPool` answer) on a handler thread, its
    answer encoded there too."""
    try:
        return 200, json.dumps({"result": build()}).encode(), JSON, ()
    except Exception as exc:
        return _error_response(exc, request.method, request.path)


def _error_response(exc: BaseException, method: str, path: str) -> _Response:
    if not isinstance(exc, ConsensusError | ApiError):
        logger.exception("api: %s %s failed", method, path, exc_info=exc)
    status, body = error_body(exc)
    return status, json.dumps(body).encode(), JSON, ()


def _busy_response(what: str) -> _Response:
    exc = ApiError(503, "overloaded", f"node is at its limit of {what}; retry after "
                   f"{RETRY_AFTER_SECONDS} s or ask another node")
    _, body = error_body(exc)
    return 503, json.dumps(body).encode(), JSON, (("Retry-After", str(RETRY_AFTER_SECONDS)),)


_tls_failures = RateLimitedLog(logger)
_overload_log = RateLimitedLog(logger)


def _loop_exception(stopping: threading.Event) -> Callable[
        [asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """The loop's exception handler: rate-limited warnings instead of asyncio's
    ERROR lines for running out of file descriptors (asyncio then pauses
    accepting for a second: load, not a bug), and nothing but debug lines
    while the server stops (a paused accept may retry on the closed socket)."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        message = str(context.get("message", "event loop error"))
        if stopping.is_set():
            logger.debug("api: while stopping: %s: %s", message, exc)
            return
        level = logging.WARNING if isinstance(exc, OSError) else logging.ERROR
        _overload_log.log(message, level, "api: %s: %s", message, exc or "")

    return handle


_REASONS = {s.value: s.phrase for s in HTTPStatus}
_NO_BIO = ssl.MemoryBIO()
"""Placeholder of a plain connection's TLS buffers (never used)."""


class _Connection(asyncio.Protocol):
    """One client connection: reads requests in order and answers them in order
    (pipelined requests wait in the buffer until the one before is answered)."""

    def __init__(self, server: ApiServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._tls: ssl.SSLObject | None = None
        self._tls_in = self._tls_out = _NO_BIO
        self._handshaking = False
        self._buffer = bytearray()
        self._head: tuple[str, str, str, dict[str, str], int, int] | None = None
        """The parsed head of the request being received: method, target,
        version, headers, where its body starts, its length."""
        self._busy = False
        self._in_process = False
        self._paused = False
        self._close_after = False
        self._closed = False
        self._counted = False
        self._refused = False
        self._receiving_since: float | None = None
        self._idle_since = time.monotonic()

    # -- asyncio callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # a stream server's
        self._transport = transport
        server = self._server
        server._connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                # One write per answer, but the next request's answer must not
                # wait for the client's delayed ACK.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if server._open >= server.max_connections:
            self._refused = True
        else:
            server._open += 1
            self._counted = True
        if server._tls is not None:
            # TLS over memory buffers rather than asyncio's SSL transport: a
            # failed handshake's alert (say, "certificate required") then
            # reaches the client, which can tell its user why.
            self._tls_in, self._tls_out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self._tls = server._tls.wrap_bio(self._tls_in, self._tls_out, server_side=True)
            self._handshaking = True
            self._busy = True  # no request before the handshake is done...
            self._receiving_since = time.monotonic()  # ...which has the request's deadline
        elif self._refused:
            self._refuse()

    def data_received(self, data: bytes) -> None:
        if self._tls is not None:
            data = self._tls_received(data)
            if not data:
                return
        if self._refused or self._closed:
            return  # an answer is out already: drop what follows
        if not self._buffer and not self._busy:
            self._receiving_since = time.monotonic()
        self._buffer += data
        if self._busy:
            if len(self._buffer) > MAX_HEAD_BYTES + MAX_BODY_BYTES and not self._paused:
                self._paused = True  # a client pipelining far ahead waits for the answers
                self._transport.pause_reading()  # type: ignore[union-attr]
            return
        self._process()

    def _tls_received(self, data: bytes) -> bytes:
        """Decrypt ``data``; drive the handshake first. Returns the plaintext."""
        tls, transport = self._tls, self._transport
        if tls is None or transport is None or self._closed:
            return b""
        self._tls_in.write(data)
        if self._handshaking:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush_tls()
                return b""
            except (ssl.SSLError, ssl.CertificateError) as exc:
                self._flush_tls()  # the alert says why
                peer = transport.get_extra_info("peername") or ("?",)
                _tls_failures.log(str(getattr(exc, "reason", exc)), logging.INFO,
                                  "api: TLS handshake from %s failed: %s", peer[0],
                                  describe_failure(exc))
                transport.close()
                self._forget()
                return b""
            self._handshaking = False
            self._flush_tls()
            self._busy = False
            self._receiving_since = None
            self._idle_since = time.monotonic()
            if self._refused:
                self._refuse()
                return b""
        chunks = []
        try:
            while True:
                chunk = tls.read(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLError):  # closed by the client, or garbage
            self._flush_tls()
            self._close()
            return b""
        self._flush_tls()
        return b"".join(chunks)

    def _flush_tls(self) -> None:
        pending = self._tls_out.read() if self._tls is not None else b""
        if pending and self._transport is not None:
            self._transport.write(pending)

    def _write(self, data: bytes) -> None:
        if self._tls is None:
            self._transport.write(data)  # type: ignore[union-attr]
            return
        view = memoryview(data)
        while view:
            view = view[self._tls.write(view):]
        self._flush_tls()

    def _close(self) -> None:
        """Close after what is written (with TLS, a close_notify first)."""
        if self._closed or self._transport is None:
            return
        if self._tls is not None and not self._handshaking:
            with contextlib.suppress(ssl.SSLError):
                self._tls.unwrap()
            self._flush_tls()
        self._transport.close()
        self._forget()

    def eof_received(self) -> bool | None:
        if self._busy and not self._refused and self._tls is None:
            self._close_after = True  # answer the request, then close
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()

    # -- helpers -------------------------------------------------------------------

    def _forget(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server._connections.discard(self)
        if self._counted:
            self._server._open -= 1
        self._buffer.clear()

    def abort(self) -> None:
        """Close at once, unsent answers included."""
        if self._transport is not None:
            self._transport.abort()
        self._forget()

    def check_deadlines(self, now: float) -> None:
        """Called by the server's sweep: cut off a request that is too slow to
        arrive, an idle kept-alive connection, or a refused one that lingers."""
        server = self._server
        transport = self._transport
        if transport is None or self._closed:
            return
        if self._refused:
            if now - self._idle_since > REFUSED_GRACE_SECONDS:
                self.abort()
        elif self._receiving_since is not None:
            if now - self._receiving_since > server.request_timeout:
                server.timed_out_connections += 1
                logger.debug("api: a request took over %.3gs to arrive; closing",
                             server.request_timeout)
                self._close()
        elif not self._busy and now - self._idle_since > server.idle_timeout:
            self._close()

    def _refuse(self) -> None:
        server = self._server
        server.refused_connections += 1
        _overload_log.log("connections", logging.WARNING,
                          "api %s: %d connections open (api_max_connections); answering "
                          "new ones 503", server.address, server._open)
        self._close_after = True
        self.respond(*_busy_response("connections"))

    def _fail(self, status: int, code: str, message: str) -> None:
        """Answer a request that cannot be read, and close."""
        self._close_after = True
        self._busy = True
        self.respond(*_error_response(ApiError(status, code, message), "?", "?"))

    def _process(self) -> None:
        self._in_process = True
        try:
            while not self._busy and not self._closed and self._buffer:
                if not self._take_request():
                    return
        finally:
            self._in_process = False

    def _take_request(self) -> bool:
        """Parse and start one request if it has fully arrived; ``False`` if not."""
        buf = self._buffer
        head = self._head
        if head is None:
            end = buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    self._fail(431, "headers_too_large", f"request head over {MAX_HEAD_BYTES} "
                               "bytes")
                return False
            head = self._parse_head(bytes(buf[:end]).decode("latin-1"), end + 4)
            if head is None:
                return False
            self._head = head
        method, target, version, headers, start, length = head
        if len(buf) < start + length:
            if headers.get("expect", "").lower() == "100-continue":
                headers["expect"] = ""
                self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return False
        body = bytes(buf[start:start + length])
        del buf[:start + length]
        self._head = None
        connection = headers.get("connection", "").lower()
        self._close_after = self._close_after or (
            "keep-alive" not in connection if version == "HTTP/1.0" else "close" in connection)
        self._busy = True
        self._receiving_since = None
        self._server._handle(self, method, target, headers, body)
        return True

    def _parse_head(self, text: str, start: int
                    ) -> tuple[str, str, str, dict[str, str], int, int] | None:
        lines = text.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
            self._fail(400, "bad_request", "malformed request line")
            return None
        if len(lines) > MAX_HEADERS + 1:
            self._fail(431, "headers_too_large", f"over {MAX_HEADERS} header fields")
            return None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name[-1] in " \t":
                self._fail(400, "bad_request", "malformed header field")
                return None
            headers[name.lower()] = value.strip()
        if "transfer-encoding" in headers:
            self._fail(411, "length_required", "send a Content-Length, not a chunked body")
            return None
        length_text = headers.get("content-length", "0")
        if not length_text.isdigit():
            self._fail(400, "bad_request", "bad Content-Length")
            return None
        length = int(length_text)
        if length > MAX_BODY_BYTES:
            self._fail(413, "too_large", f"body over {MAX_BODY_BYTES} bytes")
            return None
        return parts[0], parts[1], parts[2], headers, start, length

    def respond(self, status: int, payload: bytes, content_type: str,
                extra: tuple[tuple[str, str], ...]) -> None:
        """Send the answer to the request being handled; go on with the next one."""
        transport = self._transport
        if self._closed or transport is None:
            return
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {content_type}"
                f"\r\nContent-Length: {len(payload)}\r\n")
        for name, value in extra:
            head += f"{name}: {value}\r\n"
        if self._close_after:
            head += "Connection: close\r\n"
        self._write(head.encode("latin-1") + b"\r\n" + payload)
        if self._close_after:
            if not self._refused:
                self._close()
            elif self._tls is None and transport.can_write_eof():
                # The client may still be sending its request: close our side
                # only, drop what it sends, and let the sweep close the rest,
                # so that it reads the answer rather than a reset.
                transport.write_eof()
                self._idle_since = time.monotonic()
            else:
                self._close()
            return
        self._busy = False
        self._idle_since = now = time.monotonic()
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if self._buffer:
            self._receiving_since = now
            if not self._in_process:
                self._process()
