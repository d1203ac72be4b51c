"""The offline merge's units: one shard or one bucket of one window each, run by ``storage.offline`` here or as cluster tasks.

A unit reads the window's plan (``plan.json`` in its scratch folder), writes its files under a
temporary name and renames them, and returns a small result (a count, a shard's info): a unit
lost with its process runs again from the start, and one already done returns what it found.
Shards are numbered within their window in the scratch folder, and by their index position in
the source and the destination.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .index import Index, IndexWriter
from .open_shards import close_shards
from .record import record_token_ids
from .shard import ShardInfo, shard_number
from .token_merge import OfflineMerge, merge_occurrences

# A token's occurrences go to buckets in pieces of this many chunks (65,536 occurrences, 4 MB at
# d = 384, at the default chunk), so no bucket holds more than a piece of a frequent token.
PIECE_CHUNKS = 64
PLAN = "plan.json"
_ROWS = 256  # rows read at a time


def _occurrence_dtype(width: int) -> np.dtype:
    return np.dtype([("token", "<u4"), ("row", "<u8"), ("pos", "<u4"), ("bits", "u1", (width,))])


def _change_dtype(width: int) -> np.dtype:
    return np.dtype([("row", "<u8"), ("pos", "<u4"), ("bits", "u1", (width,))])


def save_json(path: Path, value: dict) -> None:
    """``value`` as JSON to ``path`` under a temporary name, then renamed: a marker is whole or absent."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _save(path: Path, array: np.ndarray) -> None:
    """``array`` to ``path`` (.npy or raw .bin) under a temporary name, then renamed: never half a file."""
    tmp = path.with_name(f".tmp-{path.name}")
    if path.suffix == ".npy":
        np.save(tmp, array)
    else:
        array.tofile(tmp)
    os.replace(tmp, path)


def unit_file(scratch: Path, name: str, unit: int, suffix: str) -> Path:
    return scratch / f"{name}-{unit:05d}{suffix}"


def _save_grouped(scratch: Path, name: str, unit: int, items: np.ndarray, group: np.ndarray, groups: int, result: int) -> None:
    """A unit's items sorted by group, and its index: where each group starts, then ``result`` (written last)."""
    order = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[order], np.arange(groups + 1))
    _save(unit_file(scratch, name, unit, ".bin"), items[order])
    _save(unit_file(scratch, name, unit, ".idx.npy"), np.r_[bounds, result].astype(np.int64))


def _done(scratch: Path, name: str, unit: int) -> int | None:
    """The result of a unit an earlier attempt finished, else None."""
    path = unit_file(scratch, name, unit, ".idx.npy")
    return int(np.load(path)[-1]) if path.exists() else None


def gather(scratch: Path, name: str, units: int, groups: int) -> None:
    """``name``.npy: every unit's group starts as one table, [group, unit], so a reader takes one group's row."""
    tmp = scratch / f".tmp-{name}.npy"
    table = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(groups + 1, units))
    for start in range(0, units, 1024):
        stop = min(start + 1024, units)
        table[:, start:stop] = np.stack([np.load(unit_file(scratch, name, u, ".idx.npy"))[:-1] for u in range(start, stop)], 1)
    table.flush()
    del table
    os.replace(tmp, scratch / f"{name}.npy")


def _read_group(scratch: Path, name: str, group: int, dtype: np.dtype) -> np.ndarray:
    """Group ``group``'s items from every unit's file, in unit order."""
    table = np.load(scratch / f"{name}.npy", mmap_mode="r")
    lo, hi = np.array(table[group]), np.array(table[group + 1])
    pieces = [
        np.fromfile(unit_file(scratch, name, u, ".bin"), dtype=dtype, count=int(hi[u] - lo[u]), offset=int(lo[u]) * dtype.itemsize)
        for u in np.flatnonzero(hi > lo)
    ]
    return np.concatenate(pieces) if pieces else np.empty(0, dtype)


_CONTEXT: dict[tuple[str, int], tuple[dict, Index, np.ndarray]] = {}


def _context(scratch: Path) -> tuple[dict, Index, np.ndarray]:
    """A window's plan, source index (its shards opened) and stopword mask, read once per process and window."""
    key = (str(scratch), (scratch / PLAN).stat().st_mtime_ns)
    if key not in _CONTEXT:
        for _, earlier, _ in _CONTEXT.values():  # an earlier window's shards may be deleted now
            close_shards(earlier.root)
        _CONTEXT.clear()
        plan = json.loads((scratch / PLAN).read_text())
        index = Index.open(plan["source"], only=range(plan["first_shard"], plan["first_shard"] + plan["shards"]))
        is_stop = np.zeros(index.format.codec.vocab_size, dtype=bool)
        is_stop[[t for t in plan["stopwords"] if t < len(is_stop)]] = True
        _CONTEXT[key] = plan, index, is_stop
    return _CONTEXT[key]


def _source_shard(plan: dict, index: Index, shard_id: int) -> ShardInfo:
    """The source shard the window numbers ``shard_id``."""
    return index.manifest.shards[plan["first_shard"] + shard_id]


def _row_blocks(shard: ShardInfo) -> Iterator[list[int]]:
    last = shard.first_row + shard.rows
    for start in range(shard.first_row, last, _ROWS):
        yield list(range(start, min(start + _ROWS, last)))


def count_shard(scratch: str, shard_id: int) -> int:
    """Count pass, one shard: its occurrences of each non-stopword token, saved as (tokens, counts); their sum."""
    path = unit_file(Path(scratch), "counts", shard_id, ".npy")
    if not path.exists():
        plan, index, is_stop = _context(Path(scratch))
        counts = np.zeros(len(is_stop), dtype=np.int64)
        for rows in _row_blocks(_source_shard(plan, index, shard_id)):
            read = index.read(rows)
            ids = np.concatenate([record_token_ids(index.format, v, f"{name} row {r}") for (name, v), r in zip(read, rows)])
            counts += np.bincount(ids[~is_stop[ids]], minlength=len(counts))
        tokens = np.flatnonzero(counts)
        _save(path, np.stack([tokens, counts[tokens]]))
    return int(np.load(path)[1].sum())


def first_ranks(scratch: Path, shards: int, vocab: int) -> None:
    """Each shard's (tokens, rank of its first occurrence of each among all the token's occurrences)."""
    seen = np.zeros(vocab, dtype=np.int64)
    for shard_id in range(shards):
        tokens, counts = np.load(unit_file(scratch, "counts", shard_id, ".npy"))
        _save(unit_file(scratch, "ranks", shard_id, ".npy"), np.stack([tokens, seen[tokens]]))
        seen[tokens] += counts


def partition_shard(scratch: str, shard_id: int) -> int:
    """Partition pass, one shard: its non-stopword occurrences grouped by bucket; how many stopwords differ from their prototype.

    A token's k-th occurrence in the corpus (in row, position order) goes with its piece
    ``k // span`` to bucket hash(token, piece).
    """
    done = _done(Path(scratch), "part", shard_id)
    if done is not None:
        return done
    plan, index, is_stop = _context(Path(scratch))
    codec, buckets, span = index.format.codec, plan["buckets"], plan["span"]
    dtype = _occurrence_dtype(codec.hidden_size // 8)
    tokens, first = np.load(unit_file(Path(scratch), "ranks", shard_id, ".npy"))
    seen = np.zeros(len(is_stop), dtype=np.int64)  # occurrences of each token before this block
    seen[tokens] = first
    blocks, bucket_of, stop_changed = [], [], 0
    for rows in _row_blocks(_source_shard(plan, index, shard_id)):
        passages = index.fetch(rows)
        ids = np.concatenate([p.tokens.token_ids.numpy() for p in passages]).astype(np.int64)
        bits = np.concatenate([p.tokens.bits.numpy() for p in passages])
        stop = is_stop[ids]
        stop_changed += int((bits[stop] != codec.prototypes[ids[stop]]).any(1).sum())
        keep = ~stop
        if not keep.any():
            continue
        block = np.empty(int(keep.sum()), dtype=dtype)
        block["token"] = ids[keep]
        block["row"] = np.repeat(rows, [len(p.tokens) for p in passages])[keep]
        block["pos"] = np.concatenate([np.arange(len(p.tokens)) for p in passages])[keep]
        block["bits"] = bits[keep]
        # Each occurrence's number among its token's occurrences, counting earlier blocks and shards.
        order = np.argsort(block["token"], kind="stable")
        sorted_tokens = block["token"][order].astype(np.int64)
        starts = np.flatnonzero(np.r_[True, sorted_tokens[1:] != sorted_tokens[:-1]])
        runs = np.diff(np.r_[starts, len(block)])
        rank = np.empty(len(block), dtype=np.int64)
        rank[order] = np.arange(len(block)) - np.repeat(starts, runs) + seen[sorted_tokens]
        np.add.at(seen, sorted_tokens[starts], runs)
        piece = (rank // span).astype(np.uint64)
        blocks.append(block)
        bucket_of.append((block["token"].astype(np.uint64) * np.uint64(2654435761) + piece) % np.uint64(buckets))
    occurrences = np.concatenate(blocks) if blocks else np.empty(0, dtype)
    groups = np.concatenate(bucket_of) if bucket_of else np.empty(0, np.uint64)
    _save_grouped(Path(scratch), "part", shard_id, occurrences, groups.astype(np.int64), buckets, stop_changed)
    return stop_changed


def merge_bucket(scratch: str, bucket: int) -> int:
    """Merge pass, one bucket: new bits for every changed occurrence, grouped by shard; how many changed.

    A token's occurrences here are whole pieces (multiples of ``chunk``, but for its last), in
    order: counting chunks from the first of them gives the same chunks as over all of them.
    """
    done = _done(Path(scratch), "changes", bucket)
    if done is not None:
        return done
    plan, index, _ = _context(Path(scratch))
    codec, settings = index.format.codec, OfflineMerge(**plan["settings"])
    width = codec.hidden_size // 8
    occurrences = _read_group(Path(scratch), "part", bucket, _occurrence_dtype(width))
    occurrences = occurrences[np.lexsort((occurrences["pos"], occurrences["row"], occurrences["token"]))]
    tokens = occurrences["token"]
    starts = np.flatnonzero(np.r_[True, tokens[1:] != tokens[:-1]]) if len(tokens) else np.empty(0, np.int64)
    new_bits = occurrences["bits"].copy()
    for start, end in zip(starts, np.r_[starts[1:], len(tokens)]):
        token = int(tokens[start])
        for lo in range(start, end, settings.chunk):
            hi = min(lo + settings.chunk, end)
            new_bits[lo:hi] = merge_occurrences(new_bits[lo:hi], codec.prototypes[token], settings.ratio)
    changed = np.flatnonzero((new_bits != occurrences["bits"]).any(1))
    changes = np.empty(len(changed), dtype=_change_dtype(width))
    changes["row"], changes["pos"], changes["bits"] = occurrences["row"][changed], occurrences["pos"][changed], new_bits[changed]
    firsts = np.array([_source_shard(plan, index, i).first_row for i in range(plan["shards"])])
    shard_of = np.searchsorted(firsts, changes["row"], side="right") - 1
    _save_grouped(Path(scratch), "changes", bucket, changes, shard_of, plan["shards"], len(changed))
    return len(changed)


def merged_passages(scratch: Path, shard_id: int) -> Iterator[tuple]:
    """(pid, title, text, tokens) of one shard of the window with its changed vectors swapped in, stopwords collapsed."""
    plan, index, is_stop = _context(scratch)
    shard = _source_shard(plan, index, shard_id)
    changes = _read_group(scratch, "changes", shard_id, _change_dtype(index.format.codec.hidden_size // 8))
    by_row: dict[int, np.ndarray] = {}
    if len(changes):
        changes = changes[np.lexsort((changes["pos"], changes["row"]))]
        rows = changes["row"]
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        for start, end in zip(starts, np.r_[starts[1:], len(rows)]):
            by_row[int(rows[start])] = changes[start:end]
    for rows in _row_blocks(shard):
        for stored in index.fetch(rows):
            bits = stored.tokens.bits.numpy().copy()
            ids = stored.tokens.token_ids.numpy().astype(np.int64)
            stop = is_stop[ids]
            bits[stop] = index.format.codec.prototypes[ids[stop]]
            change = by_row.get(stored.row)
            if change is not None:
                bits[change["pos"].astype(np.int64)] = change["bits"]
            yield stored.pid, stored.title, stored.text, replace(stored.tokens, bits=torch.from_numpy(bits))


def rewrite_shard(scratch: str, destination: str, shard_id: int) -> dict:
    """Rewrite pass, one shard: sealed into ``destination`` (whose codec is saved already); its ShardInfo."""
    marker = unit_file(Path(scratch), "rewritten", shard_id, ".json")
    plan, index, _ = _context(Path(scratch))
    writer = IndexWriter(destination, index.manifest.reader)
    shard = _source_shard(plan, index, shard_id)
    number = shard_number(shard.name)  # the source's own: its position in a build, its id in an update's part
    if marker.exists():  # sealed by an earlier attempt of this merge, and still intact
        info = writer.sealed(number)
        if info is not None and info.to_dict() == json.loads(marker.read_text()):
            return info.to_dict()
    info = writer.write_shard(number, shard.first_row, merged_passages(Path(scratch), shard_id))
    save_json(marker, info.to_dict())
    return info.to_dict()

