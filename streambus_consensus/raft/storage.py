"""Storage implementations: :class:`DiskStorage` and its in-memory twin :class:`MemoryStorage`.

DiskStorage keeps everything in one directory:

``wal.log``
    An append-only write-ahead log. A 32-byte header (magic, format version,
    committed length, CRC) is followed by records, each ``u32 length | u32
    crc32 | u8 type | payload``. Record types: log entry, term/vote, commit
    index hint, truncate-suffix. Every :meth:`~DiskStorage.sync` appends the
    buffered records, rewrites the header with the new committed length and
    fsyncs once: that is the group commit. On open, bytes past the committed
    length are a group that was never acknowledged (the process died before
    its fsync returned) and are dropped; a file shorter than its committed
    length, a bad checksum or a malformed record inside it is damage, and
    the node refuses to start with :class:`CorruptStorageError` naming the file
    and the byte offset.
``snapshot.bin``
    The latest snapshot (see :mod:`.snapshot`), replaced atomically
    (write, fsync, rename, fsync directory).

Compaction rewrites ``wal.log`` without the entries covered by the snapshot,
the same way: write a new file, fsync, rename, fsync the directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from ..errors import CorruptStorageError, StorageError
from ..interfaces import LogEntry, RecoveredState
from .snapshot import unpack_snapshot

__all__ = ["DiskStorage", "MemoryStorage"]

logger = logging.getLogger(__name__)

WAL_NAME = "wal.log"
SNAPSHOT_NAME = "snapshot.bin"
WAL_MAGIC = b"SBCWAL01"
WAL_VERSION = 1
_HEADER = struct.Struct(">8sIQI")  # magic, version, committed length, crc32 of the first 20 bytes
HEADER_SIZE = 32  # header padded to 32 bytes
_RECORD = struct.Struct(">IIB")  # payload length, crc32(type + payload), type
_ENTRY = struct.Struct(">QQ")
_U64 = struct.Struct(">Q")

_T_ENTRY, _T_TERM, _T_COMMIT, _T_TRUNCATE = 1, 2, 3, 4
MAX_RECORD_BYTES = 1 << 30


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _header(committed: int) -> bytes:
    head = struct.pack(">8sIQ", WAL_MAGIC, WAL_VERSION, committed)
    return (head + struct.pack(">I", zlib.crc32(head))).ljust(HEADER_SIZE, b"\0")


def _record(kind: int, payload: bytes) -> bytes:
    return _RECORD.pack(len(payload), zlib.crc32(bytes((kind,)) + payload), kind) + payload


def _entry_record(entry: LogEntry) -> bytes:
    return _record(_T_ENTRY, _ENTRY.pack(entry.index, entry.term) + entry.data)


def _term_record(term: int, voted_for: str | None) -> bytes:
    vote = b"\xff" if voted_for is None else b"\x00" + voted_for.encode("utf-8")
    return _record(_T_TERM, _U64.pack(term) + vote)


class _LogState:
    """The in-memory view both storages keep: entries, term, vote, commit hint."""

    def __init__(self) -> None:
        self.entries: list[LogEntry] = []
        self.term = 0
        self.voted_for: str | None = None
        self.commit_index = 0

    def append(self, entry: LogEntry) -> None:
        if self.entries and entry.index != self.entries[-1].index + 1:
            raise StorageError(
                f"append of index {entry.index} after {self.entries[-1].index} leaves a gap"
            )
        self.entries.append(entry)

    def truncate_suffix(self, from_index: int) -> None:
        if not self.entries:
            return
        keep = max(0, from_index - self.entries[0].index)
        del self.entries[keep:]

    def compact(self, first_index: int) -> None:
        if not self.entries:
            return
        drop = max(0, first_index - self.entries[0].index)
        del self.entries[:drop]

    def recovered(self) -> RecoveredState:
        return RecoveredState(
            entries=list(self.entries), term=self.term,
            voted_for=self.voted_for, commit_index=self.commit_index,
        )


class MemoryStorage:
    """Keeps the log, term/vote and snapshot in memory. For tests and throwaway nodes.

    Snapshot transfers still stage through a file (the engine needs a path),
    in a private temporary directory removed by :meth:`close`.
    """

    def __init__(self) -> None:
        self._state = _LogState()
        self._snapshot: bytes | None = None
        self._dir = tempfile.mkdtemp(prefix="streambus-consensus-")
        self.snapshot_path = os.path.join(self._dir, SNAPSHOT_NAME)

    def open(self) -> RecoveredState:
        """Return the (empty on first use) state."""
        return self._state.recovered()

    def append(self, entry: LogEntry) -> None:
        """Append one entry."""
        self._state.append(entry)

    def truncate_suffix(self, from_index: int) -> None:
        """Drop entries from ``from_index`` on."""
        self._state.truncate_suffix(from_index)

    def compact(self, first_index: int) -> None:
        """Drop entries before ``first_index``."""
        self._state.compact(first_index)

    def set_term(self, term: int, voted_for: str | None) -> None:
        """Record term and vote."""
        self._state.term, self._state.voted_for = term, voted_for

    def set_commit_index(self, index: int) -> None:
        """Record the commit hint."""
        self._state.commit_index = index

    def sync(self) -> None:
        """Nothing to do: memory is as durable as it gets."""

    def save_snapshot(self, data: bytes) -> None:
        """Keep ``data`` and mirror it to the transfer file."""
        self._snapshot = data
        tmp = self.snapshot_path + ".writing"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.snapshot_path)

    def load_snapshot(self) -> bytes | None:
        """The last saved snapshot."""
        return self._snapshot

    def close(self) -> None:
        """Remove the transfer directory."""
        shutil.rmtree(self._dir, ignore_errors=True)


class DiskStorage:
    """Durable storage in ``data_dir`` (created if missing). See the module docstring.

    Args:
        data_dir: directory owned by this node alone.
        fsync: ``False`` skips fsync (page cache only; survives a process
            crash, not a power loss). Default ``True``.
        on_fsync: optional callback receiving each fsync's duration in
            seconds (metrics).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        fsync: bool = True,
        on_fsync: Callable[[float], None] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self._fsync = fsync
        self._on_fsync = on_fsync
        self._wal_path = self.data_dir / WAL_NAME
        self.snapshot_path = str(self.data_dir / SNAPSHOT_NAME)
        self._state = _LogState()
        self._pending: list[bytes] = []
        self._committed = HEADER_SIZE
        self._fd: int | None = None
        self._lock = threading.Lock()  # snapshot writes come from a background thread

    # -- opening -------------------------------------------------------------

    def open(self) -> RecoveredState:
        """Create or load the data directory; verify every file. Raises CorruptStorageError."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create data dir {self.data_dir}: {exc.strerror}") from None
        for leftover in (self._wal_path.with_suffix(".compact"),
                         Path(self.snapshot_path + ".writing")):
            leftover.unlink(missing_ok=True)  # an interrupted rewrite; the original is intact
        snapshot = self.load_snapshot()
        if snapshot is not None:
            unpack_snapshot(snapshot, self.snapshot_path)
        if self._wal_path.exists():
            self._load_wal()
        elif snapshot is not None:
            # A log is created before any snapshot can exist; losing it loses
            # the term, the vote and every entry after the snapshot.
            raise CorruptStorageError(str(self._wal_path),
                                      "missing, but snapshot.bin is present")
        else:
            self._write_new_wal([])
        self._fd = os.open(self._wal_path, os.O_WRONLY)
        return self._state.recovered()

    def _load_wal(self) -> None:
        path = str(self._wal_path)
        data = self._wal_path.read_bytes()
        if len(data) < HEADER_SIZE:
            raise CorruptStorageError(path, f"file is {len(data)} bytes, shorter than its header")
        magic, version, committed, crc = _HEADER.unpack_from(data, 0)
        if magic != WAL_MAGIC:
            raise CorruptStorageError(path, f"not a write-ahead log (magic {magic!r})", offset=0)
        if zlib.crc32(data[:20]) != crc:
            raise CorruptStorageError(path, "header checksum mismatch", offset=0)
        if version != WAL_VERSION:
            raise CorruptStorageError(path, f"unsupported log format version {version}")
        if committed < HEADER_SIZE:
            raise CorruptStorageError(
                path, f"header records {committed} committed bytes, less than the header",
                offset=0)
        if len(data) < committed:
            raise CorruptStorageError(
                path, f"truncated: file is {len(data)} bytes but {committed} were committed",
                offset=len(data),
            )
        pos = HEADER_SIZE
        while pos < committed:
            if committed - pos < _RECORD.size:
                raise CorruptStorageError(path, "record header cut short", offset=pos)
            length, crc, kind = _RECORD.unpack_from(data, pos)
            end = pos + _RECORD.size + length
            if length > MAX_RECORD_BYTES or end > committed:
                raise CorruptStorageError(
                    path, f"record length {length} runs past the committed end", offset=pos
                )
            payload = data[pos + _RECORD.size : end]
            if zlib.crc32(bytes((kind,)) + payload) != crc:
                damage = "zero-filled" if not any(data[pos:end]) else "checksum mismatch"
                raise CorruptStorageError(path, f"record {damage}", offset=pos)
            self._replay(kind, payload, path, pos)
            pos = end
        # Past the declared length lies the last group (its header update
        # rides with the next group). Keep its intact records; a torn or
        # unwritten tail was never acknowledged and is dropped.
        while pos < len(data):
            if len(data) - pos < _RECORD.size:
                break
            length, crc, kind = _RECORD.unpack_from(data, pos)
            end = pos + _RECORD.size + length
            if length > MAX_RECORD_BYTES or end > len(data):
                break
            payload = data[pos + _RECORD.size : end]
            if zlib.crc32(bytes((kind,)) + payload) != crc:
                if any(data[pos:]):
                    # A write cut short leaves a short or zero tail; a whole
                    # record with a bad checksum is damage (it may have been
                    # acknowledged), as etcd's WAL also decides.
                    raise CorruptStorageError(path, "record checksum mismatch", offset=pos)
                break
            self._replay(kind, payload, path, pos)
            pos = end
        if pos < len(data):
            logger.warning("%s: dropping %d bytes of a write that never completed "
                           "(never acknowledged)", path, len(data) - pos)
        self._committed = pos
        if pos != committed or pos < len(data):
            with open(self._wal_path, "r+b") as f:
                f.truncate(pos)
                f.seek(0)
                f.write(_header(pos))
                f.flush()
                if self._fsync:
                    os.fdatasync(f.fileno())

    def _replay(self, kind: int, payload: bytes, path: str, pos: int) -> None:
        try:
            if kind == _T_ENTRY:
                index, term = _ENTRY.unpack_from(payload, 0)
                self._state.append(LogEntry(index, term, payload[_ENTRY.size :]))
            elif kind == _T_TERM:
                (self._state.term,) = _U64.unpack_from(payload, 0)
                vote = payload[8:]
                self._state.voted_for = None if vote == b"\xff" else vote[1:].decode("utf-8")
            elif kind == _T_COMMIT:
                (self._state.commit_index,) = _U64.unpack_from(payload, 0)
            elif kind == _T_TRUNCATE:
                self._state.truncate_suffix(_U64.unpack_from(payload, 0)[0])
            else:
                raise CorruptStorageError(path, f"unknown record type {kind}", offset=pos)
        except (struct.error, UnicodeDecodeError, StorageError) as exc:
            if isinstance(exc, CorruptStorageError):
                raise
            raise CorruptStorageError(path, f"malformed record: {exc}", offset=pos) from None

    def _write_new_wal(self, records: list[bytes]) -> None:
        """Atomically replace wal.log with a fresh file holding ``records``."""
        body = b"".join(records)
        tmp = self._wal_path.with_suffix(".compact")
        with open(tmp, "wb") as f:
            f.write(_header(HEADER_SIZE + len(body)))
            f.write(body)
            f.flush()
            if self._fsync:
                os.fsync(f.fileno())
        os.replace(tmp, self._wal_path)
        if self._fsync:
            _fsync_dir(self.data_dir)
        self._committed = HEADER_SIZE + len(body)

    # -- mutations (buffered until sync) ---------------------------------------

    def _check_open(self) -> None:
        if self._fd is None:
            raise StorageError(f"{self._wal_path}: storage is not open")

    def append(self, entry: LogEntry) -> None:
        """Append one entry (buffered until :meth:`sync`)."""
        self._check_open()
        self._state.append(entry)
        self._pending.append(_entry_record(entry))

    def truncate_suffix(self, from_index: int) -> None:
        """Drop entries from ``from_index`` on (buffered until :meth:`sync`)."""
        self._check_open()
        self._state.truncate_suffix(from_index)
        self._pending.append(_record(_T_TRUNCATE, _U64.pack(max(from_index, 0))))

    def set_term(self, term: int, voted_for: str | None) -> None:
        """Record term and vote (buffered until :meth:`sync`)."""
        self._check_open()
        self._state.term, self._state.voted_for = term, voted_for
        self._pending.append(_term_record(term, voted_for))

    def set_commit_index(self, index: int) -> None:
        """Record the commit hint; written with the next group, never on its own."""
        self._state.commit_index = index

    def sync(self) -> None:
        """Write buffered records and make them durable."""
        if self._pending:
            self._check_open()
            self._pending.append(_record(_T_COMMIT, _U64.pack(self._state.commit_index)))
            self._write(b"".join(self._pending))
            self._pending.clear()

    def _write(self, chunk: bytes) -> None:
        fd = self._fd
        if fd is None:
            raise StorageError("storage is closed")
        # One fdatasync per group. The header written with this group declares
        # only what the *previous* sync made durable, so after a power loss it
        # never claims bytes the disk may not hold; this group's records are
        # found past it on open by their checksums.
        try:
            started = time.perf_counter()
            os.pwrite(fd, chunk, self._committed)
            os.pwrite(fd, _header(self._committed), 0)
            self._committed += len(chunk)
            if self._fsync:
                os.fdatasync(fd)
                if self._on_fsync is not None:
                    self._on_fsync(time.perf_counter() - started)
        except OSError as exc:
            raise StorageError(f"cannot write {self._wal_path}: {exc.strerror}") from None

    def compact(self, first_index: int) -> None:
        """Drop entries before ``first_index`` by rewriting the log file."""
        self._state.compact(first_index)
        records = [_term_record(self._state.term, self._state.voted_for)]
        records += [_entry_record(e) for e in self._state.entries]
        records.append(_record(_T_COMMIT, _U64.pack(self._state.commit_index)))
        self._pending.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            self._write_new_wal(records)
        finally:
            self._fd = os.open(self._wal_path, os.O_WRONLY)

    # -- snapshots ------------------------------------------------------------

    def save_snapshot(self, data: bytes) -> None:
        """Atomically and durably replace snapshot.bin. Safe from any thread."""
        with self._lock:
            tmp = self.snapshot_path + ".writing"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    if self._fsync:
                        os.fsync(f.fileno())
                os.replace(tmp, self.snapshot_path)
                if self._fsync:
                    _fsync_dir(self.data_dir)
            except OSError as exc:
                raise StorageError(f"cannot write {self.snapshot_path}: {exc.strerror}") from None

    def load_snapshot(self) -> bytes | None:
        """snapshot.bin's bytes, or None when there is none."""
        try:
            return Path(self.snapshot_path).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self.snapshot_path}: {exc.strerror}") from None

    def close(self) -> None:
        """Sync and close the log, its header declaring everything. Idempotent."""
        if self._fd is not None:
            if self._pending:
                self.sync()
            try:
                os.pwrite(self._fd, _header(self._committed), 0)
                if self._fsync:
                    os.fdatasync(self._fd)
            except OSError as exc:
                logger.error("%s: could not finalize the header: %s", self._wal_path, exc)
            os.close(self._fd)
            self._fd = None

