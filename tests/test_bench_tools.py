"""The benchmark's own machinery: target verdicts, the report's wording, the flooder.

No figure is asserted here (performance goals live in ``make bench``); these
check that the bench judges and reports what it measured correctly, and that
the flooder holds real TCP connections and counts the ones a server cuts.
"""

from __future__ import annotations

import re
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from streambus_consensus.bench import _flooder
from streambus_consensus.bench._canned import CannedServer, capture
from streambus_consensus.bench.common import command_in_words
from streambus_consensus.bench.etcd import ENV, EtcdCaller, ensure_etcd, range_body
from streambus_consensus.bench.report import render
from streambus_consensus.bench.versus_etcd import ceilings, targets, verdicts
from streambus_consensus.client import ApiClient


def _figures(etcd_ops: float, http_ops: float, embedded_ops: float, etcd_p50: float,
             http_p50: float, embedded_p50: float) -> dict[str, Any]:
    def system(ops: float, p50: float) -> dict[str, Any]:
        return {"create_many": {"ops_per_s": ops, "p50_ms": 10.0},
                "create_one": {"ops_per_s": 1e3 / p50, "p50_ms": p50},
                "read_many": {"ops_per_s": 2 * ops, "p50_ms": 5.0},
                "read_one": {"ops_per_s": 1e3, "p50_ms": 1.0}}

    return {"etcd": system(etcd_ops, etcd_p50), "http": system(http_ops, http_p50),
            "embedded": system(embedded_ops, embedded_p50)}


def test_targets_are_ratios_against_etcd_and_verdicts_follow_the_bounds() -> None:
    ratios = targets(_figures(etcd_ops=500, http_ops=1000, embedded_ops=1400, etcd_p50=2.0,
                              http_p50=2.0, embedded_p50=1.6))
    assert ratios["http_create_many_vs_etcd"] == 2.0
    assert ratios["http_read_many_vs_etcd"] == 2.0
    assert ratios["embedded_create_many_vs_etcd"] == 2.8
    assert ratios["http_create_one_p50_vs_etcd"] == 1.0
    met = {v["key"]: v["met"] for v in verdicts(ratios)}
    assert met == {"http_create_many_vs_etcd": True, "http_read_many_vs_etcd": False,
                   "http_create_one_p50_vs_etcd": True, "embedded_create_many_vs_etcd": False,
                   "embedded_create_one_p50_ms": False}


def test_a_missing_figure_gives_no_verdict_rather_than_a_wrong_one() -> None:
    figures = _figures(500, 1000, 1400, 2.0, 2.0, 1.0)
    figures["etcd"]["create_many"]["ops_per_s"] = None
    checks = {v["key"]: v for v in verdicts(targets(figures))}
    assert checks["http_create_many_vs_etcd"]["met"] is None
    assert checks["embedded_create_one_p50_ms"]["met"] is True


def _meta() -> dict[str, Any]:
    return {"date": "2026-01-01T00:00:00+00:00", "mode": "quick",
            "command": "/somewhere/venv/bin/python -m streambus_consensus.bench --out /x/y",
            "machine": {"nproc": 2, "cpu_model": "a CPU", "memory_gib": 4.0, "kernel": "Linux 6",
                        "virtual": True, "disk": {"path": "/tmp/a", "device": "/dev/vda",
                                                  "mount": "/", "fs": "ext4",
                                                  "kind": "rotational"}},
            "versions": {"python": "3.11", "pysyncobj": "0.3.17", "streambus_consensus": "0",
                         "git_commit": "abc"},
            "loadavg_at_start": [0.1, 0.1, 0.1], "loadavg_at_end": [0.1, 0.1, 0.1],
            "total_seconds": 1.0}


def test_report_says_why_etcd_was_skipped_and_names_no_absolute_path(tmp_path: Path) -> None:
    text = render(_meta(), {"etcd": {"skipped": "etcd is not installed (no apt-get)"}},
                  tmp_path / "BENCHMARKS.md", tmp_path / "results")
    assert "Skipped: etcd is not installed (no apt-get)." in text
    assert "skipped: etcd is not installed" in text  # the targets table says it too
    assert "a virtual machine with 2 CPUs" in text
    for path in ("/dev/vda", "/somewhere", "/x/y", "/tmp/a"):
        assert path not in text


def test_command_in_words_keeps_relative_words_and_drops_absolute_paths() -> None:
    assert command_in_words("/opt/py/bin/python -m mod --out /data/run --quick") == \
        "python -m mod --out DIR --quick"


def _server(cut_every: int) -> tuple[socket.socket, threading.Event, list[int]]:
    """A real TCP server on 127.0.0.1 answering each request; closes every ``cut_every``th."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    stop = threading.Event()
    accepted = [0]

    def serve(conn: socket.socket, n: int) -> None:
        with conn:
            conn.settimeout(5)
            try:
                if conn.recv(4096):
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                if n % cut_every == 0:
                    return  # cut
                stop.wait(10)
            except OSError:
                return

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            accepted[0] += 1
            threading.Thread(target=serve, args=(conn, accepted[0]), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener, stop, accepted


def test_flooder_holds_connections_and_counts_the_ones_the_server_cuts() -> None:
    listener, stop, accepted = _server(cut_every=4)
    try:
        port = listener.getsockname()[1]
        counts = _flooder.flood("127.0.0.1", port, 20, 1.5)
    finally:
        stop.set()
        listener.close()
    assert counts["connected"] >= 20
    assert counts["responses"] >= 20
    assert counts["cut"] >= 5  # every 4th of the first 20, then their reconnections
    assert counts["connected"] == counts["connects_started"]
    assert accepted[0] >= 20


def test_without_etcd_and_without_a_way_to_install_it_the_reason_is_one_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    tried: list[str] = []

    def installer(_log: Any) -> str:
        tried.append("apt-get")
        return "no apt-get on this machine"

    binary, why = ensure_etcd(lambda _: None, candidates=[], installer=installer)
    assert binary is None and tried == ["apt-get"]
    assert why == "etcd is not installed and installing etcd-server failed: " \
        "no apt-get on this machine"
    assert "\n" not in why


def test_the_comparison_can_be_turned_off_or_pointed_at_a_binary(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV, "off")
    assert ensure_etcd(lambda _: None)[0] is None
    fake = tmp_path / "etcd"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv(ENV, str(fake))
    assert ensure_etcd(lambda _: None) == (str(fake), f"given by {ENV}")


def test_flooder_pings_keep_connections_busy() -> None:
    listener, stop, _accepted = _server(cut_every=10**9)
    try:
        counts = _flooder.flood("127.0.0.1", listener.getsockname()[1], 5, 1.5, ping=0.2)
    finally:
        stop.set()
        listener.close()
    assert counts["cut"] == 0 and counts["open_at_end"] == 5
    assert counts["pings"] >= 5


def test_the_committed_benchmarks_name_no_path_of_the_machine_they_ran_on() -> None:
    root = Path(__file__).resolve().parents[1]
    text = (root / "BENCHMARKS.md").read_text(encoding="utf-8")
    found = re.findall(r"(?<![\w.`])/(?:root|home|tmp|work|usr|var|dev|opt|proc|mnt)/\S*", text)
    assert found == []


# -- the load generator's ceiling ---------------------------------------------------------


def test_ceilings_are_the_callers_ceiling_over_each_systems_figure() -> None:
    figures = _figures(500, 1000, 1400, 2.0, 2.0, 1.0)
    figures["etcd_ceiling"] = _figures(2000, 0, 0, 0.5, 1.0, 1.0)["etcd"]
    figures["http_ceiling"] = _figures(1500, 0, 0, 0.5, 1.0, 1.0)["etcd"]
    rows = ceilings(figures)
    assert rows["create_many"] == {"etcd_ops_per_s": 500, "etcd_ceiling_ops_per_s": 2000,
                                   "ceiling_vs_etcd": 4.0, "http_ops_per_s": 1000,
                                   "http_ceiling_ops_per_s": 1500, "ceiling_vs_http": 1.5}
    assert rows["read_many"]["ceiling_vs_etcd"] == 4.0
    del figures["http_ceiling"]  # a section without a figure gives no ratio, not a wrong one
    assert ceilings(figures)["read_one"]["ceiling_vs_http"] is None


def test_the_canned_server_answers_each_caller_with_the_captured_bytes() -> None:
    read = _answer(b'{"result": {"name": "t", "n": 12345}}')
    etcd = _answer(b'{"kvs": [{"value": "aGVsbG8="}]}')
    with CannedServer({b"GET /v1/topics/": read, b"POST /v3/kv/range ": etcd}) as server:
        assert server.answer_bytes == {"GET /v1/topics/": len(read),
                                       "POST /v3/kv/range ": len(etcd)}
        client = ApiClient([server.address], secret="s" * 32, pool_size=1)
        for _ in range(3):  # one kept-alive connection
            assert client.request("GET", "/v1/topics/t") == {"name": "t", "n": 12345}
        client.close()
        caller = EtcdCaller(server.address)
        assert caller.get("k") == b"hello"
        caller.close()
        # capture() gives back the bytes a server sent, so capturing the canned
        # server returns its canned answer.
        assert capture(server.address, "GET", "/v1/topics/x", secret="s" * 32) == read
        assert capture(server.address, "POST", "/v3/kv/range", range_body("k")) == etcd
        cpu = server.cpu_seconds()
        assert cpu is None or cpu >= 0


def _answer(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


def test_report_shows_the_ceiling_beside_etcd_and_ours(tmp_path: Path) -> None:
    figures = _figures(500, 1000, 1400, 2.0, 2.0, 1.0)
    figures["etcd_ceiling"] = _figures(2000, 0, 0, 0.5, 1.0, 1.0)["etcd"]
    figures["http_ceiling"] = _figures(1500, 0, 0, 0.5, 1.0, 1.0)["etcd"]
    for system in figures.values():
        for point in system.values():
            point["rounds"] = []
    figures["etcd_ceiling"]["create_many"]["rounds"] = [
        {"round": 1, "ops_per_s": 2000, "server_cpu": 0.31}]
    ratios = targets(figures)
    section = {"etcd_version": "etcd 3.4", "etcd_found": "found on PATH", "rounds": 1,
               "seconds": 1.0, "callers": 32, "client_procs": 2, "etcd_value_bytes": 329,
               "our_create_command_bytes": 169, "figures": figures, "ratios": ratios,
               "targets": verdicts(ratios), "ceiling": ceilings(figures),
               "ceiling_answer_bytes": {"GET /v1/topics/": 600}, "term_changes": {}}
    text = render(_meta(), {"etcd": section}, tmp_path / "BENCHMARKS.md",
                  tmp_path / "results")
    assert "**Load generator ceiling.**" in text
    assert "| create, 32 callers | 500 | 2,000 (4.00x) | 1,000 | 1,500 (1.50x) |" in text
    assert "31%" in text and "`GET /v1/topics/` 600 B" in text
