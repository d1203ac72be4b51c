"""Offline (lossy) compression of an index, as in BTR: merge token occurrences across the corpus.

- Stopwords (English function words, punctuation, special and template tokens) collapse to their
  vocabulary token's prototype, sign(mean of all occurrences): their residual becomes zero.
- Every other vocabulary token: bipartite merge of ``ratio`` of its occurrences by Hamming distance
  (alternate occurrences form sets A and B; each A links to its nearest B; the best links merge);
  a merged group takes sign(sum), ties going to the prototype bit. Merged vectors sit closer to the
  prototype, so their residuals code smaller.

Occurrences are grouped by token id through an external partition: pass 1 streams the index into
bucket files, pass 2 merges one bucket at a time (within chunks of ``chunk`` occurrences, which
bounds the pairwise work), writing changed vectors to one file per shard, and pass 3 rewrites each
shard with its changes, setting every stopword to its prototype as it goes. Memory is bounded by a
bucket and a shard, never the corpus: stopwords (about 45% of Wikipedia's tokens, the most frequent
of them 5% each) never enter a bucket; a token's occurrences are cut into pieces of whole chunks,
each hashed to a bucket of its own; and the bucket count grows with the corpus (one per
``bucket_tokens`` tokens, at least ``buckets``). Cutting at chunk boundaries changes nothing: the
merge is the same, whatever the bucketing.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from reader.inputs import stopword_ids

from .index import Index, IndexWriter, Manifest
from .shard import ensure_open_files

@dataclass(frozen=True)
class OfflineMerge:
    """Settings of the offline pass; recorded in the manifest."""

    ratio: float = 0.2
    chunk: int = 1024
    buckets: int = 8  # at least; one more per bucket_tokens tokens of the corpus
    # About 35 MB of bucket file at d = 384 (stopwords, ~45% of tokens, stay out): the bound on pass 2's memory.
    bucket_tokens: int = 1_000_000

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 0.5:
            raise ValueError(f"offline merge ratio must be in [0, 0.5] (bipartite limit), got {self.ratio}")
        if self.chunk < 2 or self.buckets < 1 or self.bucket_tokens < 1:
            raise ValueError("chunk must be >= 2, buckets and bucket_tokens >= 1")

    def bucket_count(self, tokens: int) -> int:
        """Buckets for a corpus of ``tokens`` tokens: a bucket's size does not grow with the corpus."""
        return max(self.buckets, -(-tokens // self.bucket_tokens))


# A token's occurrences go to buckets in pieces of this many chunks (65,536 occurrences, 4 MB at
# d = 384, at the default chunk), so no bucket holds more than a piece of a frequent token.
PIECE_CHUNKS = 64


def _occurrence_dtype(width: int) -> np.dtype:
    return np.dtype([("token", "<u4"), ("row", "<u8"), ("pos", "<u4"), ("bits", "u1", (width,))])


def _change_dtype(width: int) -> np.dtype:
    return np.dtype([("row", "<u8"), ("pos", "<u4"), ("bits", "u1", (width,))])


def merge_occurrences(bits: np.ndarray, prototype: np.ndarray, ratio: float) -> np.ndarray:
    """Bipartite merge of ``ratio`` of one token's occurrences (packed bits [n, d/8]); returns new bits."""
    n = len(bits)
    r = min(round(ratio * n), n // 2)
    if r == 0:
        return bits
    signs = np.unpackbits(bits, axis=1, bitorder="little").astype(np.float32) * 2 - 1
    a, b = signs[0::2], signs[1::2]
    similarity = a @ b.T  # d - 2 * Hamming distance
    partner = similarity.argmax(1)
    best = np.argsort(-similarity[np.arange(len(a)), partner], kind="stable")[:r]
    # Each B token with the A tokens merged into it forms a group that takes sign(sum).
    group_sum = b.copy()
    np.add.at(group_sum, partner[best], a[best])
    proto_sign = np.unpackbits(prototype, bitorder="little").astype(np.float32) * 2 - 1
    merged = np.where(group_sum == 0, proto_sign, np.sign(group_sum))
    out = signs.copy()
    touched_b = np.unique(partner[best])
    out[1::2][touched_b] = merged[touched_b]
    out[0::2][best] = merged[partner[best]]
    return np.packbits(out > 0, axis=1, bitorder="little")


Progress = Callable[[str, int, int], None]  # (pass, done, total): "partition", "merge", "rewrite"


def _partition(index: Index, folder: Path, buckets: int, is_stop: np.ndarray, span: int, progress: Progress) -> int:
    """Pass 1: every non-stopword occurrence (token, row, position, bits) into a bucket's file.

    A token's k-th occurrence (in row, position order) goes with its piece ``k // span`` to bucket
    hash(token, piece). Returns how many stopword occurrences differ from their prototype (pass 3
    changes them).
    """
    codec = index.format.codec
    width = codec.hidden_size // 8
    dtype = _occurrence_dtype(width)
    seen = np.zeros(len(is_stop), dtype=np.int64)  # occurrences of each token so far
    stop_changed = 0
    files = [open(folder / f"bucket-{b:04d}.bin", "ab") for b in range(buckets)]
    try:
        for done, shard in enumerate(index.manifest.shards, start=1):
            for start in range(shard.first_row, shard.first_row + shard.rows, 256):
                rows = list(range(start, min(start + 256, shard.first_row + shard.rows)))
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
                # Each occurrence's number among its token's occurrences, counting earlier blocks.
                order = np.argsort(block["token"], kind="stable")
                tokens = block["token"][order].astype(np.int64)
                first = np.flatnonzero(np.r_[True, tokens[1:] != tokens[:-1]])
                rank = np.empty(len(block), dtype=np.int64)
                rank[order] = np.arange(len(block)) - np.repeat(first, np.diff(np.r_[first, len(block)])) + seen[tokens]
                np.add.at(seen, tokens[first], np.diff(np.r_[first, len(block)]))
                piece = (rank // span).astype(np.uint64)
                bucket_of = (block["token"].astype(np.uint64) * np.uint64(2654435761) + piece) % np.uint64(buckets)
                for b in np.unique(bucket_of):
                    files[b].write(block[bucket_of == b].tobytes())
            progress("partition", done, len(index.manifest.shards))
    finally:
        for f in files:
            f.close()
    return stop_changed


def _merge_bucket(path: Path, index: Index, settings: OfflineMerge) -> int:
    """Pass 2 for one bucket: new bits for every changed occurrence, appended to its shard's changes file.

    A token's occurrences here are whole pieces (multiples of ``chunk``, but for its last), in
    order: counting chunks from the first of them gives the same chunks as over all of them.
    """
    codec, folder = index.format.codec, path.parent
    width = codec.hidden_size // 8
    occurrences = np.fromfile(path, dtype=_occurrence_dtype(width))
    if not len(occurrences):
        return 0
    occurrences = occurrences[np.lexsort((occurrences["pos"], occurrences["row"], occurrences["token"]))]
    tokens = occurrences["token"]
    starts = np.flatnonzero(np.r_[True, tokens[1:] != tokens[:-1]])
    new_bits = occurrences["bits"].copy()
    for start, end in zip(starts, np.r_[starts[1:], len(tokens)]):
        token = int(tokens[start])
        for lo in range(start, end, settings.chunk):
            hi = min(lo + settings.chunk, end)
            new_bits[lo:hi] = merge_occurrences(new_bits[lo:hi], codec.prototypes[token], settings.ratio)
    changed = np.flatnonzero((new_bits != occurrences["bits"]).any(1))
    starts_of_shards = np.array([s.first_row for s in index.manifest.shards])
    shard_of = np.searchsorted(starts_of_shards, occurrences["row"][changed], side="right") - 1
    changes = np.empty(len(changed), dtype=_change_dtype(width))
    changes["row"], changes["pos"], changes["bits"] = occurrences["row"][changed], occurrences["pos"][changed], new_bits[changed]
    for s in np.unique(shard_of):  # opened per write: one file per shard at once would exhaust the file limit
        with open(folder / f"changes-{s:05d}.bin", "ab") as f:
            f.write(changes[shard_of == s].tobytes())
    return len(changed)


def _merged_passages(index: Index, shard_id: int, changes_path: Path, is_stop: np.ndarray):
    """(pid, title, text, tokens) of one shard with its changed vectors swapped in, stopwords collapsed."""
    shard = index.manifest.shards[shard_id]
    width = index.format.codec.hidden_size // 8
    by_row: dict[int, np.ndarray] = {}
    changes = np.fromfile(changes_path, dtype=_change_dtype(width)) if changes_path.exists() else []
    if len(changes):
        changes = changes[np.lexsort((changes["pos"], changes["row"]))]
        rows = changes["row"]
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        for start, end in zip(starts, np.r_[starts[1:], len(rows)]):
            by_row[int(rows[start])] = changes[start:end]
    last = shard.first_row + shard.rows
    for start in range(shard.first_row, last, 256):
        for stored in index.fetch(range(start, min(start + 256, last))):
            bits = stored.tokens.bits.numpy().copy()
            ids = stored.tokens.token_ids.numpy().astype(np.int64)
            stop = is_stop[ids]
            bits[stop] = index.format.codec.prototypes[ids[stop]]
            change = by_row.get(stored.row)
            if change is not None:
                bits[change["pos"].astype(np.int64)] = change["bits"]
            yield stored.pid, stored.title, stored.text, replace(stored.tokens, bits=torch.from_numpy(bits))


def merge_index(
    source: Path | str, destination: Path | str, stopwords: set[int], settings: OfflineMerge | None = None,
    workdir: Path | str | None = None, progress: Progress | None = None,
) -> Manifest:
    """Write an offline-compressed copy of the index at ``source`` to ``destination``.

    ``progress(pass, done, total)`` is called after each shard of passes 1 and 3 and each bucket of pass 2.
    """
    settings = settings or OfflineMerge()
    progress = progress or (lambda *_: None)
    index = Index.open(source)
    destination = Path(destination)
    scratch = Path(tempfile.mkdtemp(prefix="btr-merge-", dir=workdir))
    codec = index.format.codec
    is_stop = np.zeros(codec.vocab_size, dtype=bool)
    is_stop[[t for t in stopwords if t < codec.vocab_size]] = True
    buckets = settings.bucket_count(index.manifest.tokens)
    ensure_open_files(len(index.manifest.shards) + buckets)  # pass 1 holds every shard and every bucket file open
    try:
        changed = _partition(index, scratch, buckets, is_stop, settings.chunk * PIECE_CHUNKS, progress)
        for b in range(buckets):
            changed += _merge_bucket(scratch / f"bucket-{b:04d}.bin", index, settings)
            (scratch / f"bucket-{b:04d}.bin").unlink()  # free the disk as we go
            progress("merge", b + 1, buckets)
        # Same prototypes; the dictionary is retrained on merged residuals, which differ from lossless ones.
        merged = itertools.chain.from_iterable(
            _merged_passages(index, i, scratch / f"changes-{i:05d}.bin", is_stop) for i in range(len(index.manifest.shards))
        )
        sample = [
            (tokens.token_ids.numpy(), tokens.bits.numpy())
            for *_, tokens in itertools.islice(merged, codec.settings.dictionary_samples)
        ]
        writer = IndexWriter(destination, index.manifest.reader, codec.with_dictionary(sample))
        shards = []
        for i, shard in enumerate(index.manifest.shards):
            changes = scratch / f"changes-{i:05d}.bin"
            shards.append(writer.write_shard(i, shard.first_row, _merged_passages(index, i, changes, is_stop)))
            progress("rewrite", i + 1, len(index.manifest.shards))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    extra = {**index.manifest.extra, "offline_merge": {
        **asdict(settings), "bucket_files": buckets, "stopwords": len(stopwords), "changed_tokens": changed,
    }}
    return writer.publish(shards, extra=extra)


__all__ = ["OfflineMerge", "merge_index", "merge_occurrences", "stopword_ids"]
