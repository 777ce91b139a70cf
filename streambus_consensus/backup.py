"""Backup files: a node's snapshot saved from a running cluster, and restored
into fresh data directories to seed a new cluster (or to recover one that lost
its quorum).

A backup file is a snapshot file exactly as a node stores it
(:mod:`streambus_consensus.raft.snapshot`: magic, format version, length and a
CRC-32 of the body, then the two last log entries covered, the members and the
state machine's own snapshot), so the node's own checks verify it on restore.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .config import parse_address
from .errors import ConfigError, CorruptStorageError
from .raft.snapshot import SnapshotHeader, pack_snapshot, unpack_snapshot
from .raft.storage import DiskStorage

__all__ = ["BackupInfo", "describe_backup", "read_backup", "restore_backup", "write_backup"]


@dataclass(frozen=True, kw_only=True)
class BackupInfo:
    """What a backup file holds."""

    last_index: int
    """The last log index the snapshot covers (everything up to it is in it)."""
    last_term: int
    """The term of that entry."""
    members: dict[str, str]
    """The voting members when it was taken."""
    size: int
    """Bytes in the file."""
    sha256: str
    """Hex SHA-256 of the whole file, to compare copies."""


def _unpack(blob: bytes, source: str) -> tuple[SnapshotHeader, bytes]:
    try:
        return unpack_snapshot(blob, source)
    except CorruptStorageError as exc:
        raise ConfigError("snapshot file", source, f"is damaged or not a snapshot: {exc.detail}"
                          ) from None


def describe_backup(blob: bytes, source: str = "backup") -> BackupInfo:
    """Verify a backup's checksum and header; raise :class:`ConfigError` if it is
    damaged or not a snapshot at all."""
    header, _ = _unpack(blob, source)
    return BackupInfo(last_index=header.last_index, last_term=header.last_term,
                      members=dict(header.members), size=len(blob),
                      sha256=hashlib.sha256(blob).hexdigest())


def read_backup(path: str | os.PathLike[str]) -> tuple[bytes, BackupInfo]:
    """Read and verify a backup file."""
    try:
        blob = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError("snapshot file", str(path), f"cannot be read: {exc.strerror}") from None
    return blob, describe_backup(blob, str(path))


def write_backup(path: str | os.PathLike[str], blob: bytes) -> BackupInfo:
    """Verify ``blob`` and write it durably to ``path`` (a temporary file
    fsynced, then renamed), refusing to replace an existing file."""
    info = describe_backup(blob, "the node's answer")
    target = Path(path)
    if target.exists():
        raise ConfigError("snapshot file", str(target), "exists; give a new name")
    tmp = target.with_name(target.name + ".writing")
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError("snapshot file", str(target), f"cannot be written: {exc.strerror}"
                          ) from None
    return info


def restore_backup(blob: bytes, data_dir: str | os.PathLike[str],
                   members: Mapping[str, str]) -> BackupInfo:
    """Seed an empty ``data_dir`` with a backup, for a node of a cluster whose
    voting members are ``members`` (``{node_id: "host:port"}``).

    The data directory gets the snapshot (its member list replaced by
    ``members``), an empty log and the snapshot's term, so the node starts as
    if it had just compacted its log there: it applies nothing twice and
    elects a leader in a later term. Give every node of the new cluster the
    same backup. Raises :class:`ConfigError` for a damaged backup, a data
    directory that is not empty or bad members.
    """
    header, state = _unpack(blob, "backup")
    if not members:
        raise ConfigError("members", dict(members), "give at least one member")
    for node_id, address in members.items():
        parse_address(address, field_name=f"members[{node_id!r}]")
    target = Path(data_dir)
    if target.exists() and any(target.iterdir()):
        raise ConfigError("data_dir", str(target),
                          "is not empty: restore into a new directory (move the old one aside)")
    restored = pack_snapshot(SnapshotHeader(
        last_entry=header.last_entry, prev_entry=header.prev_entry,
        members=tuple(sorted(members.items()))), state)
    storage = DiskStorage(target)
    storage.open()
    storage.save_snapshot(restored)
    storage.set_term(header.last_term, None)
    storage.set_commit_index(header.last_index)
    storage.sync()
    storage.close()
    return describe_backup(restored)
