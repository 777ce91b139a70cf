"""DiskStorage (WAL with header + CRC records, group commit, compaction,
snapshots) and its in-memory twin MemoryStorage.

Shared behaviour runs against both through one parametrized fixture; the
durability tests simulate a crash by copying the data directory before
``sync()`` (``close()`` syncs, so closing is not a crash).
"""

from __future__ import annotations

import logging
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from streambus_consensus.errors import CorruptStorageError, StorageError
from streambus_consensus.interfaces import LogEntry, RecoveredState
from streambus_consensus.raft.snapshot import SnapshotHeader, pack_snapshot, unpack_snapshot
from streambus_consensus.raft.storage import (
    HEADER_SIZE,
    SNAPSHOT_NAME,
    WAL_MAGIC,
    WAL_NAME,
    DiskStorage,
    MemoryStorage,
)

_RECORD = struct.Struct(">IIB")  # documented record header: length, crc32(type+payload), type


def entry(index: int, term: int = 1, data: bytes | None = None) -> LogEntry:
    return LogEntry(index, term, f"cmd-{index}".encode() if data is None else data)


def entries(first: int, last: int, term: int = 1) -> list[LogEntry]:
    return [entry(i, term) for i in range(first, last + 1)]


def header_bytes(committed: int, *, magic: bytes = WAL_MAGIC, version: int = 1) -> bytes:
    """A WAL header built from the documented layout (with a valid CRC)."""
    head = struct.pack(">8sIQ", magic, version, committed)
    return (head + struct.pack(">I", zlib.crc32(head))).ljust(HEADER_SIZE, b"\0")


def committed_length(data: bytes) -> int:
    return int(struct.unpack_from(">Q", data, 12)[0])


def record_offsets(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, payload length, type) of every committed record, per the documented layout."""
    out = []
    pos, end = HEADER_SIZE, committed_length(data)
    while pos < end:
        length, _crc, kind = _RECORD.unpack_from(data, pos)
        out.append((pos, length, kind))
        pos += _RECORD.size + length
    assert pos == end
    return out


def make_snapshot(last_index: int = 10, state: bytes = b"state-bytes") -> bytes:
    header = SnapshotHeader(
        last_entry=(b"last", last_index, 3),
        prev_entry=(b"prev", last_index - 1, 3),
        members=(("n1", "127.0.0.1:7001"), ("n2", "127.0.0.1:7002")),
    )
    return pack_snapshot(header, state)


# -- fixtures ---------------------------------------------------------------------

OpenDisk = Callable[..., tuple[DiskStorage, RecoveredState]]


@pytest.fixture
def open_disk() -> Iterator[OpenDisk]:
    """Open DiskStorages that are all closed at teardown."""
    made: list[DiskStorage] = []

    def _open(path: Path, **kwargs: object) -> tuple[DiskStorage, RecoveredState]:
        storage = DiskStorage(path, fsync=kwargs.pop("fsync", False), **kwargs)  # type: ignore[arg-type]
        made.append(storage)
        return storage, storage.open()

    yield _open
    for storage in made:
        storage.close()


def refuse_open(path: Path) -> CorruptStorageError:
    storage = DiskStorage(path, fsync=False)
    try:
        with pytest.raises(CorruptStorageError) as info:
            storage.open()
    finally:
        storage.close()
    return info.value


@dataclass
class Harness:
    """One storage of either kind, plus a way to read back what it holds."""

    kind: str
    data_dir: Path
    storage: MemoryStorage | DiskStorage = field(init=False)

    def __post_init__(self) -> None:
        self.storage = self._new()

    def _new(self) -> MemoryStorage | DiskStorage:
        if self.kind == "memory":
            return MemoryStorage()
        return DiskStorage(self.data_dir, fsync=False)

    def reopen(self) -> RecoveredState:
        """What a restarted node would see after a clean sync + close."""
        self.storage.sync()
        if self.kind == "memory":
            return self.storage.open()
        self.storage.close()
        self.storage = self._new()
        return self.storage.open()


@pytest.fixture(params=["memory", "disk"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(request.param, tmp_path / "data")
    assert h.storage.open() == RecoveredState(entries=[], term=0, voted_for=None, commit_index=0)
    yield h
    h.storage.close()


# -- shared behaviour (MemoryStorage and DiskStorage) ------------------------------

def test_fresh_storage_is_empty(harness: Harness) -> None:
    assert harness.reopen() == RecoveredState(entries=[], term=0, voted_for=None, commit_index=0)
    assert harness.storage.load_snapshot() is None


def test_append_term_vote_and_commit_are_recovered(harness: Harness) -> None:
    s = harness.storage
    for e in entries(1, 3, term=2):
        s.append(e)
    s.set_term(2, "n2")
    s.set_commit_index(2)
    assert harness.reopen() == RecoveredState(
        entries=entries(1, 3, term=2), term=2, voted_for="n2", commit_index=2
    )


@pytest.mark.parametrize("vote", [None, "n1", "", "nöde-ü"])
def test_vote_round_trips(harness: Harness, vote: str | None) -> None:
    harness.storage.set_term(1, "n9")
    harness.storage.set_term(7, vote)
    state = harness.reopen()
    assert (state.term, state.voted_for) == (7, vote)


def test_large_and_empty_entries_round_trip(harness: Harness) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB
    harness.storage.append(entry(1, data=b""))
    harness.storage.append(entry(2, data=big))
    assert harness.reopen().entries == [entry(1, data=b""), entry(2, data=big)]


def test_truncate_suffix(harness: Harness) -> None:
    s = harness.storage
    for e in entries(1, 5):
        s.append(e)
    s.truncate_suffix(9)  # past the end: nothing to drop
    assert harness.reopen().entries == entries(1, 5)
    harness.storage.truncate_suffix(4)
    assert harness.reopen().entries == entries(1, 3)
    # Raft conflict resolution: the suffix is replaced with entries of a newer term.
    harness.storage.append(entry(4, term=2))
    assert harness.reopen().entries == [*entries(1, 3), entry(4, term=2)]
    harness.storage.truncate_suffix(0)
    assert harness.reopen().entries == []


def test_compact(harness: Harness) -> None:
    s = harness.storage
    for e in entries(1, 6):
        s.append(e)
    s.compact(1)
    assert harness.reopen().entries == entries(1, 6)
    harness.storage.compact(4)
    assert harness.reopen().entries == entries(4, 6)
    harness.storage.append(entry(7))
    assert harness.reopen().entries == entries(4, 7)
    harness.storage.compact(100)
    assert harness.reopen().entries == []


@pytest.mark.parametrize("wrong", [4, 9, 2, 1, 0], ids=["gap", "big-gap", "repeat", "back", "zero"])
def test_append_with_gap_or_overlap_raises(harness: Harness, wrong: int) -> None:
    harness.storage.append(entry(1))
    harness.storage.append(entry(2))
    with pytest.raises(StorageError, match="gap"):
        harness.storage.append(entry(wrong, term=9))
    assert harness.reopen().entries == entries(1, 2)


def test_snapshot_save_and_load(harness: Harness) -> None:
    s = harness.storage
    first, second = make_snapshot(10, b"one"), make_snapshot(20, b"two")
    s.save_snapshot(first)
    assert s.load_snapshot() == first
    s.save_snapshot(second)
    assert s.load_snapshot() == second
    assert Path(s.snapshot_path).read_bytes() == second  # the engine stages transfers here
    assert not Path(s.snapshot_path + ".writing").exists()


def test_close_is_idempotent(harness: Harness) -> None:
    harness.storage.close()
    harness.storage.close()


# -- DiskStorage: files and recovery -------------------------------------------------

def test_open_creates_missing_dir_and_empty_wal(tmp_path: Path, open_disk: OpenDisk) -> None:
    data_dir = tmp_path / "a" / "b" / "data"
    _, state = open_disk(data_dir)
    wal = (data_dir / WAL_NAME).read_bytes()
    assert len(wal) == HEADER_SIZE
    assert wal.startswith(WAL_MAGIC)
    assert committed_length(wal) == HEADER_SIZE
    assert not (data_dir / SNAPSHOT_NAME).exists()
    assert state.entries == [] and state.term == 0


def test_open_on_a_file_raises_storage_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    storage = DiskStorage(not_a_dir)
    with pytest.raises(StorageError, match="cannot create data dir"):
        storage.open()
    storage.close()


def test_reopen_recovers_exactly_and_keeps_appending(
    tmp_path: Path, open_disk: OpenDisk
) -> None:
    s, _ = open_disk(tmp_path)
    for e in entries(1, 4, term=3):
        s.append(e)
    s.set_term(3, None)
    s.set_commit_index(4)
    s.sync()
    s.close()
    s, state = open_disk(tmp_path)
    assert state == RecoveredState(entries=entries(1, 4, 3), term=3, voted_for=None,
                                   commit_index=4)
    s.append(entry(5, term=3))
    s.set_term(4, "n3")
    s.set_commit_index(5)
    s.sync()
    s.close()
    _, state = open_disk(tmp_path)
    assert state == RecoveredState(entries=entries(1, 5, 3), term=4,
                                   voted_for="n3", commit_index=5)


def test_unsynced_mutations_are_lost_in_a_crash(tmp_path: Path, open_disk: OpenDisk) -> None:
    s, _ = open_disk(tmp_path / "live")
    s.append(entry(1))
    s.set_term(1, "n1")
    s.sync()
    s.append(entry(2))
    s.set_term(2, "n2")
    s.truncate_suffix(1)
    shutil.copytree(tmp_path / "live", tmp_path / "crashed")  # the process dies here
    _, state = open_disk(tmp_path / "crashed")
    assert state == RecoveredState(entries=[entry(1)], term=1, voted_for="n1", commit_index=0)


def test_synced_mutations_survive_a_crash(tmp_path: Path, open_disk: OpenDisk) -> None:
    s, _ = open_disk(tmp_path / "live")
    s.append(entry(1))
    s.set_term(2, "n2")
    s.set_commit_index(1)
    s.sync()
    shutil.copytree(tmp_path / "live", tmp_path / "crashed")
    _, state = open_disk(tmp_path / "crashed")
    assert state == RecoveredState(entries=[entry(1)], term=2, voted_for="n2", commit_index=1)


def test_commit_index_is_written_with_the_next_group(tmp_path: Path, open_disk: OpenDisk) -> None:
    s, _ = open_disk(tmp_path / "live")
    s.append(entry(1))
    s.sync()
    s.set_commit_index(1)
    s.sync()  # nothing else pending: the hint alone is not worth an fsync
    shutil.copytree(tmp_path / "live", tmp_path / "crash1")
    s.append(entry(2))
    s.sync()
    shutil.copytree(tmp_path / "live", tmp_path / "crash2")
    assert open_disk(tmp_path / "crash1")[1].commit_index == 0
    assert open_disk(tmp_path / "crash2")[1].commit_index == 1


def test_truncate_and_compact_persist(tmp_path: Path, open_disk: OpenDisk) -> None:
    s, _ = open_disk(tmp_path)
    for e in entries(1, 10):
        s.append(e)
    s.sync()
    s.truncate_suffix(9)
    s.sync()
    s.compact(4)
    size_after_compact = (tmp_path / WAL_NAME).stat().st_size
    s.close()
    s, state = open_disk(tmp_path)
    assert state.entries == entries(4, 8)
    s.close()
    assert (tmp_path / WAL_NAME).stat().st_size == size_after_compact
    assert not (tmp_path / "wal.compact").exists()


def test_compact_shrinks_the_file_and_keeps_term_and_vote(
    tmp_path: Path, open_disk: OpenDisk
) -> None:
    live = tmp_path / "live"
    s, _ = open_disk(live)
    for e in entries(1, 50):
        s.append(e)
        s.sync()
    s.set_term(5, "n2")
    s.set_commit_index(45)
    s.sync()
    before = (live / WAL_NAME).stat().st_size
    s.compact(46)
    assert (live / WAL_NAME).stat().st_size < before / 5
    shutil.copytree(live, tmp_path / "crashed")  # compaction is durable at once
    _, state = open_disk(tmp_path / "crashed")
    assert state == RecoveredState(entries=entries(46, 50), term=5, voted_for="n2",
                                   commit_index=45)


def test_memory_storage_close_removes_its_transfer_dir() -> None:
    s = MemoryStorage()
    s.open()
    s.save_snapshot(make_snapshot())
    staging = Path(s.snapshot_path).parent
    assert staging.is_dir()
    s.close()
    assert not staging.exists()


def test_fsync_false_still_persists(tmp_path: Path) -> None:
    calls: list[float] = []
    s = DiskStorage(tmp_path, fsync=False, on_fsync=calls.append)
    s.open()
    s.append(entry(1))
    s.sync()
    s.close()
    assert calls == []  # no fsync, so nothing to time
    s = DiskStorage(tmp_path, fsync=False)
    assert s.open().entries == [entry(1)]
    s.close()


def test_on_fsync_gets_one_duration_per_group(tmp_path: Path) -> None:
    durations: list[float] = []
    s = DiskStorage(tmp_path, fsync=True, on_fsync=durations.append)
    s.open()
    try:
        for e in entries(1, 5):
            s.append(e)
        s.set_term(1, "n1")
        s.sync()
        assert len(durations) == 1  # one group, one fsync
        s.sync()  # nothing pending: no fsync
        assert len(durations) == 1
        s.append(entry(6))
        s.sync()
        assert len(durations) == 2
        assert all(isinstance(d, float) and 0.0 <= d < 10.0 for d in durations)
    finally:
        s.close()
    s = DiskStorage(tmp_path, fsync=True)
    assert s.open().entries == entries(1, 6)
    s.close()


def test_sync_after_close_does_not_silently_drop_data(tmp_path: Path) -> None:
    s = DiskStorage(tmp_path, fsync=False)
    s.open()
    s.close()
    try:
        s.append(entry(1))
        s.sync()
    except StorageError:
        return  # refusing loudly is fine
    s2 = DiskStorage(tmp_path, fsync=False)
    try:
        assert s2.open().entries == [entry(1)], "sync() returned but the entry is not on disk"
    finally:
        s2.close()


# -- DiskStorage: the unacknowledged tail --------------------------------------------

def test_torn_group_after_committed_length_is_dropped_with_warning(
    tmp_path: Path, open_disk: OpenDisk, caplog: pytest.LogCaptureFixture
) -> None:
    wal = tmp_path / "live" / WAL_NAME
    s, _ = open_disk(tmp_path / "live")
    s.append(entry(1))
    s.set_term(1, "n1")
    s.sync()
    acknowledged = wal.read_bytes()
    s.append(entry(2))
    s.set_term(2, "n2")
    s.sync()
    grown = wal.read_bytes()
    # The crash hit while the last group was being written: its first records
    # are whole, its last one (the commit hint, 17 bytes) is cut short. Whole
    # records past the declared length are kept; the torn one is dropped.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    torn = acknowledged + grown[len(acknowledged):-3]
    (crashed / WAL_NAME).write_bytes(torn)
    with caplog.at_level(logging.WARNING, logger="streambus_consensus.raft.storage"):
        s2, state = open_disk(crashed)
    assert state == RecoveredState(entries=[entry(1), entry(2)], term=2, voted_for="n2",
                                   commit_index=0)
    assert any("dropping 14 bytes" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    assert (crashed / WAL_NAME).read_bytes()[HEADER_SIZE:] == grown[HEADER_SIZE:-17]
    s2.append(entry(3, term=5))
    s2.sync()
    s2.close()
    assert open_disk(crashed)[1].entries == [entry(1), entry(2), entry(3, term=5)]


def test_garbage_after_committed_length_is_dropped(
    tmp_path: Path, open_disk: OpenDisk, caplog: pytest.LogCaptureFixture
) -> None:
    s, _ = open_disk(tmp_path)
    s.append(entry(1))
    s.sync()
    s.close()
    with (tmp_path / WAL_NAME).open("ab") as f:
        f.write(b"\xde\xad\xbe\xef" * 100)
    with caplog.at_level(logging.WARNING, logger="streambus_consensus.raft.storage"):
        _, state = open_disk(tmp_path)
    assert state.entries == [entry(1)]
    assert any("dropping 400 bytes" in r.getMessage() for r in caplog.records)


# -- DiskStorage: damage is refused ---------------------------------------------------

@pytest.fixture
def written(tmp_path: Path, open_disk: OpenDisk) -> Path:
    """A data dir whose WAL holds a few synced groups; returns the WAL path."""
    s, _ = open_disk(tmp_path)
    s.set_term(1, "n1")
    s.append(entry(1))
    s.sync()
    s.append(entry(2, data=b"x" * 64))
    s.append(entry(3))
    s.sync()
    s.close()
    return tmp_path / WAL_NAME


def _assert_names_file(exc: CorruptStorageError, wal: Path) -> None:
    assert exc.path == str(wal)
    assert str(wal) in str(exc)
    assert "refusing to start" in str(exc)


def test_file_truncated_below_committed_length_is_refused(written: Path) -> None:
    data = written.read_bytes()
    written.write_bytes(data[:-5])
    exc = refuse_open(written.parent)
    _assert_names_file(exc, written)
    assert "truncated" in exc.detail
    assert exc.offset == len(data) - 5
    assert f"at byte {len(data) - 5}" in str(exc)


@pytest.mark.parametrize("which", ["payload", "crc", "type"])
def test_bit_flip_inside_a_record_is_refused(written: Path, which: str) -> None:
    data = bytearray(written.read_bytes())
    # entry 2's record: the one with 16 bytes of index + term and 64 bytes of data
    [offset] = [o for o, length, kind in record_offsets(bytes(data)) if length == 16 + 64]
    target = {"payload": offset + _RECORD.size + 30, "crc": offset + 5, "type": offset + 8}[which]
    data[target] ^= 0x10
    written.write_bytes(bytes(data))
    exc = refuse_open(written.parent)
    _assert_names_file(exc, written)
    assert exc.offset == offset
    assert "checksum mismatch" in exc.detail


def test_bit_flip_in_record_length_is_refused(written: Path) -> None:
    data = bytearray(written.read_bytes())
    offset = record_offsets(bytes(data))[1][0]
    data[offset] ^= 0x80  # length becomes ~2 GiB
    written.write_bytes(bytes(data))
    exc = refuse_open(written.parent)
    _assert_names_file(exc, written)
    assert exc.offset == offset
    assert "runs past the committed end" in exc.detail


def test_zero_filled_region_is_refused(written: Path) -> None:
    data = bytearray(written.read_bytes())
    offset = record_offsets(bytes(data))[2][0]
    data[offset:] = bytes(len(data) - offset)  # e.g. a filesystem that lost the data blocks
    written.write_bytes(bytes(data))
    exc = refuse_open(written.parent)
    _assert_names_file(exc, written)
    assert exc.offset == offset
    assert "zero-filled" in str(exc)


def test_bad_magic_is_refused(written: Path) -> None:
    data = bytearray(written.read_bytes())
    data[0:8] = b"NOTAWAL!"
    written.write_bytes(bytes(data))
    exc = refuse_open(written.parent)
    _assert_names_file(exc, written)
    assert exc.offset == 0
    assert "not a write-ahead log" in exc.detail


@pytest.mark.parametrize("byte", [9, 13, 19, 20, 23], ids=lambda b: f"byte{b}")
def test_header_checksum_flip_is_refused(written: Path, byte: int) -> None:
    data = bytearray(written.read_bytes())
    data[byte] ^= 0x01
    written.write_bytes(bytes(data))
    exc = refuse_open(written.parent)
    _assert_names_file(exc, written)
    assert exc.offset == 0
    assert "header checksum mismatch" in exc.detail


def test_unknown_version_is_refused(written: Path) -> None:
    data = written.read_bytes()
    written.write_bytes(header_bytes(committed_length(data), version=2) + data[HEADER_SIZE:])
    exc = refuse_open(written.parent)
    _assert_names_file(exc, written)
    assert "unsupported log format version 2" in exc.detail


def test_file_shorter_than_header_is_refused(written: Path) -> None:
    written.write_bytes(written.read_bytes()[:10])
    exc = refuse_open(written.parent)
    _assert_names_file(exc, written)
    assert "shorter than its header" in exc.detail


def test_unknown_record_type_with_valid_crc_is_refused(written: Path) -> None:
    data = written.read_bytes()
    payload = b"\x00" * 8
    record = _RECORD.pack(len(payload), zlib.crc32(bytes((9,)) + payload), 9) + payload
    body = data[HEADER_SIZE:] + record
    written.write_bytes(header_bytes(HEADER_SIZE + len(body)) + body)
    exc = refuse_open(written.parent)
    _assert_names_file(exc, written)
    assert "unknown record type 9" in exc.detail
    assert exc.offset == len(data)


def test_malformed_entry_record_with_valid_crc_is_refused(written: Path) -> None:
    data = written.read_bytes()
    payload = b"\x00\x01"  # an entry record needs 16 bytes of index + term
    record = _RECORD.pack(len(payload), zlib.crc32(bytes((1,)) + payload), 1) + payload
    body = data[HEADER_SIZE:] + record
    written.write_bytes(header_bytes(HEADER_SIZE + len(body)) + body)
    exc = refuse_open(written.parent)
    _assert_names_file(exc, written)
    assert "malformed record" in exc.detail
    assert exc.offset == len(data)


def test_committed_length_inside_the_header_is_refused(written: Path) -> None:
    data = written.read_bytes()
    written.write_bytes(header_bytes(10) + data[HEADER_SIZE:])
    try:
        refuse_open(written.parent)
    finally:
        assert len(written.read_bytes()) == len(data), "open() destroyed the log"


# -- DiskStorage: snapshots --------------------------------------------------------------

def test_snapshot_round_trip_across_reopen(tmp_path: Path, open_disk: OpenDisk) -> None:
    blob = make_snapshot(42, b"the state")
    s, _ = open_disk(tmp_path)
    s.save_snapshot(blob)
    s.close()
    s, _ = open_disk(tmp_path)
    assert s.load_snapshot() == blob
    header, state = unpack_snapshot(s.load_snapshot() or b"", s.snapshot_path)
    assert (header.last_index, header.last_term, state) == (42, 3, b"the state")
    assert s.snapshot_path == str(tmp_path / SNAPSHOT_NAME)


def _damage_truncate(blob: bytes) -> bytes:
    return blob[:-4]


def _damage_flip(blob: bytes) -> bytes:
    data = bytearray(blob)
    data[len(data) - 3] ^= 0x04
    return bytes(data)


def _damage_magic(blob: bytes) -> bytes:
    return b"XXXXXXXX" + blob[8:]


def _damage_version(blob: bytes) -> bytes:
    return blob[:8] + struct.pack(">I", 7) + blob[12:]


def _damage_pad(blob: bytes) -> bytes:
    return blob + b"\0\0"


def _damage_stub(blob: bytes) -> bytes:
    return blob[:10]


@pytest.mark.parametrize(("damage", "detail"), [
    (_damage_truncate, "truncated or padded"),
    (_damage_flip, "checksum mismatch"),
    (_damage_magic, "not a snapshot file"),
    (_damage_version, "unsupported snapshot format version 7"),
    (_damage_pad, "truncated or padded"),
    (_damage_stub, "shorter than its header"),
], ids=lambda v: getattr(v, "__name__", "")[8:] or None)
def test_damaged_snapshot_is_refused_at_open(
    tmp_path: Path, open_disk: OpenDisk, damage: Callable[[bytes], bytes], detail: str
) -> None:
    s, _ = open_disk(tmp_path)
    s.append(entry(1))
    s.save_snapshot(make_snapshot())
    s.close()
    snap = tmp_path / SNAPSHOT_NAME
    snap.write_bytes(damage(snap.read_bytes()))
    exc = refuse_open(tmp_path)
    assert exc.path == str(snap)
    assert str(snap) in str(exc)
    assert detail in exc.detail


def test_leftovers_of_interrupted_rewrites_are_ignored(tmp_path: Path, open_disk: OpenDisk) -> None:
    blob = make_snapshot(5)
    s, _ = open_disk(tmp_path)
    for e in entries(1, 3):
        s.append(e)
    s.set_term(2, "n2")
    s.save_snapshot(blob)
    s.close()
    # A compaction and a snapshot write that died before their rename.
    (tmp_path / "wal.compact").write_bytes(header_bytes(HEADER_SIZE) + b"half a new log")
    (tmp_path / (SNAPSHOT_NAME + ".writing")).write_bytes(b"half a new snapshot")
    s, state = open_disk(tmp_path)
    assert state == RecoveredState(entries=entries(1, 3), term=2, voted_for="n2", commit_index=0)
    assert s.load_snapshot() == blob
    assert not (tmp_path / "wal.compact").exists()
    assert not (tmp_path / (SNAPSHOT_NAME + ".writing")).exists()


# -- a model-based check of the durability contract ------------------------------------------

@dataclass
class _Model:
    entries: list[LogEntry] = field(default_factory=list)
    term: int = 0
    voted_for: str | None = None
    commit_index: int = 0

    def copy(self) -> _Model:
        return _Model(list(self.entries), self.term, self.voted_for, self.commit_index)

    def state(self) -> RecoveredState:
        return RecoveredState(entries=list(self.entries), term=self.term,
                              voted_for=self.voted_for, commit_index=self.commit_index)


class DiskStorageMachine(RuleBasedStateMachine):
    """Random mutations, syncs, clean restarts and crashes against a model.

    ``current`` is what the live storage holds; ``durable`` what a crash
    leaves. sync() makes ``current`` durable when anything but the commit
    hint changed (the hint rides with the next group); compact() rewrites
    the whole file, so it is durable at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="sbc-storage-model-"))
        self.generation = 0
        self.dir = self.root / "g0"
        self.storage = DiskStorage(self.dir, fsync=False)
        assert self.storage.open() == _Model().state()
        self.current = _Model()
        self.durable = _Model()
        self.dirty = False

    def teardown(self) -> None:
        self.storage.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def _next_index(self, start: int) -> int:
        return self.current.entries[-1].index + 1 if self.current.entries else start

    @rule(start=st.integers(1, 20), term=st.integers(0, 5), data=st.binary(max_size=20))
    def append(self, start: int, term: int, data: bytes) -> None:
        e = LogEntry(self._next_index(start), term, data)
        self.storage.append(e)
        self.current.entries.append(e)
        self.dirty = True

    @precondition(lambda self: bool(self.current.entries))
    @rule(skip=st.sampled_from([-1, 0, 2, 5]))
    def append_out_of_order(self, skip: int) -> None:
        with pytest.raises(StorageError):
            self.storage.append(entry(self.current.entries[-1].index + skip))

    @rule(from_index=st.integers(0, 40))
    def truncate_suffix(self, from_index: int) -> None:
        self.storage.truncate_suffix(from_index)
        self.current.entries = [e for e in self.current.entries if e.index < from_index]
        self.dirty = True

    @rule(first_index=st.integers(0, 40))
    def compact(self, first_index: int) -> None:
        self.storage.compact(first_index)
        self.current.entries = [e for e in self.current.entries if e.index >= first_index]
        self.durable = self.current.copy()
        self.dirty = False

    @rule(term=st.integers(0, 2**63 - 1), vote=st.sampled_from([None, "n1", "n2", "", "ü"]))
    def set_term(self, term: int, vote: str | None) -> None:
        self.storage.set_term(term, vote)
        self.current.term, self.current.voted_for = term, vote
        self.dirty = True

    @rule(index=st.integers(0, 50))
    def set_commit_index(self, index: int) -> None:
        self.storage.set_commit_index(index)
        self.current.commit_index = index

    @rule()
    def sync(self) -> None:
        self.storage.sync()
        if self.dirty:
            self.durable = self.current.copy()
            self.dirty = False

    def _restart_from(self, data_dir: Path) -> None:
        self.storage = DiskStorage(data_dir, fsync=False)
        self.dir = data_dir
        assert self.storage.open() == self.durable.state()
        self.current = self.durable.copy()

    @rule()
    def clean_restart(self) -> None:
        self.sync()
        self.storage.close()
        self._restart_from(self.dir)

    @rule()
    def crash(self) -> None:
        self.generation += 1
        copy = self.root / f"g{self.generation}"
        shutil.copytree(self.dir, copy)  # the disk as the dying process left it
        self.storage.close()  # (writes to the old directory only)
        self.dirty = False
        self._restart_from(copy)


DiskStorageMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None
)
TestDiskStorageModel = DiskStorageMachine.TestCase
