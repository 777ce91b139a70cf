"""A small HTTP client for the node API, used by the CLI, the tests and the examples.

It signs requests with the cluster secret (see :mod:`streambus_consensus.api`),
speaks TLS when given a context (:func:`streambus_consensus.tls.client_context`),
keeps connections alive in a small pool per node, tries the given nodes in
turn and turns error bodies back into the package's typed errors.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .api import sign_request
from .config import parse_address
from .errors import (
    CommandRefusedError,
    ConfigError,
    ConsensusError,
    NoLeaderError,
    NotLeaderError,
    OutcomeUnknownError,
    ProposalRejectedError,
)
from .tls import describe_failure

__all__ = ["ApiClient", "ClusterUnreachableError"]

POOL_IDLE_SECONDS = 4.0
"""A kept-alive connection idle for longer is not reused: the server closes
idle connections after 10 s, and reusing one it is closing would fail."""


class ClusterUnreachableError(ConsensusError):
    """No node answered."""

    retriable = True


class ApiClient:
    """Talks to one or more nodes' HTTP APIs.

    Args:
        addresses: ``host:port`` of node APIs; tried in order, starting with
            the last one that answered.
        secret: the cluster secret (every request is signed with it).
        timeout: socket timeout per request.
        tls: a client TLS context, for nodes that serve the API with ``api_tls``.
        pool_size: kept-alive connections held per node.
        sleep: waits out a ``Retry-After`` (tests pass their own).
    """

    def __init__(self, addresses: Sequence[str], *, secret: str, timeout: float = 10.0,
                 tls: ssl.SSLContext | None = None, pool_size: int = 8,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not addresses:
            raise ValueError("at least one API address is needed")
        if not secret:
            raise ConfigError("cluster secret", "<redacted>",
                              "is required to sign requests (see 'cluster init')")
        for address in addresses:
            parse_address(address, field_name="api address")
        self.addresses = list(addresses)
        self.secret = secret
        self.timeout = timeout
        self.tls = tls
        self._preferred = 0
        self._pool_size = pool_size
        self._sleep = sleep
        self._idle: dict[str, list[tuple[float, http.client.HTTPConnection]]] = {}
        self._lock = threading.Lock()

    def request(self, method: str, path: str, body: Any = None, *,
                address: str | None = None) -> Any:
        """Send one request; return its ``result`` or raise the typed error.

        With ``address`` only that node is asked; otherwise each node is tried
        until one answers (connection failures move on to the next). A node
        at its connection or request bound answers 503 with ``Retry-After``
        without handling the request: the next node is tried, and when every
        one is busy the round is repeated after ``Retry-After`` (at most
        ``timeout`` after the call), then the 503 is raised as
        :class:`ProposalRejectedError` (retriable).
        """
        started, waited = time.monotonic(), 0.0
        while True:
            targets = [address] if address else (self.addresses[self._preferred:]
                                                  + self.addresses[:self._preferred])
            errors: list[str] = []
            busy: tuple[int, Any, float] | None = None
            for target in targets:
                try:
                    status, payload, retry_after = self._send(target, method, path, body)
                except (ssl.SSLError, ssl.CertificateError) as exc:
                    errors.append(f"{target}: TLS handshake failed: {describe_failure(exc)}")
                    continue
                except (OSError, http.client.HTTPException) as exc:  # e.g. cut mid-answer
                    hint = ""
                    if self.tls is None and isinstance(exc, http.client.RemoteDisconnected
                                                       | ConnectionResetError):
                        hint = " (if the node serves its API over TLS, give its CA file)"
                    errors.append(f"{target}: {exc or type(exc).__name__}{hint}")
                    continue
                if status == 503 and retry_after is not None:
                    busy = (status, payload, retry_after)  # not handled: ask another node
                    errors.append(f"{target}: busy")
                    continue
                if address is None:
                    self._preferred = self.addresses.index(target)
                return _result(status, payload)
            if busy is None:
                raise ClusterUnreachableError("no node answered: " + "; ".join(errors))
            wait = busy[2]
            if max(time.monotonic() - started, waited) + wait > self.timeout:
                return _result(busy[0], busy[1])
            self._sleep(wait)
            waited += wait

    def _send(self, address: str, method: str, path: str,
              body: Any) -> tuple[int, Any, float | None]:
        raw = b"" if body is None else json.dumps(body).encode()
        conn, reused = self._checkout(address)
        try:
            status, data, keep, retry_after = self._exchange(conn, method, path, raw)
        except TimeoutError:
            # The request reached the node, which is still handling it: sending
            # it again would have it handled twice.
            conn.close()
            raise
        except (OSError, http.client.HTTPException):
            conn.close()
            if not reused:
                raise
            # The node closed a kept-alive connection as we reused it: once more, fresh.
            conn, _ = self._connect(address), False
            try:
                status, data, keep, retry_after = self._exchange(conn, method, path, raw)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            conn.close()
            raise
        if keep:
            self._checkin(address, conn)
        else:
            conn.close()
        try:
            return status, json.loads(data) if data else None, retry_after
        except ValueError:
            raise OSError(f"non-JSON answer with status {status}") from None

    def _exchange(self, conn: http.client.HTTPConnection, method: str, path: str,
                  raw: bytes) -> tuple[int, bytes, bool, float | None]:
        timestamp = f"{time.time():.3f}"
        headers = {"Content-Type": "application/json", "Content-Length": str(len(raw)),
                   "X-SBC-Timestamp": timestamp,
                   "X-SBC-Signature": sign_request(self.secret, method, path, timestamp, raw)}
        conn.request(method, path, body=raw, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, data, not response.will_close, _seconds(
            response.getheader("Retry-After"))

    def _connect(self, address: str) -> http.client.HTTPConnection:
        host, port = parse_address(address)
        if self.tls is not None:
            return http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                               context=self.tls)
        return http.client.HTTPConnection(host, port, timeout=self.timeout)

    def _checkout(self, address: str) -> tuple[http.client.HTTPConnection, bool]:
        """A kept-alive connection to ``address`` if one is fresh, else a new one."""
        now = time.monotonic()
        with self._lock:
            idle = self._idle.get(address, [])
            while idle:
                since, conn = idle.pop()
                if now - since < POOL_IDLE_SECONDS:
                    return conn, True
                conn.close()
        return self._connect(address), False

    def _checkin(self, address: str, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(address, [])
            if len(idle) < self._pool_size:
                idle.append((time.monotonic(), conn))
                return
        conn.close()

    def close(self) -> None:
        """Close every kept-alive connection. The client stays usable."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for _, conn in conns:
                conn.close()

    def __del__(self) -> None:
        # Kept-alive sockets must not outlive the client that pooled them.
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self, address: str) -> dict[str, Any]:
        """``GET /v1/status`` of one node."""
        result: dict[str, Any] = self.request("GET", "/v1/status", address=address)
        return result


def _seconds(text: str | None) -> float | None:
    """A ``Retry-After`` in seconds (the HTTP-date form is not sent by nodes)."""
    if text is None:
        return None
    try:
        return max(0.0, min(float(text), 60.0))
    except ValueError:
        return None


def _result(status: int, payload: Any) -> Any:
    if status == 200 and isinstance(payload, dict) and "result" in payload:
        return payload["result"]
    error = payload.get("error", {}) if isinstance(payload, dict) else {}
    message = str(error.get("message", f"HTTP {status}"))
    code = str(error.get("code", "unknown"))
    kind = error.get("type", "")
    if status == 409:
        raise CommandRefusedError(code, message.split(": ", 1)[-1])
    if status == 504:
        raise OutcomeUnknownError(message)
    if kind == "NotLeaderError":
        raise NotLeaderError(message, leader_hint=error.get("leader_hint"))
    if kind == "NoLeaderError":
        raise NoLeaderError(message)
    if status == 503:
        raise ProposalRejectedError(message)
    raise ConsensusError(f"{code}: {message}")
