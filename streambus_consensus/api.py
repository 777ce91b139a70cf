"""The node's HTTP API: JSON over HTTP/1.1, one server per node.

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
machine, 503 retry later or elsewhere (no leader, not leader, queue full),
504 outcome unknown (retry only with the same request id).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

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

__all__ = ["ApiError", "ApiRequest", "ApiServer", "Route", "sign_request"]

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
CLOCK_SKEW_SECONDS = 60
SOCKET_TIMEOUT = 10.0
"""Longest a client may take to send one whole request (and idle between requests)."""


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


@dataclass(frozen=True)
class Route:
    """``METHOD /path/{arg}/...`` mapped to a handler returning JSON-able data."""

    method: str
    pattern: str
    handler: Handler

    def match(self, method: str, path: str) -> tuple[str, ...] | None:
        if method != self.method:
            return None
        want = self.pattern.strip("/").split("/")
        got = path.strip("/").split("/")
        if len(want) != len(got):
            return None
        args = []
        for w, g in zip(want, got, strict=True):
            if w.startswith("{") and w.endswith("}"):
                if not g:
                    return None
                args.append(g)
            elif w != g:
                return None
        return tuple(args)


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
    """A threaded HTTP server with the routes given; started and stopped by its node."""

    def __init__(
        self,
        address: str,
        routes: list[Route],
        *,
        secret: str,
        metrics: Callable[[], tuple[bytes, str]] | None = None,
        tls_context: ssl.SSLContext | None = None,
        health: Callable[[], tuple[int, dict[str, Any]]] | None = None,
    ) -> None:
        if not secret:
            raise ConfigError("cluster_secret", "<redacted>", "the API needs the cluster secret")
        self.address = address
        self.routes = routes
        self._secret = secret
        self._metrics = metrics
        self._health = health
        host, port = parse_address(address, field_name="api_address")
        self._httpd = _Server((host, port), _make_handler(self))
        self._httpd.tls_context = tls_context
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        """Serve on a background thread."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={
            "poll_interval": 0.2}, name=f"api-{self.address}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self._httpd.server_close()

    def authorize(self, method: str, target: str, headers: Any, body: bytes) -> None:
        timestamp = headers.get("X-SBC-Timestamp", "")
        signature = headers.get("X-SBC-Signature", "")
        try:
            skew = abs(time.time() - float(timestamp))
        except ValueError:
            raise ApiError(401, "unauthenticated", "missing or malformed X-SBC-Timestamp") from None
        if skew > CLOCK_SKEW_SECONDS:
            raise ApiError(401, "unauthenticated", "request timestamp too far from server time")
        want = sign_request(self._secret, method, target, timestamp, body)
        if not hmac.compare_digest(want, signature):
            raise ApiError(401, "unauthenticated", "bad signature (wrong cluster secret?)")

    def dispatch(self, method: str, target: str, headers: Any, raw: bytes) -> tuple[int, Any]:
        parts = urlsplit(target)
        self.authorize(method, target, headers, raw)
        params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                raise ApiError(400, "invalid_json", "request body is not JSON") from None
        for route in self.routes:
            args = route.match(method, parts.path)
            if args is not None:
                return 200, route.handler(ApiRequest(method, parts.path, params, body, args))
        raise ApiError(404, "not_found", f"no route for {method} {parts.path}")


_tls_failures = RateLimitedLog(logger)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the default 5 resets connections under concurrent callers
    tls_context: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Run the TLS handshake (if any) on the connection's own thread, then serve it."""
        if self.tls_context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(SOCKET_TIMEOUT)
        try:
            wrapped = self.tls_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, ssl.CertificateError) as exc:
            _tls_failures.log(str(getattr(exc, "reason", exc)), logging.INFO,
                              "api: TLS handshake from %s failed: %s", client_address[0],
                              describe_failure(exc))
            return
        except OSError:
            return  # closed or timed out mid-handshake
        try:
            super().finish_request(wrapped, client_address)
        finally:
            wrapped.close()


def _make_handler(api: ApiServer) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "streambus-consensus"
        timeout = SOCKET_TIMEOUT
        # Headers and body go out in separate writes; without this, Nagle holds
        # the body until the client's delayed ACK (~40 ms per kept-alive request).
        disable_nagle_algorithm = True

        def handle_one_request(self) -> None:
            # One deadline for receiving the whole request: the socket timeout
            # alone is per read, so a client sending a byte at a time would
            # hold a server thread forever. Handling is not bounded by it.
            self._read_deadline = threading.Timer(SOCKET_TIMEOUT, self._abort)
            self._read_deadline.daemon = True
            self._read_deadline.start()
            try:
                super().handle_one_request()
            finally:
                self._read_deadline.cancel()

        def _abort(self) -> None:
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("api %s " + format, self.client_address[0], *args)

        def _read_body(self) -> bytes:
            length_text = self.headers.get("Content-Length", "0")
            try:
                length = int(length_text)
            except ValueError:
                raise ApiError(400, "bad_request", "bad Content-Length") from None
            if length < 0 or length > MAX_BODY_BYTES:
                raise ApiError(413, "too_large", f"body over {MAX_BODY_BYTES} bytes")
            return self.rfile.read(length) if length else b""

        def _handle(self, method: str) -> None:
            path = urlsplit(self.path).path
            if method == "GET" and path == "/metrics" and api._metrics:
                self._read_deadline.cancel()  # no body: the request is in
                payload, content_type = api._metrics()
                self._send(200, payload, content_type)
                return
            if method == "GET" and path == "/healthz" and api._health:
                self._read_deadline.cancel()
                status, health = api._health()
                self._send(status, json.dumps(health).encode(), "application/json")
                return
            try:
                raw = self._read_body()
                self._read_deadline.cancel()
                status, result = api.dispatch(method, self.path, self.headers, raw)
                body = {"result": result}
            except Exception as exc:
                if not isinstance(exc, ConsensusError | ApiError):
                    logger.exception("api: %s %s failed", method, self.path)
                status, body = error_body(exc)
                if status == 413:
                    self.close_connection = True
            self._send(status, json.dumps(body).encode(), "application/json")

        def _send(self, status: int, payload: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

        def do_DELETE(self) -> None:
            self._handle("DELETE")

        def do_PUT(self) -> None:
            self._handle("PUT")

    return _Handler
