"""In-memory cache of session trees, bounded in bytes (least recently used are dropped).

A cached entry also holds the session's allocator state (its last `lens` tiling), which is what
keeps a session's working-context prefix stable between turns. Dropping an entry loses nothing
durable: the token log is in Redis and the tree is rebuilt from it on the next request."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from lens_serve import metrics
from lens_serve.core.allocator import FocusState
from lens_serve.core.tree import LifetimeTree


@dataclass
class CachedSession:
    tree: LifetimeTree
    focus: FocusState | None = None


class TreeCache:
    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, CachedSession] = OrderedDict()

    def get(self, session_id: str) -> CachedSession | None:
        entry = self._entries.get(session_id)
        if entry is not None:
            self._entries.move_to_end(session_id)
        return entry

    def put(self, session_id: str, entry: CachedSession) -> None:
        self._entries[session_id] = entry
        self._entries.move_to_end(session_id)
        self.trim()

    def drop(self, session_id: str) -> None:
        self._entries.pop(session_id, None)
        self.trim()

    def trim(self) -> None:
        """Evict least recently used entries until the cache fits (call after trees grow)."""
        total = self.nbytes
        while total > self._max_bytes and len(self._entries) > 1:
            _, evicted = self._entries.popitem(last=False)
            total -= evicted.tree.nbytes
        metrics.TREE_CACHE_BYTES.set(total)

    @property
    def nbytes(self) -> int:
        return sum(e.tree.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
