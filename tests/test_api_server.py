"""The HTTP front end (:class:`ApiServer`) over real sockets on 127.0.0.1.

No Raft here: routes are small functions, so each test shows one property of
the server itself: keep-alive and pipelining, the connection and in-flight
bounds (503 + Retry-After), deadlines against slow and idle clients, the body
limit, TLS with client certificates, plain and async routes, and shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from streambus_consensus import tls
from streambus_consensus.api import ApiError, ApiRequest, ApiServer, Route, error_body
from streambus_consensus.certs import issue_certificate, make_ca
from streambus_consensus.client import ApiClient, ClusterUnreachableError
from streambus_consensus.config import NodeConfig
from streambus_consensus.errors import ProposalRejectedError, ProposalTimeoutError
from streambus_consensus.metrics import PREFIX, api_metrics
from streambus_consensus.raft.aio import wait_outcome
from streambus_consensus.testing.harness import free_ports, wait_until

SECRET = "api-server-test-secret-0123"


class _Gate:
    """A route that blocks (a plain one, on a handler thread) until opened."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.entered = threading.Semaphore(0)

    def handler(self, request: ApiRequest) -> Any:
        self.entered.release()
        self.opened.wait(10)
        return {"gate": "passed"}


def routes(gate: _Gate) -> list[Route]:
    async def echo(request: ApiRequest) -> Any:
        await asyncio.sleep(0)
        return {"echo": request.path_args[0], "body": request.body}

    def plain(request: ApiRequest) -> Any:
        return {"plain": True, "thread": threading.current_thread().name}

    async def fails(request: ApiRequest) -> Any:
        raise ApiError(409, "refused_here", "no")

    return [Route("GET", "/v1/echo/{x}", echo), Route("POST", "/v1/echo/{x}", echo),
            Route("GET", "/v1/plain", plain), Route("GET", "/v1/gate", gate.handler),
            Route("GET", "/v1/fails", fails)]


@pytest.fixture
def gate() -> Iterator[_Gate]:
    g = _Gate()
    yield g
    g.opened.set()


@pytest.fixture
def serve(gate: _Gate) -> Iterator[Any]:
    servers: list[ApiServer] = []

    def start(**options: Any) -> ApiServer:
        server = ApiServer(f"127.0.0.1:{free_ports(1)[0]}", routes(gate), secret=SECRET,
                           health=lambda: (200, {"ok": True}), **options)
        server.start()
        servers.append(server)
        return server

    yield start
    gate.opened.set()
    for server in servers:
        server.stop()


def signed(method: str, target: str, body: bytes = b"", *, close: bool = False) -> bytes:
    timestamp = f"{time.time():.3f}"
    signature = hmac.new(SECRET.encode(), f"{method}\n{target}\n{timestamp}\n".encode() + body,
                         hashlib.sha256).hexdigest()
    return (f"{method} {target} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n"
            f"X-SBC-Timestamp: {timestamp}\r\nX-SBC-Signature: {signature}\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


class _Reader:
    """Reads HTTP/1.1 answers (with Content-Length) off a socket, in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def answer(self, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
        self.sock.settimeout(timeout)
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before an answer")
            self.buffer += chunk
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed mid-answer")
            rest += chunk
        self.buffer = rest[length:]
        return int(lines[0].split(" ")[1]), headers, rest[:length]

    def closed(self, timeout: float) -> bool:
        """Whether the server closes the connection within ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            return False
        except OSError:
            return True
        return True


@contextlib.contextmanager
def connect(server: ApiServer) -> Iterator[_Reader]:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        yield _Reader(sock)
    finally:
        sock.close()


def test_keep_alive_and_pipelined_requests_are_answered_in_order(serve: Any) -> None:
    server = serve()
    with connect(server) as conn:
        conn.sock.sendall(b"".join(signed("GET", f"/v1/echo/{i}") for i in range(5))
                          + signed("POST", "/v1/echo/b", b'{"n": 1}'))
        for i in range(5):
            status, _, body = conn.answer()
            assert status == 200 and json.loads(body)["result"]["echo"] == str(i)
        status, _, body = conn.answer()
        assert json.loads(body)["result"] == {"echo": "b", "body": {"n": 1}}
        conn.sock.sendall(signed("GET", "/v1/plain"))  # the same connection, later
        status, headers, body = conn.answer()
        assert status == 200 and json.loads(body)["result"]["plain"] is True
        assert "connection" not in headers
        conn.sock.sendall(signed("GET", "/v1/echo/last", close=True))
        assert conn.answer()[1]["connection"] == "close"
        assert conn.closed(5)


def test_plain_routes_run_on_handler_threads_and_async_ones_do_not_wait_for_them(
        serve: Any, gate: _Gate) -> None:
    server = serve(handler_threads=2)
    client = ApiClient([f"127.0.0.1:{server.port}"], secret=SECRET)
    blocked = threading.Thread(target=client.request, args=("GET", "/v1/gate"), daemon=True)
    blocked.start()
    assert gate.entered.acquire(timeout=5)
    # One handler thread is held: async routes, and the other thread, still answer.
    assert client.request("GET", "/v1/echo/x")["echo"] == "x"
    assert client.request("GET", "/v1/plain")["thread"].startswith("api-")
    with pytest.raises(Exception, match="refused_here"):
        client.request("GET", "/v1/fails")
    gate.opened.set()
    blocked.join(5)
    client.close()


def test_errors_keep_their_status_and_typed_body(serve: Any) -> None:
    server = serve()
    with connect(server) as conn:
        conn.sock.sendall(signed("GET", "/v1/nowhere") + b"GET /v1/plain HTTP/1.1\r\n\r\n"
                          + signed("POST", "/v1/echo/x", b"{not json"))
        assert conn.answer()[0] == 404
        status, _, body = conn.answer()
        assert status == 401 and json.loads(body)["error"]["code"] == "unauthenticated"
        assert conn.answer()[0] == 400
        conn.sock.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")  # needs no signature
        assert conn.answer()[0] == 200


def test_past_the_connection_bound_a_new_connection_gets_503_at_once(serve: Any) -> None:
    server = serve(max_connections=2)
    with connect(server) as first, connect(server) as second:
        for conn in (first, second):
            conn.sock.sendall(signed("GET", "/v1/plain"))
            assert conn.answer()[0] == 200
        with connect(server) as third:
            # Answered before it sends anything, then closed; it reads the answer, not a reset.
            status, headers, body = third.answer()
            assert status == 503 and headers["retry-after"] == "1"
            assert json.loads(body)["error"]["code"] == "overloaded"
            assert headers["connection"] == "close"
            third.sock.sendall(signed("GET", "/v1/plain"))
            assert third.closed(5)
        assert server.refused_connections == 1
        exposed = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for m in api_metrics(server, "n1") for s in m.samples}
        assert exposed[PREFIX + "api_refused_total", (("kind", "connections"),
                                                      ("node_id", "n1"))] == 1
    # Closed connections free their slots.
    wait_until(lambda: server.open_connections == 0, 5, "connections to close")
    with connect(server) as again:
        again.sock.sendall(signed("GET", "/v1/plain"))
        assert again.answer()[0] == 200


def test_past_the_in_flight_bound_a_request_gets_503_and_its_connection_stays(
        serve: Any, gate: _Gate) -> None:
    server = serve(max_in_flight=1)
    with connect(server) as holder, connect(server) as other:
        holder.sock.sendall(signed("GET", "/v1/gate"))
        assert gate.entered.acquire(timeout=5)
        other.sock.sendall(signed("GET", "/v1/echo/x"))
        status, headers, _ = other.answer()
        assert status == 503 and headers["retry-after"] == "1"
        assert "connection" not in headers
        other.sock.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")  # a busy node is alive
        assert other.answer()[0] == 200
        gate.opened.set()
        assert holder.answer()[0] == 200
        other.sock.sendall(signed("GET", "/v1/echo/y"))
        assert other.answer()[0] == 200
    assert server.refused_requests == 1


def test_the_client_moves_on_from_a_busy_node_and_waits_out_retry_after(serve: Any) -> None:
    busy, free = serve(max_connections=1), serve()
    with connect(busy) as holder:
        holder.sock.sendall(signed("GET", "/v1/plain"))
        assert holder.answer()[0] == 200
        client = ApiClient([f"127.0.0.1:{busy.port}", f"127.0.0.1:{free.port}"], secret=SECRET)
        assert client.request("GET", "/v1/echo/a")["echo"] == "a"
        client.close()
        waits: list[float] = []
        alone = ApiClient([f"127.0.0.1:{busy.port}"], secret=SECRET, timeout=2.5,
                          sleep=waits.append)
        with pytest.raises(ProposalRejectedError, match="limit of connections"):
            alone.request("GET", "/v1/echo/b")
        assert waits == [1.0, 1.0]  # two retries fit in the 2.5 s deadline, not a third
        alone.close()


def test_a_request_that_timed_out_on_a_kept_alive_connection_is_not_sent_again(
        serve: Any, gate: _Gate) -> None:
    """The client sends a request again on a fresh connection only when the
    node closed the kept-alive one before answering (its close crossed our
    request). A request that reached the node and timed out waiting for the
    answer is not re-sent: the node is handling it (a write without a request
    id would be applied twice, a long poll would wait twice as long)."""
    server = serve()
    client = ApiClient([f"127.0.0.1:{server.port}"], secret=SECRET, timeout=0.5)
    assert client.request("GET", "/v1/plain")["plain"]  # a kept-alive connection now
    with pytest.raises(ClusterUnreachableError, match="timed out"):
        client.request("GET", "/v1/gate")
    assert gate.entered.acquire(timeout=1)
    assert not gate.entered.acquire(timeout=0.5), "the timed-out request was sent again"
    gate.opened.set()
    client.close()


def test_a_byte_at_a_time_client_is_cut_off_while_others_are_served(serve: Any) -> None:
    server = serve(request_timeout=1.0)
    request = signed("GET", "/v1/plain")
    with connect(server) as slow:
        started = time.monotonic()
        cut = False
        for i in range(len(request)):
            try:
                slow.sock.sendall(request[i:i + 1])
            except OSError:
                cut = True
                break
            if slow.closed(0.05):
                cut = True
                break
            if i % 10 == 0:  # meanwhile, another client is served
                with connect(server) as fast:
                    fast.sock.sendall(signed("GET", "/v1/echo/f"))
                    assert fast.answer()[0] == 200
        assert cut, "a trickling request must be cut off"
        assert time.monotonic() - started < 10
    assert server.timed_out_connections >= 1


def test_an_idle_kept_alive_connection_is_closed(serve: Any) -> None:
    server = serve(idle_timeout=0.5)
    with connect(server) as conn:
        conn.sock.sendall(signed("GET", "/v1/plain"))
        assert conn.answer()[0] == 200
        assert conn.closed(5)


def test_an_oversized_body_gets_413_and_the_connection_is_closed(serve: Any) -> None:
    server = serve()
    with connect(server) as conn:
        conn.sock.sendall(b"POST /v1/echo/x HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n")
        status, _, body = conn.answer()
        assert status == 413 and json.loads(body)["error"]["code"] == "too_large"
        assert conn.closed(5)
    with connect(server) as conn:
        conn.sock.sendall(b"GET /v1/plain HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        assert conn.answer()[0] == 431
        assert conn.closed(5)


def test_expect_100_continue_gets_its_interim_answer(serve: Any) -> None:
    server = serve()
    body = json.dumps({"pad": "x" * 2000}).encode()
    request = signed("POST", "/v1/echo/e", body)
    head, _, _ = request.partition(b"\r\n\r\n")
    with connect(server) as conn:
        conn.sock.sendall(head + b"\r\nExpect: 100-continue\r\n\r\n")
        assert conn.answer()[0] == 100
        conn.sock.sendall(body)
        status, _, answer = conn.answer()
        assert status == 200 and json.loads(answer)["result"]["echo"] == "e"


def test_stop_closes_every_connection_and_frees_the_port(serve: Any, gate: _Gate) -> None:
    server = serve()
    with connect(server) as idle, connect(server) as waiting:
        waiting.sock.sendall(signed("GET", "/v1/gate"))
        assert gate.entered.acquire(timeout=5)
        gate.opened.set()  # the handler thread may finish; its answer is not sent
        server.stop()
        assert idle.closed(5) and waiting.closed(5)
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", server.port))
    server.stop()  # idempotent


def test_tls_with_client_certificates(serve: Any, tmp_path: Path) -> None:
    ca = make_ca()
    files = {}
    for name in ("node", "client"):
        issued = issue_certificate(ca, name, ("127.0.0.1",))
        files[name] = (tmp_path / f"{name}.pem", tmp_path / f"{name}.key")
        files[name][0].write_bytes(issued.cert_pem)
        files[name][1].write_bytes(issued.key_pem)
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    config = NodeConfig(node_id="n1", cluster={"n1": "127.0.0.1:1"}, cluster_secret=SECRET,
                        api_address="127.0.0.1:2", api_tls=True,
                        tls_cert_file=str(files["node"][0]), tls_key_file=str(files["node"][1]),
                        tls_ca_file=str(tmp_path / "ca.pem"))
    server = serve(tls_context=tls.api_server_context(config))
    address = f"127.0.0.1:{server.port}"
    with ApiClient([address], secret=SECRET, tls=tls.client_context(
            str(tmp_path / "ca.pem"), str(files["client"][0]), str(files["client"][1]))) as ok:
        for i in range(3):  # kept alive over TLS
            assert ok.request("GET", f"/v1/echo/{i}")["echo"] == str(i)
        assert ok.request("GET", "/v1/plain")["plain"] is True
    no_cert = ApiClient([address], secret=SECRET,
                        tls=tls.client_context(str(tmp_path / "ca.pem")), timeout=5)
    with pytest.raises(Exception, match=r"requires? a client certificate"):
        no_cert.request("GET", "/v1/echo/x")
    no_cert.close()
    with connect(server) as plain:  # not TLS at all: dropped
        plain.sock.sendall(signed("GET", "/v1/plain"))
        assert plain.closed(5)


class _NodeTwin:
    """What :func:`wait_outcome` reads of a node."""

    def __init__(self) -> None:
        self.config = NodeConfig(node_id="n1", cluster={"n1": "127.0.0.1:1"},
                                 proposal_timeout=0.2)
        self.node_id = "n1"
        self.proposals_failed: dict[str, int] = {"ProposalTimeoutError": 0}


def test_a_proposal_without_outcome_is_the_same_typed_504_as_the_blocking_path() -> None:
    node = _NodeTwin()
    never: Future[Any] = Future()
    with pytest.raises(ProposalTimeoutError, match="may still be applied") as info:
        asyncio.run(wait_outcome(node, never))  # type: ignore[arg-type]
    assert error_body(info.value)[0] == 504
    assert node.proposals_failed["ProposalTimeoutError"] == 1
    done: Future[Any] = Future()
    done.set_result(7)
    assert asyncio.run(wait_outcome(node, done)) == 7  # type: ignore[arg-type]


def test_outcomes_resolved_together_on_another_thread_all_arrive() -> None:
    node = _NodeTwin()
    futures: list[Future[Any]] = [Future() for _ in range(50)]

    def resolve_all() -> None:  # as the node's worker does, a batch at a time
        for i, future in enumerate(futures):
            if i % 10 == 9:
                future.set_exception(ProposalRejectedError(f"no {i}"))
            else:
                future.set_result(i)

    async def main() -> list[Any]:
        waits = [asyncio.ensure_future(wait_outcome(node, f, 5.0))  # type: ignore[arg-type]
                 for f in futures]
        await asyncio.sleep(0)
        threading.Thread(target=resolve_all).start()
        return await asyncio.gather(*waits, return_exceptions=True)

    outcomes = asyncio.run(main())
    for i, outcome in enumerate(outcomes):
        if i % 10 == 9:
            assert isinstance(outcome, ProposalRejectedError) and str(outcome) == f"no {i}"
        else:
            assert outcome == i


_FD_CHILD = """
import logging, resource, socket, sys, time
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
from streambus_consensus.api import ApiServer, Route

async def ok(request):
    return {}

server = ApiServer(sys.argv[1], [Route("GET", "/v1/x", ok)], secret="s" * 20)
server.start()
resource.setrlimit(resource.RLIMIT_NOFILE, (48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print("ready", flush=True)
sys.stdin.readline()  # the parent holds its connections, then says when
server.stop()
"""


def test_running_out_of_file_descriptors_is_one_warning_not_a_spin(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_ports(1)[0]}"
    child = subprocess.Popen([sys.executable, "-c", _FD_CHILD, address], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    socks: list[socket.socket] = []
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        port = int(address.rsplit(":", 1)[1])
        for _ in range(80):  # more than the child's 48 descriptors
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(2.5)  # asyncio retries the accept every second meanwhile
        child.stdin.write("stop\n")
        child.stdin.flush()
        _, err = child.communicate(timeout=20)
    finally:
        for sock in socks:
            sock.close()
        if child.poll() is None:
            child.kill()
            child.wait()
    lines = err.splitlines()
    assert not [line for line in lines if line.startswith(("ERROR", "CRITICAL"))], err
    assert len([line for line in lines if "out of system resource" in line]) == 1, err


def test_waits_with_different_deadlines_share_one_timer_and_each_expires() -> None:
    node = _NodeTwin()

    async def main() -> list[Any]:
        never: list[Future[Any]] = [Future() for _ in range(3)]
        answered: Future[Any] = Future()
        waits = [asyncio.ensure_future(wait_outcome(node, f, t))  # type: ignore[arg-type]
                 for f, t in zip([*never, answered], [0.3, 0.1, 0.05, 5.0], strict=True)]
        await asyncio.sleep(0.02)
        answered.set_result("kept")  # resolved before every deadline: not expired
        return await asyncio.gather(*waits, return_exceptions=True)

    *expired, kept = asyncio.run(main())
    assert all(isinstance(e, ProposalTimeoutError) for e in expired), expired
    assert kept == "kept"
    assert node.proposals_failed["ProposalTimeoutError"] == 3
