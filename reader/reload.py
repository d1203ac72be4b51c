"""A running service moves to an index's new version (an update published) without a restart.

``VersionWatch.lookup`` is ``Answerer.lookup`` after one stat of the index's manifest: when the
manifest has been replaced (an update publishes by renaming a new one in), the new version is
opened (its shards checked, its retriever loaded with the encoder already in memory) and swapped in
as one retriever object that carries its own index, so a lookup that began on the old version
reads the old version throughout. A new version that does not open (half-written, damaged, another
reader or codec) is not served: the old one goes on, a warning says why, and it is tried again once
the manifest changes again.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from storage.index import MANIFEST, Index

from .retriever import Retriever

if TYPE_CHECKING:  # the service imports the query path once its flags are parsed
    from .query import Answerer, Lookup

log = logging.getLogger(__name__)


def _stamp(root: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(root / MANIFEST)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


class VersionWatch:
    """Keeps an Answerer on the newest version of its index, checked before each lookup."""

    def __init__(self, answerer: Answerer) -> None:
        self.answerer, self.root = answerer, answerer.index.root
        self.stamp = _stamp(self.root)
        self.refused: tuple | None = None  # the manifest a failed load saw: not tried again until it changes
        self.reloads = 0
        self._lock = threading.Lock()

    def poll(self) -> bool:
        """Move to the index's new version if one was published; True when it did. Never raises."""
        stamp = _stamp(self.root)
        if stamp is None or stamp in (self.stamp, self.refused):
            return False
        if not self._lock.acquire(blocking=False):  # another request is opening it: go on with the current one
            return False
        try:
            return _stamp(self.root) not in (self.stamp, self.refused) and self._load()
        finally:
            self._lock.release()

    def _load(self) -> bool:
        stamp, old = _stamp(self.root), self.answerer.retriever
        current = self.answerer.index.manifest
        try:
            index = Index.open(self.root, expect=current.reader)
            if index.manifest.codec != current.codec:  # records already read decode with the codec in memory
                raise ValueError("its codec differs from the one being served: restart the service to serve it")
            retriever = Retriever(self.root, old.encoder, getattr(old.index, "nprobe", 32), store=index)
            if retriever.index.ntotal != len(index):
                raise ValueError(f"its retriever holds {retriever.index.ntotal} passages, its manifest {len(index)}")
        except Exception as error:  # noqa: BLE001 (whatever is wrong with it, the version being served goes on)
            self.refused = stamp
            log.warning("%s has a new manifest that does not open (%s); still serving version %s",
                        self.root, str(error).splitlines()[0] if str(error) else type(error).__name__, self.answerer.index.version)
            return False
        self.answerer.index = index  # rows are only appended: whatever the old retriever found reads the same here
        self.answerer.retriever = retriever
        self.stamp, self.reloads = stamp, self.reloads + 1
        log.warning("%s: now serving version %s (%s passages)", self.root, index.version, index.live)
        return True

    def lookup(self, question: str, k: int) -> Lookup:
        """``Answerer.lookup`` on the newest version published."""
        self.poll()
        return self.answerer.lookup(question, k)
