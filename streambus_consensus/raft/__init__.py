"""The Raft adapter: RaftNode over PySyncObj, with our storage and transport."""

from .node import RaftNode
from .safety import MessageGuard
from .storage import DiskStorage, MemoryStorage
from .transport import TcpTransport

__all__ = ["DiskStorage", "MemoryStorage", "MessageGuard", "RaftNode", "TcpTransport"]
