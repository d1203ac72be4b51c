"""Versions of an index: an update appends shards and publishes a manifest naming its own retriever and deleted rows.

    INDEX/manifest.json          the current version: written last, atomically (as for a build), the commit point
    INDEX/versions/NNNN/         what version NNNN (2, 3, ...) adds: retriever.faiss + retriever.json (the previous
                                 version's vectors and the new ones), deleted.npy (tombstones: sorted rows),
                                 passages.parquet (row, id, digest of every live passage), and, once a later
                                 version is published, the manifest it had (manifest.json)
    INDEX/retriever.*            version 1's retriever (a build's)
    INDEX/shards/                every version's shards: sealed once, never rewritten; an update only adds shards, a
                                 compaction (``storage.compact``) writes the live rows into new ones

An index never updated has no ``extra.version`` in its manifest and reads as before (version 1).
An update only appends rows, so a row is the same passage in every version it publishes; a
compaction renumbers them in a version of new shards. Either way a reader that opened version N keeps
reading it (its shards stay until version N + 2 is out). What a version removes (a deleted passage,
the old text of an edited one) it lists in ``deleted.npy``; retrieval skips those rows and
``Index`` refuses to fetch them. Passages are matched across versions by id and a digest of title
and text (``passage_digests``), kept per version so that matching never decodes a record.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from .codec import file_digest
from .shard import SHARDS, DamagedIndex, Digest, repair_hint

VERSIONS = "versions"
DELETED = "deleted.npy"
PASSAGES = "passages.parquet"
DIGEST_SCHEMA = pa.schema([("row", pa.int64()), ("id", pa.string()), ("digest", pa.uint64())])


class VersionRecord(BaseModel):
    """``extra.version`` of an updated index's manifest (validated with the rest of the manifest)."""

    model_config = ConfigDict(extra="allow")
    number: Annotated[int, Field(strict=True, ge=2)]
    folder: Annotated[str, Field(pattern=r"^versions/[0-9]{4,}$")]  # never a path outside the index
    deleted: Annotated[int, Field(strict=True, ge=0)]
    files: dict[Annotated[str, Field(pattern=r"^(deleted\.npy|passages\.parquet)$")], Digest]


def version_name(number: int) -> str:
    """The folder of version ``number`` under the index."""
    return f"{VERSIONS}/{number:04d}"


def version_record(extra: dict) -> dict | None:
    """The manifest's ``extra.version``; None for an index never updated (version 1)."""
    return extra.get("version")


def version_number(extra: dict) -> int:
    """The manifest's version: 1 for an index never updated."""
    record = version_record(extra)
    return record["number"] if record else 1


def files_folder(root: Path, extra: dict) -> Path:
    """Where the version's retriever and tombstones are: the index folder itself for version 1."""
    record = version_record(extra)
    return Path(root) / record["folder"] if record else Path(root)


def load_deleted(root: Path, extra: dict, rows: int) -> np.ndarray:
    """The version's deleted rows, sorted int64 (empty for version 1); DamagedIndex when the file is not what the manifest says."""
    record = version_record(extra)
    if record is None:
        return np.zeros(0, dtype=np.int64)
    path = Path(root) / record["folder"] / DELETED
    try:
        deleted = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DamagedIndex(f"the deleted rows of {path.parent.name} cannot be read ({error}). {repair_hint(root)}") from None
    ok = (deleted.ndim == 1 and deleted.dtype == np.int64 and len(deleted) == record["deleted"]
          and (len(deleted) == 0 or (deleted[0] >= 0 and deleted[-1] < rows and (np.diff(deleted) > 0).all())))
    if not ok:
        raise DamagedIndex(
            f"{path} is damaged (not {record['deleted']} sorted rows below {rows}). {repair_hint(root)}"
        )
    return deleted


def passage_digests(titles: list[str], texts: list[str]) -> np.ndarray:
    """uint64 per passage: blake2b of title and text. Compared only between versions of the same id."""
    out = np.empty(len(texts), dtype=np.uint64)
    for i, (title, text) in enumerate(zip(titles, texts)):
        digest = hashlib.blake2b(title.encode() + b"\0" + text.encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little")
    return out


def digest_table(rows: np.ndarray, ids: list[str] | pa.Array, digests: np.ndarray) -> pa.Table:
    """(row, id, digest) of live passages."""
    return pa.Table.from_arrays([pa.array(rows, pa.int64()), pa.array(ids, pa.string()), pa.array(digests, pa.uint64())],
                                schema=DIGEST_SCHEMA)


def read_passages(root: Path, extra: dict) -> pa.Table | None:
    """The version's (row, id, digest) table; None for version 1 (its passages are read from its records)."""
    record = version_record(extra)
    if record is None:
        return None
    return pq.read_table(Path(root) / record["folder"] / PASSAGES, schema=DIGEST_SCHEMA)


def unique_ids(ids: pa.Array | pa.ChunkedArray, what: str) -> None:
    """Refuse (ValueError) a set of passages that repeats an id: an update matches passages by id."""
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        repeated = [item["values"].as_py() for item in counts if item["counts"].as_py() > 1]
        raise ValueError(f"{what} repeats {len(repeated)} passage id(s) (the first: {repeated[0]!r}); an update "
                         "matches passages by id, so ids must be unique")


@dataclass(frozen=True)
class Changes:
    """What an update does to the current version: positions in the new corpus, rows of the current index."""

    unchanged: int
    changed: np.ndarray  # positions in the new corpus of passages whose title or text changed
    added: np.ndarray  # positions of passages with a new id
    removed_rows: np.ndarray  # rows whose passage is gone or changed (they become deleted rows)
    kept: pa.Table  # (row, id, digest) of the unchanged passages

    @property
    def encode(self) -> np.ndarray:
        """Positions to encode, in corpus order: changed and added passages."""
        return np.sort(np.concatenate([self.changed, self.added]))

    def counts(self) -> dict:
        return {"changed": len(self.changed), "added": len(self.added),
                "deleted": len(self.removed_rows) - len(self.changed), "unchanged": self.unchanged}


def match(current: pa.Table, new_ids: pa.Array | pa.ChunkedArray, new_digests: np.ndarray) -> Changes:
    """Match the new corpus (ids, digests in corpus order) against the current version's (row, id, digest)."""
    unique_ids(current["id"], "the current version of the index")
    unique_ids(new_ids, "the new corpus")
    new = pa.table({"id": new_ids, "new_digest": pa.array(new_digests, pa.uint64()),
                    "position": pa.array(np.arange(len(new_digests), dtype=np.int64))})
    joined = current.join(new, keys="id", join_type="full outer")
    row, position = joined["row"], joined["position"]
    same = pc.fill_null(pc.equal(joined["digest"], joined["new_digest"]), False)
    both = pc.and_(pc.is_valid(row), pc.is_valid(position))
    changed = pc.and_(both, pc.invert(same))
    positions = lambda mask: np.sort(joined.filter(mask)["position"].to_numpy())  # noqa: E731
    rows = lambda mask: np.sort(joined.filter(mask)["row"].to_numpy())  # noqa: E731
    kept = joined.filter(same).select(["row", "id", "digest"]).sort_by("row")
    return Changes(
        unchanged=kept.num_rows, changed=positions(changed), added=positions(pc.is_null(row)),
        removed_rows=np.sort(np.concatenate([rows(changed), rows(pc.is_null(position))])).astype(np.int64),
        kept=kept.cast(DIGEST_SCHEMA),
    )


def _save_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_version_files(root: Path, number: int, deleted: np.ndarray, passages: pa.Table) -> dict:
    """Write version ``number``'s tombstones and passage digests; the ``extra.version`` record naming them."""
    folder = Path(root) / version_name(number)
    folder.mkdir(parents=True, exist_ok=True)
    deleted = np.asarray(deleted, dtype=np.int64)
    _save_atomic(folder / DELETED, lambda tmp: np.save(tmp, deleted, allow_pickle=False))  # tmp ends in .npy
    _save_atomic(folder / PASSAGES, lambda tmp: pq.write_table(passages.cast(DIGEST_SCHEMA), tmp, compression="zstd"))
    return {"number": number, "folder": version_name(number), "deleted": int(len(deleted)),
            "files": {name: file_digest(folder / name) for name in (DELETED, PASSAGES)}}


def version_problems(root: Path, extra: dict, rows: int) -> list[str]:
    """What ``storage.verify`` says about the version's own files (none for version 1)."""
    record = version_record(extra)
    if record is None:
        return []
    folder, problems = Path(root) / record["folder"], []
    for name, digest in record["files"].items():
        try:
            if file_digest(folder / name) != digest:
                problems.append(f"version {record['number']}: {record['folder']}/{name} differs from the manifest's digest")
        except OSError as error:
            problems.append(f"version {record['number']}: {record['folder']}/{name} cannot be read ({error.strerror})")
    if not problems:
        try:
            load_deleted(root, extra, rows)
        except DamagedIndex as error:
            problems.append(f"version {record['number']}: {error}")
    return problems


def prune(root: Path, current: int, first_files: tuple[str, ...]) -> list[str]:
    """Remove what versions before ``current - 1`` alone used: their folders, version 1's ``first_files`` (its
    retriever) once version 3 is out, and shards that neither the current manifest nor the previous version's names
    (a compaction's old shards once the version after it is out; shards of an attempt never published). A reader
    that opened the previous version keeps it."""
    removed = _prune_shards(Path(root), current)
    base = Path(root) / VERSIONS
    for folder in sorted(base.iterdir()) if base.is_dir() else []:
        if folder.name.isdigit() and int(folder.name) < current - 1:
            shutil.rmtree(folder)
            removed.append(f"{VERSIONS}/{folder.name}")
    if current >= 3:
        for name in first_files:
            if (Path(root) / name).exists():
                (Path(root) / name).unlink()
                removed.append(name)
    return removed


_MANIFEST = "manifest.json"  # storage.index's MANIFEST (that module imports this one)


def _prune_shards(root: Path, current: int) -> list[str]:
    """Shard folders named by neither the current manifest nor version ``current - 1``'s; none when either is unread."""
    named = set()
    for path in (root / _MANIFEST, root / version_name(current - 1) / _MANIFEST):
        try:
            named |= {shard["name"] for shard in json.loads(path.read_text())["shards"]}
        except (OSError, ValueError, KeyError, TypeError):
            return []  # not sure what a reader may be on: keep everything
    removed = []
    for folder in sorted((root / SHARDS).iterdir()) if (root / SHARDS).is_dir() else []:
        if folder.name.startswith("shard-") and folder.name not in named:
            shutil.rmtree(folder)
            removed.append(f"{SHARDS}/{folder.name}")
    return removed
