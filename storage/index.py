"""An index folder: ``manifest.json`` (written last), ``codec/``, ``shards/``, and the retriever's files.

    IndexWriter(root, identity, codec).write_shard(...) per shard, then .publish(shards)
    Index.open(root, expect=reader.identity()).fetch(rows)

The manifest is the commit point: written atomically after every shard it lists is sealed, so a
reader either sees a complete index or none, and reads it only after checking it against a schema
(pydantic: field types, digests, shard names confined to ``shards/``). Shards open lazily and are
shared by every thread of the process, a bounded number at a time (see ``storage.open_shards``).
Opening, and every read, first checks the shard's file against the manifest's size (LMDB would
fault on a shorter one) and the file it was opened on: a damaged or replaced shard is a
``DamagedIndex``, never a signal or a mix; any error the system gives opening an index file is one too.
"""

from __future__ import annotations

import bisect
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import lmdb
import numpy as np
import zstandard as zstd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .bits import BinaryTokens
from .codec import Codec
from .identity import ReaderIdentity
from .record import Passage, RecordFormat, StoredPassage, decode_records, decode_texts, encode_record
from .shard import (
    BLOCK_ROWS, SHARDS, DamagedIndex, Digest, ShardInfo, block_key, block_record, check_shard_files, os_fault,
    repair_hint, sealed_shard, shard_file, write_shard,
)
from .open_shards import open_shard
from .versions import VersionRecord, load_deleted, version_number

FORMAT_VERSION = 2  # 2: records packed in blocks of BLOCK_ROWS rows per LMDB value
MANIFEST = "manifest.json"
CODEC = "codec"
# The retriever's files (reader.retriever writes them; verify checks them against the manifest).
FAISS_FILE = "retriever.faiss"
INFO_FILE = "retriever.json"
ADDED = ".in-retriever-part"  # beside a deleted embeddings file: its vectors are in a finished add unit's part
IVF_DATA = "retriever.ivfdata"  # inverted lists merged on disk (build_faiss_apart)


class IndexNotFound(FileNotFoundError):
    """No complete index at the path (no manifest)."""


@dataclass
class Manifest:
    """Everything needed to read an index, and to check who made it."""

    reader: ReaderIdentity
    codec: dict
    shards: list[ShardInfo]
    format_version: int = FORMAT_VERSION
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    extra: dict = field(default_factory=dict)

    @property
    def passages(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "created": self.created,
            "reader": self.reader.to_dict(),
            "codec": self.codec,
            "passages": self.passages,
            "tokens": self.tokens,
            "shards": [s.to_dict() for s in self.shards],
            **({"extra": self.extra} if self.extra else {}),
        }

    def save(self, root: Path) -> None:
        """Write atomically: a temporary file, fsync, rename over the old manifest."""
        tmp = root / f".{MANIFEST}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / MANIFEST)

    @classmethod
    def load(cls, root: Path) -> "Manifest":
        """The manifest at ``root``: IndexNotFound when there is none, DamagedIndex when it does not read or parse."""
        path = Path(root) / MANIFEST

        def damaged(why: str) -> DamagedIndex:
            return DamagedIndex(f"{path} is damaged ({why}); the shards may be intact: rerun the index flow on {root}")

        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            shards = (Path(root) / SHARDS).is_dir()
            raise IndexNotFound(
                f"no index at {root}: {MANIFEST} is missing (an index is complete only once it is written)"
                + ("; this folder holds shards: a build that has not finished, or whose manifest was lost; "
                   "rerun the index flow on it" if shards else "")
            ) from None
        except OSError as error:
            if not Path(root).is_dir():  # a wrong path is the user's, not the index's
                raise IndexNotFound(f"no index at {root}: not a folder") from None
            if isinstance(error, PermissionError):  # the index may be whole: this user may not read it
                raise DamagedIndex(
                    f"{path} cannot be read by this user ({os_fault(path, error)}); the index may be intact: give this "
                    f"user read access to {root} and its files, or run as their owner"
                ) from None
            raise damaged(f"unreadable: {os_fault(path, error)}") from None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as error:  # not UTF-8, not JSON, nested past the parser's depth
            raise damaged(f"not JSON: {error}") from None
        if not isinstance(data, dict):
            raise damaged("not a JSON object")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: index format {data.get('format_version')}; this code reads format {FORMAT_VERSION}")
        try:
            valid = _ManifestSchema.model_validate(data)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(map(str, first["loc"]))
            more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
            raise damaged(f"{where}: {first['msg']}, got {first.get('input')!r:.60}{more}") from None
        return cls(valid.reader, valid.codec, valid.shards, valid.format_version, valid.created,
                   valid.extra.model_dump(exclude_unset=True))


class _RetrieverRecord(BaseModel):
    """``extra.retriever``: what built the retriever, and its files' sha256 (indexes published since retriever digests)."""

    model_config = ConfigDict(extra="allow")
    digests: dict[Annotated[str, Field(pattern=r"^retriever\.[a-z]+$")], Digest] = {}


class _Extra(BaseModel):
    model_config = ConfigDict(extra="allow")
    retriever: _RetrieverRecord | None = None
    version: VersionRecord | None = None  # an updated index (storage.versions); none: version 1


class _ManifestSchema(BaseModel):
    """What ``manifest.json`` must hold; ``passages`` and ``tokens`` are derived from the shards, not read."""

    format_version: int
    created: str
    reader: ReaderIdentity
    codec: dict[str, Any]
    shards: list[ShardInfo]
    extra: _Extra = _Extra()


def _record_format(codec: Codec, identity: ReaderIdentity) -> RecordFormat:
    if codec.hidden_size != identity.hidden_size:
        raise ValueError(f"codec hidden size {codec.hidden_size} differs from the reader's {identity.hidden_size}")
    return RecordFormat(codec, identity.split_layer, identity.calibration)


class IndexWriter:
    """Writes shards (one writer per shard) and, last, the manifest."""

    def __init__(self, root: Path | str, identity: ReaderIdentity, codec: Codec | None = None) -> None:
        """With a codec, save it as the index's; without, use the one already saved (parallel writers)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.identity = identity
        if codec is None:
            codec = Codec.load(self.root / CODEC)
            self.codec_description = json.loads((self.root / CODEC / "codec.json").read_text())
        else:
            self.codec_description = codec.save(self.root / CODEC)
        self.format = _record_format(codec, identity)

    def encode(self, pid: str, title: str, text: str, tokens: BinaryTokens) -> bytes:
        """One record's bytes (after checking the bits come from this index's reader)."""
        tokens.check_compatible(self.identity.split_layer, self.identity.hidden_size, self.identity.calibration)
        return encode_record(self.format, pid, title, text, tokens)

    def write_shard(
        self, shard_id: int, first_row: int, passages: Iterable[tuple[str, str, str, BinaryTokens]]
    ) -> ShardInfo:
        """Encode and seal one shard of (pid, title, text, tokens), rows first_row, first_row+1, ..."""
        values, tokens = [], 0
        for pid, title, text, bits in passages:
            values.append(self.encode(pid, title, text, bits))
            tokens += len(bits)
        return write_shard(self.root, shard_id, first_row, values, tokens)

    def sealed(self, shard_id: int) -> ShardInfo | None:
        """A shard already sealed intact by an earlier run (a resumed job skips it)."""
        return sealed_shard(self.root, shard_id)

    def publish(self, shards: Sequence[ShardInfo], extra: dict | None = None, first_row: int = 0) -> Manifest:
        """Write the manifest listing ``shards``, which must cover rows ``first_row``.. without gaps.

        ``first_row`` > 0: a part of an index (an update's new shards, merged on their own before they join it).
        """
        ordered = sorted(shards, key=lambda s: s.first_row)
        expected = first_row
        for shard in ordered:
            if shard.first_row != expected:
                raise ValueError(f"{shard.name} starts at row {shard.first_row}; expected {expected} (a shard is missing)")
            expected += shard.rows
        manifest = Manifest(self.identity, self.codec_description, list(ordered), extra=extra or {})
        manifest.save(self.root)
        return manifest


class Index:
    """Read side of an index: fetch passages (text and bits) by row; safe across threads and processes."""

    def __init__(self, root: Path | str, manifest: Manifest, codec: Codec, only: Sequence[int] | None = None) -> None:
        """Refuses (DamagedIndex) a shard missing or of another size than the manifest's: a stat each, no reads.

        ``only``: the positions of the shards to open (the offline merge's window); reading any other is refused.
        """
        self.root = Path(root)
        self.manifest = manifest
        self.format = _record_format(codec, manifest.reader)
        self._starts = [s.first_row for s in manifest.shards]
        # The files this index was opened on: a shard replaced later (a rebuild into the same folder)
        # is refused rather than read against this manifest and retriever.
        opened = manifest.shards if only is None else [manifest.shards[i] for i in only]
        self._inodes = check_shard_files(self.root, opened)
        # Rows this version removed (an update's tombstones): never fetched; retrieval skips them too.
        self.deleted = load_deleted(self.root, manifest.extra, manifest.passages)
        self.version = version_number(manifest.extra)

    @classmethod
    def open(cls, root: Path | str, expect: ReaderIdentity | None = None, only: Sequence[int] | None = None) -> "Index":
        """Open a complete index (``only``: some of its shards); with ``expect``, refuse one built by another reader or split."""
        root = Path(root)
        manifest = Manifest.load(root)
        if expect is not None:
            expect.check_matches(manifest.reader)
        try:
            codec = Codec.load(root / CODEC, manifest.codec)
        except (OSError, ValueError, KeyError, TypeError, zstd.ZstdError) as error:
            raise DamagedIndex(f"the index's codec is missing or damaged ({error}). {repair_hint(root)}") from None
        return cls(root, manifest, codec, only)

    def __len__(self) -> int:
        return self.manifest.passages

    def check(self) -> None:
        """Raise DamagedIndex unless every shard is still the file this index was opened on (stats only)."""
        for shard in self.manifest.shards:
            if shard.name in self._inodes:
                self._check_file(shard)

    def _check_file(self, shard: ShardInfo) -> None:
        # Before every read: LMDB faults (SIGBUS) on a mapped file that has become shorter.
        if shard.name not in self._inodes:
            raise ValueError(f"{shard.name} is not among the shards this index was opened on")
        try:
            if shard_file(self.root, shard).st_ino != self._inodes[shard.name]:
                raise DamagedIndex(f"{shard.name} was replaced after this index was opened (rebuilt into the same folder?)")
        except DamagedIndex as error:
            raise DamagedIndex(
                f"the index at {self.root} changed or was damaged while open: {error}. Restart to read it again; "
                f"if that is refused too, {repair_hint(self.root)}"
            ) from None

    @contextmanager
    def _env(self, shard: ShardInfo) -> Iterator[lmdb.Environment]:
        self._check_file(shard)
        with ExitStack() as stack:
            try:
                env = stack.enter_context(open_shard(self.root, shard.name))
            except lmdb.Error as error:
                raise DamagedIndex(f"{shard.name} is not a readable LMDB file ({error}). {repair_hint(self.root)}") from None
            except OSError as error:  # changed between the size check and the open
                raise DamagedIndex(f"{shard.name} cannot be read ({error}). {repair_hint(self.root)}") from None
            yield env  # a read's own errors pass through to it

    @property
    def live(self) -> int:
        """Passages this version answers from: its rows less its deleted ones."""
        return len(self) - len(self.deleted)

    def _check_row(self, row: int) -> int:
        first = self._starts[0] if self._starts else 0  # 0, but for a part of an index (``IndexWriter.publish``)
        if not first <= row < first + len(self):
            raise IndexError(f"row {row} is outside the index's {len(self)} passages")
        at = np.searchsorted(self.deleted, row)
        if at < len(self.deleted) and self.deleted[at] == row:
            raise IndexError(f"row {row} was deleted by an update (version {self.version} of the index)")
        return row

    def read_raw(self, rows: Sequence[int]) -> list[bytes]:
        """Record bytes for ``rows``, unchecked and undecoded (grouped by shard, one transaction each)."""
        return [value for _, value in self.read(rows)]

    def read(self, rows: Sequence[int]) -> list[tuple[str, bytes]]:
        """(shard name, record bytes) for each of ``rows``, in order: the LMDB half of ``fetch``.

        Safe from many threads: each call reads in its own transaction of the process's environments.
        """
        by_shard: dict[int, list[int]] = {}
        for row in rows:
            by_shard.setdefault(bisect.bisect_right(self._starts, self._check_row(row)) - 1, []).append(row)
        found: dict[int, tuple[str, bytes]] = {}
        for index, shard_rows in by_shard.items():
            shard = self.manifest.shards[index]
            # Blocks are read in place from the memory map; only the wanted records are copied out.
            try:
                with self._env(shard) as env, env.begin(buffers=True) as txn:
                    for row in shard_rows:
                        block = txn.get(block_key(row, shard.first_row))
                        record = block_record(block, (row - shard.first_row) % BLOCK_ROWS) if block is not None else None
                        if record is None:
                            missing = f"{shard.name}: row {row} is missing from its shard"
                            raise DamagedIndex(f"{missing}. {repair_hint(self.root)}")
                        found[row] = shard.name, bytes(record)
            except lmdb.Error as error:
                raise DamagedIndex(f"{shard.name} does not read ({error}). {repair_hint(self.root)}") from None
        return [found[row] for row in rows]

    def fetch(self, rows: Sequence[int]) -> list[StoredPassage]:
        """Passages for ``rows`` in order, each record's checksum verified (CorruptRecord if not)."""
        rows = list(rows)
        return self.decode(self.read(rows), rows) if rows else []

    def texts(self, rows: Sequence[int]) -> list[Passage]:
        """Id, title and text for ``rows`` in order, checksums verified, bits left compressed."""
        rows = list(rows)
        return [decode_texts(self.format, value, f"{name} row {row}") for (name, value), row in zip(self.read(rows), rows)]

    def decode(self, read: Sequence[tuple[str, bytes]], rows: Sequence[int]) -> list[StoredPassage]:
        """Passages from what ``read`` returned for ``rows``: checksums verified, bits decompressed."""
        wheres = [f"{name} row {row}" for (name, _), row in zip(read, rows)]
        return decode_records(self.format, [value for _, value in read], list(rows), wheres)


__all__ = ["SHARDS", "DamagedIndex", "Index", "IndexNotFound", "IndexWriter", "Manifest"]
