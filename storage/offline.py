"""Offline (lossy) compression of a whole index in bounded memory: passes of small units, run here or on a cluster.

What happens to each token (``storage.token_merge``): stopwords collapse to their prototype, and
``ratio`` of every other token's occurrences merge, chunk by chunk of ``chunk`` occurrences in (row,
position) order. Occurrences are grouped by token through an external partition in a scratch
folder. Each pass is a map over shards or buckets whose units are independent, so ``merge_index``
runs them with any ``storage.tasks.Runner`` (one process, or Ray tasks: ``workers.offline``) and
writes the same bytes either way:

    count      per shard: how many occurrences of each token it holds (token ids alone are decoded)
    (driver)   each shard's first rank per token: the sum of the shards' counts before it
    partition  per shard: every non-stopword occurrence (token, row, position, bits) to a bucket by
               hash(token, piece), a piece being PIECE_CHUNKS chunks of the token's occurrences in
               corpus order; one file per shard, grouped by bucket
    merge      per bucket: its slice of every shard's file; new bits for the changed occurrences,
               one file per bucket, grouped by shard
    (driver)   the codec's dictionary, trained again on the first merged passages
    rewrite    per shard: its slice of every bucket's changes swapped in, stopwords set to their
               prototypes, sealed into the destination

Memory is bounded by a bucket and a shard, never the corpus: stopwords (about 45% of Wikipedia's
tokens, the most frequent of them 5% each) never enter a bucket; a token's occurrences are cut into
pieces of whole chunks, each hashed to a bucket of its own; and the bucket count grows with the
corpus (one per ``bucket_tokens`` tokens, at least ``buckets``). Cutting at chunk boundaries
changes nothing: the merge is the same, whatever the bucketing.

Every unit writes its files under a temporary name and renames them: a unit lost with its process
runs again from the start, and a rerun given the same ``scratch`` folder and settings skips the
units already done. A shard's partition file is deleted once every bucket is merged.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from .index import Index, IndexWriter, Manifest
from .record import record_token_ids
from .shard import ShardInfo
from .tasks import Runner, serial
from .token_merge import OfflineMerge, merge_occurrences

# A token's occurrences go to buckets in pieces of this many chunks (65,536 occurrences, 4 MB at
# d = 384, at the default chunk), so no bucket holds more than a piece of a frequent token.
PIECE_CHUNKS = 64
PLAN = "plan.json"
_ROWS = 256  # rows read at a time

Progress = Callable[[str, int, int], None]  # (pass, done, total): "count", "partition", "merge", "rewrite"


def _occurrence_dtype(width: int) -> np.dtype:
    return np.dtype([("token", "<u4"), ("row", "<u8"), ("pos", "<u4"), ("bits", "u1", (width,))])


def _change_dtype(width: int) -> np.dtype:
    return np.dtype([("row", "<u8"), ("pos", "<u4"), ("bits", "u1", (width,))])


def _save(path: Path, array: np.ndarray) -> None:
    """``array`` to ``path`` (.npy or raw .bin) under a temporary name, then renamed: never half a file."""
    tmp = path.with_name(f".tmp-{path.name}")
    if path.suffix == ".npy":
        np.save(tmp, array)
    else:
        array.tofile(tmp)
    os.replace(tmp, path)


def _unit(scratch: Path, name: str, unit: int, suffix: str) -> Path:
    return scratch / f"{name}-{unit:05d}{suffix}"


def _save_grouped(scratch: Path, name: str, unit: int, items: np.ndarray, group: np.ndarray, groups: int, result: int) -> None:
    """A unit's items sorted by group, and its index: where each group starts, then ``result`` (written last)."""
    order = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[order], np.arange(groups + 1))
    _save(_unit(scratch, name, unit, ".bin"), items[order])
    _save(_unit(scratch, name, unit, ".idx.npy"), np.r_[bounds, result].astype(np.int64))


def _done(scratch: Path, name: str, unit: int) -> int | None:
    """The result of a unit an earlier attempt finished, else None."""
    path = _unit(scratch, name, unit, ".idx.npy")
    return int(np.load(path)[-1]) if path.exists() else None


def _gather(scratch: Path, name: str, units: int, groups: int) -> None:
    """``name``.npy: every unit's group starts as one table, [group, unit], so a reader takes one group's row."""
    tmp = scratch / f".tmp-{name}.npy"
    table = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(groups + 1, units))
    for start in range(0, units, 1024):
        stop = min(start + 1024, units)
        table[:, start:stop] = np.stack([np.load(_unit(scratch, name, u, ".idx.npy"))[:-1] for u in range(start, stop)], 1)
    table.flush()
    del table
    os.replace(tmp, scratch / f"{name}.npy")


def _read_group(scratch: Path, name: str, group: int, dtype: np.dtype) -> np.ndarray:
    """Group ``group``'s items from every unit's file, in unit order."""
    table = np.load(scratch / f"{name}.npy", mmap_mode="r")
    lo, hi = np.array(table[group]), np.array(table[group + 1])
    pieces = [
        np.fromfile(_unit(scratch, name, u, ".bin"), dtype=dtype, count=int(hi[u] - lo[u]), offset=int(lo[u]) * dtype.itemsize)
        for u in np.flatnonzero(hi > lo)
    ]
    return np.concatenate(pieces) if pieces else np.empty(0, dtype)


_CONTEXT: dict[tuple[str, int], tuple[dict, Index, np.ndarray]] = {}


def _context(scratch: Path) -> tuple[dict, Index, np.ndarray]:
    """The merge's plan, source index and stopword mask, read once per process (a merge's units share them)."""
    key = (str(scratch), (scratch / PLAN).stat().st_mtime_ns)
    if key not in _CONTEXT:
        plan = json.loads((scratch / PLAN).read_text())
        index = Index.open(plan["source"])
        is_stop = np.zeros(index.format.codec.vocab_size, dtype=bool)
        is_stop[[t for t in plan["stopwords"] if t < len(is_stop)]] = True
        _CONTEXT.clear()
        _CONTEXT[key] = plan, index, is_stop
    return _CONTEXT[key]


def _row_blocks(shard: ShardInfo) -> Iterator[list[int]]:
    last = shard.first_row + shard.rows
    for start in range(shard.first_row, last, _ROWS):
        yield list(range(start, min(start + _ROWS, last)))


def count_shard(scratch: str, shard_id: int) -> int:
    """Count pass, one shard: its occurrences of each non-stopword token, saved as (tokens, counts); their sum."""
    path = _unit(Path(scratch), "counts", shard_id, ".npy")
    if not path.exists():
        _, index, is_stop = _context(Path(scratch))
        counts = np.zeros(len(is_stop), dtype=np.int64)
        for rows in _row_blocks(index.manifest.shards[shard_id]):
            read = index.read(rows)
            ids = np.concatenate([record_token_ids(index.format, v, f"{name} row {r}") for (name, v), r in zip(read, rows)])
            counts += np.bincount(ids[~is_stop[ids]], minlength=len(counts))
        tokens = np.flatnonzero(counts)
        _save(path, np.stack([tokens, counts[tokens]]))
    return int(np.load(path)[1].sum())


def _first_ranks(scratch: Path, shards: int, vocab: int) -> None:
    """Each shard's (tokens, rank of its first occurrence of each among all the token's occurrences)."""
    seen = np.zeros(vocab, dtype=np.int64)
    for shard_id in range(shards):
        tokens, counts = np.load(_unit(scratch, "counts", shard_id, ".npy"))
        _save(_unit(scratch, "ranks", shard_id, ".npy"), np.stack([tokens, seen[tokens]]))
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
    tokens, first = np.load(_unit(Path(scratch), "ranks", shard_id, ".npy"))
    seen = np.zeros(len(is_stop), dtype=np.int64)  # occurrences of each token before this block
    seen[tokens] = first
    blocks, bucket_of, stop_changed = [], [], 0
    for rows in _row_blocks(index.manifest.shards[shard_id]):
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
    shard_of = np.searchsorted(np.array([s.first_row for s in index.manifest.shards]), changes["row"], side="right") - 1
    _save_grouped(Path(scratch), "changes", bucket, changes, shard_of, len(index.manifest.shards), len(changed))
    return len(changed)


def _merged_passages(scratch: Path, index: Index, shard_id: int, is_stop: np.ndarray):
    """(pid, title, text, tokens) of one shard with its changed vectors swapped in, stopwords collapsed."""
    shard = index.manifest.shards[shard_id]
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
    marker = _unit(Path(scratch), "rewritten", shard_id, ".json")
    plan, index, is_stop = _context(Path(scratch))
    writer = IndexWriter(destination, index.manifest.reader)
    if marker.exists():  # sealed by an earlier attempt of this merge, and still intact
        info = writer.sealed(shard_id)
        if info is not None and info.to_dict() == json.loads(marker.read_text()):
            return info.to_dict()
    shard = index.manifest.shards[shard_id]
    info = writer.write_shard(shard_id, shard.first_row, _merged_passages(Path(scratch), index, shard_id, is_stop))
    tmp = marker.with_name(f".tmp-{marker.name}")
    tmp.write_text(json.dumps(info.to_dict()))
    os.replace(tmp, marker)
    return info.to_dict()


def _start(scratch: Path, plan: dict) -> None:
    """Keep what an earlier attempt of the same merge left in ``scratch``; clear anything else."""
    path = scratch / PLAN
    if path.exists() and json.loads(path.read_text()) == plan:
        return
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    path.write_text(json.dumps(plan))


def _merge(
    index: Index, folder: Path, destination: Path, settings: OfflineMerge, stopwords: int, run: Runner, progress: Progress
) -> Manifest:
    """The passes, in order, over a started scratch folder; the destination's manifest."""
    shards, codec = len(index.manifest.shards), index.format.codec
    buckets = settings.bucket_count(index.manifest.tokens)
    units = [(str(folder), i) for i in range(shards)]
    report = lambda stage: lambda done, total: progress(stage, done, total)  # noqa: E731
    run(count_shard, units, report("count"))
    _first_ranks(folder, shards, codec.vocab_size)
    changed = sum(run(partition_shard, units, report("partition")))
    _gather(folder, "part", shards, buckets)
    changed += sum(run(merge_bucket, [(str(folder), b) for b in range(buckets)], report("merge")))
    _gather(folder, "changes", buckets, shards)
    for i in range(shards):  # every bucket is merged: the partition is no longer needed
        _unit(folder, "part", i, ".bin").unlink(missing_ok=True)
    # Same prototypes; the dictionary is trained again on merged residuals, which differ from lossless ones.
    is_stop = _context(folder)[2]
    merged = itertools.chain.from_iterable(_merged_passages(folder, index, i, is_stop) for i in range(shards))
    sample = [(t.token_ids.numpy(), t.bits.numpy()) for *_, t in itertools.islice(merged, codec.settings.dictionary_samples)]
    writer = IndexWriter(destination, index.manifest.reader, codec.with_dictionary(sample))
    del sample
    infos = run(rewrite_shard, [(str(folder), str(destination), i) for i in range(shards)], report("rewrite"))
    extra = {**index.manifest.extra, "offline_merge": {
        **asdict(settings), "bucket_files": buckets, "stopwords": stopwords, "changed_tokens": changed,
    }}
    return writer.publish([ShardInfo.from_dict(i) for i in infos], extra=extra)


def merge_index(
    source: Path | str, destination: Path | str, stopwords: set[int], settings: OfflineMerge | None = None,
    workdir: Path | str | None = None, progress: Progress | None = None, run: Runner = serial,
    scratch: Path | str | None = None,
) -> Manifest:
    """Write an offline-compressed copy of the index at ``source`` to ``destination``.

    ``run`` runs each pass's units (``storage.tasks.serial``, or a cluster's runner); ``scratch``
    (default: a temporary folder in ``workdir``) is kept if the merge fails, so that a rerun with
    the same one resumes. ``progress(pass, done, total)`` is called after each unit of each pass.
    """
    settings = settings or OfflineMerge()
    progress = progress or (lambda *_: None)
    index = Index.open(source)
    folder = Path(scratch) if scratch is not None else Path(tempfile.mkdtemp(prefix="btr-merge-", dir=workdir))
    source_digest = hashlib.sha256("".join(s.digest for s in index.manifest.shards).encode()).hexdigest()
    _start(folder, {
        "source": str(Path(source).resolve()), "source_shards": source_digest, "settings": asdict(settings),
        "stopwords": sorted(stopwords), "buckets": settings.bucket_count(index.manifest.tokens), "span": settings.chunk * PIECE_CHUNKS,
    })
    try:
        manifest = _merge(index, folder, Path(destination), settings, len(stopwords), run, progress)
    except BaseException:
        if scratch is None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    return manifest


__all__ = [
    "OfflineMerge", "count_shard", "merge_bucket", "merge_index", "merge_occurrences", "partition_shard", "rewrite_shard",
]
