"""A node refuses to start on a damaged data directory, and says what is damaged.

One metadata node writes real state (a snapshot every 20 entries, so both
``wal.log`` and ``snapshot.bin`` exist) and stops. Each case copies that data
directory, damages it, and runs ``streambus-consensus node run`` on the
copy: the process must exit non-zero on its own, print an error naming the
file and the damage, never serve, and leave the damaged file as it found it
(the evidence stays). Torn writes past the last fsync are not damage: the
node drops them and serves everything acknowledged.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from streambus_consensus.client import ApiClient, ClusterUnreachableError
from streambus_consensus.errors import ConsensusError
from streambus_consensus.testing.harness import LocalCluster, wait_until

pytestmark = pytest.mark.cluster

TOPICS = [f"t{i}" for i in range(30)]
REFUSAL_TIMEOUT = 10.0
"""A refusal takes well under a second; a node that starts is killed after this."""


@dataclass(frozen=True)
class Pristine:
    """A stopped node's directory (config, data dir) with known contents."""

    node_dir: Path
    api_address: str
    secret: str


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    base = tmp_path_factory.mktemp("corruption")
    with LocalCluster(1, base / "cluster", app="metadata",
                      settings={"snapshot_interval_entries": 20}) as cluster:
        cluster.start()
        cluster.wait_for_leader()
        client = cluster.client()
        client.request("POST", "/v1/brokers", {"broker_id": 1, "endpoint": "b1.test:9092",
                                               "fenced": False})
        for name in TOPICS:
            client.request("POST", "/v1/topics", {"name": name, "partitions": 1,
                                                  "replication_factor": 1})
        data = cluster.nodes["n1"].directory / "data"
        wait_until(lambda: (data / "snapshot.bin").exists(), 10, "a snapshot")
        cluster.stop("n1")
        node = cluster.nodes["n1"]
        assert cluster.secret is not None
        pristine = Pristine(node.directory, node.api_address, cluster.secret)
    entries = [r for r in _wal_records(pristine.node_dir / "data" / "wal.log") if r[1] >= 0]
    assert entries[0][1] > 1, "the log must be compacted behind the snapshot"
    return pristine


def _wal_records(path: Path) -> list[tuple[int, int, int]]:
    """(offset, index or -1, record length) of each committed record."""
    data = path.read_bytes()
    _magic, _version, committed, _crc = struct.unpack_from(">8sIQI", data, 0)
    records = []
    pos = 32
    while pos < committed:
        length, _crc, kind = struct.unpack_from(">IIB", data, pos)
        index = struct.unpack_from(">Q", data, pos + 9)[0] if kind == 1 else -1
        records.append((pos, index, 9 + length))
        pos += 9 + length
    return records


def _copy(pristine: Pristine, tmp_path: Path) -> Path:
    node_dir = tmp_path / "n1"
    shutil.copytree(pristine.node_dir, node_dir)
    return node_dir


def _run_node(node_dir: Path) -> tuple[int | None, str]:
    """Run the node on ``node_dir``; (exit code, stderr). ``None``: it kept running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "streambus_consensus", "node", "run",
         "--config", str(node_dir / "node.toml"), "--app", "metadata"],
        cwd=node_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        _, stderr = proc.communicate(timeout=REFUSAL_TIMEOUT)
        return proc.returncode, stderr
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
        return None, stderr


# -- damage -------------------------------------------------------------------------

Damage = Callable[[Path], None]


def _truncate(name: str, keep: Callable[[int], int]) -> Damage:
    def damage(data: Path) -> None:
        path = data / name
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.truncate(keep(size))
    return damage


def _zero(name: str, start: Callable[[int], int], length: int | None) -> Damage:
    def damage(data: Path) -> None:
        path = data / name
        blob = bytearray(path.read_bytes())
        first = start(len(blob))
        end = len(blob) if length is None else min(len(blob), first + length)
        blob[first:end] = bytes(end - first)
        path.write_bytes(bytes(blob))
    return damage


def _flip(name: str, at: Callable[[Path], int], bit: int = 4) -> Damage:
    def damage(data: Path) -> None:
        path = data / name
        blob = bytearray(path.read_bytes())
        blob[at(path)] ^= 1 << bit
        path.write_bytes(bytes(blob))
    return damage


def _inside_an_entry(path: Path) -> int:
    records = [r for r in _wal_records(path) if r[1] >= 0]
    offset, _index, length = records[len(records) // 2]
    return offset + length // 2


WAL_CASES: dict[str, tuple[Damage, str]] = {
    "wal-empty": (_truncate("wal.log", lambda n: 0), r"shorter than its header"),
    "wal-truncated-half": (_truncate("wal.log", lambda n: n // 2), r"truncated"),
    "wal-truncated-last-bytes": (_truncate("wal.log", lambda n: n - 5), r"truncated"),
    "wal-zero-filled": (_zero("wal.log", lambda n: 0, None), r"not a write-ahead log"),
    "wal-zero-page": (_zero("wal.log", lambda n: n // 3, 512),
                      r"zero-filled|checksum mismatch|runs past"),
    "wal-bit-flip-entry": (_flip("wal.log", _inside_an_entry), r"checksum mismatch"),
    "wal-bit-flip-header": (_flip("wal.log", lambda p: 17), r"header checksum mismatch"),
}
SNAPSHOT_CASES: dict[str, tuple[Damage, str]] = {
    "snapshot-empty": (_truncate("snapshot.bin", lambda n: 0), r"shorter than its header"),
    "snapshot-truncated": (_truncate("snapshot.bin", lambda n: n - 100),
                           r"truncated or padded"),
    "snapshot-zero-filled": (_zero("snapshot.bin", lambda n: 0, None), r"not a snapshot file"),
    "snapshot-zero-page": (_zero("snapshot.bin", lambda n: n // 2, 512), r"checksum mismatch"),
    "snapshot-bit-flip": (_flip("snapshot.bin", lambda p: p.stat().st_size // 2),
                          r"checksum mismatch"),
    "snapshot-bit-flip-header": (_flip("snapshot.bin", lambda p: 2), r"not a snapshot file"),
}


def _assert_refused(node_dir: Path, name: str, damage: Damage, pattern: str) -> None:
    data = node_dir / "data"
    damage(data)
    damaged = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
    code, stderr = _run_node(node_dir)
    assert code is not None, f"the node started on a damaged {name}:\n{stderr[-2000:]}"
    assert code != 0, stderr
    assert "serving" not in stderr, f"the node served before refusing:\n{stderr[-2000:]}"
    error = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    assert str(data / name) in error, f"the error must name {name}: {error!r}"
    assert re.search(pattern, error), f"the error must say what is damaged: {error!r}"
    assert "refusing to start" in error, error
    after = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
    assert after == damaged, "a refused start must leave the damaged files as they were"


@pytest.mark.parametrize("case", sorted(WAL_CASES))
def test_damaged_wal_is_refused(pristine: Pristine, tmp_path: Path, case: str) -> None:
    damage, pattern = WAL_CASES[case]
    _assert_refused(_copy(pristine, tmp_path), "wal.log", damage, pattern)


@pytest.mark.parametrize("case", sorted(SNAPSHOT_CASES))
def test_damaged_snapshot_is_refused(pristine: Pristine, tmp_path: Path, case: str) -> None:
    damage, pattern = SNAPSHOT_CASES[case]
    _assert_refused(_copy(pristine, tmp_path), "snapshot.bin", damage, pattern)


def test_missing_snapshot_behind_a_compacted_log_is_refused(pristine: Pristine,
                                                           tmp_path: Path) -> None:
    _assert_refused(_copy(pristine, tmp_path), "snapshot.bin",
                    lambda data: (data / "snapshot.bin").unlink(), r"missing|no snapshot")


def test_missing_wal_next_to_a_snapshot_is_refused(pristine: Pristine,
                                                   tmp_path: Path) -> None:
    _assert_refused(_copy(pristine, tmp_path), "wal.log",
                    lambda data: (data / "wal.log").unlink(), r"missing|no write-ahead log")


def _serve_and_list(node_dir: Path, pristine: Pristine) -> list[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "streambus_consensus", "node", "run",
         "--config", str(node_dir / "node.toml"), "--app", "metadata"],
        cwd=node_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    client = ApiClient([pristine.api_address], secret=pristine.secret, timeout=5)
    try:
        def listed() -> list[str] | None:
            if proc.poll() is not None:
                raise AssertionError(f"node exited with {proc.returncode}")
            try:
                result = client.request("GET", "/v1/topics?linearizable=1")
            except (ClusterUnreachableError, ConsensusError):
                return None
            topics: list[str] = result["topics"]
            return topics

        return wait_until(listed, 30, "the node to serve")
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()


def test_undamaged_copy_serves_everything(pristine: Pristine, tmp_path: Path) -> None:
    """The control: the copy the other cases damage starts and has every topic."""
    assert sorted(_serve_and_list(_copy(pristine, tmp_path), pristine)) == sorted(TOPICS)


def test_torn_write_past_the_last_fsync_is_dropped(pristine: Pristine, tmp_path: Path) -> None:
    """Bytes after the committed length are a group that was never acknowledged."""
    node_dir = _copy(pristine, tmp_path)
    wal = node_dir / "data" / "wal.log"
    committed = wal.stat().st_size
    with open(wal, "ab") as f:
        f.write(b"\x00\x00\x01\x00" + b"half a record that never got its fsync")
    started = time.monotonic()
    assert sorted(_serve_and_list(node_dir, pristine)) == sorted(TOPICS)
    assert time.monotonic() - started < 30
    assert wal.stat().st_size >= committed


# -- the last group after a crash -----------------------------------------------------------
#
# The header of wal.log declares what the previous group made durable; the
# group written by the last sync before a crash lies past it and is found by
# its checksums (one fdatasync per group). That group was acknowledged once
# its fdatasync returned.

CRASH_TOPICS = [f"c{i}" for i in range(10)]


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    """A node SIGKILLed right after its last acknowledged write (no snapshot)."""
    base = tmp_path_factory.mktemp("crashed")
    with LocalCluster(1, base / "cluster", app="metadata",
                      settings={"broker_session_timeout": 86_400.0}) as cluster:
        cluster.start()
        cluster.wait_for_leader()
        client = cluster.client()
        client.request("POST", "/v1/brokers", {"broker_id": 1, "endpoint": "b1.test:9092",
                                               "fenced": False})
        for name in CRASH_TOPICS:
            client.request("POST", "/v1/topics", {"name": name, "partitions": 1,
                                                  "replication_factor": 1})
        cluster.kill("n1")
        node = cluster.nodes["n1"]
        assert cluster.secret is not None
        return Pristine(node.directory, node.api_address, cluster.secret)


def _tail_records(path: Path) -> list[tuple[int, int, int]]:
    """(offset, type, payload length) of the records past the header's committed length."""
    data = path.read_bytes()
    committed = struct.unpack_from(">8sIQI", data, 0)[2]
    records, pos = [], committed
    while pos + 9 <= len(data):
        length, _crc, kind = struct.unpack_from(">IIB", data, pos)
        records.append((pos, kind, length))
        pos += 9 + length
    return records


def _tail_entry(node_dir: Path) -> tuple[int, int]:
    entries = [(pos, length) for pos, kind, length in _tail_records(node_dir / "data" / "wal.log")
               if kind == 1]
    if not entries:
        pytest.skip("the crash left no group past the header; nothing to damage")
    return entries[-1]


def test_a_crash_keeps_the_last_acknowledged_group(crashed: Pristine, tmp_path: Path) -> None:
    node_dir = _copy(crashed, tmp_path)
    _tail_entry(node_dir)
    assert sorted(_serve_and_list(node_dir, crashed)) == sorted(CRASH_TOPICS)


def test_a_zeroed_sector_in_the_last_group_is_a_torn_write(crashed: Pristine,
                                                           tmp_path: Path) -> None:
    """All-zero bytes where the last group should be: the write never reached the disk,
    so it was never acknowledged; the node drops it and starts."""
    node_dir = _copy(crashed, tmp_path)
    _tail_entry(node_dir)
    wal = node_dir / "data" / "wal.log"
    data = bytearray(wal.read_bytes())
    first = _tail_records(wal)[0][0]
    data[first:] = bytes(len(data) - first)
    wal.write_bytes(bytes(data))
    served = _serve_and_list(node_dir, crashed)
    assert set(served) <= set(CRASH_TOPICS) and len(served) >= len(CRASH_TOPICS) - 1


def test_a_bit_flip_in_the_last_group_is_refused(crashed: Pristine, tmp_path: Path) -> None:
    node_dir = _copy(crashed, tmp_path)
    pos, length = _tail_entry(node_dir)
    _assert_refused(node_dir, "wal.log",
                    _flip("wal.log", lambda p: pos + 9 + length // 2), r"checksum mismatch")
