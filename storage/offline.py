"""Offline (lossy) compression of an index, as in BTR: merge token occurrences across the corpus.

- Stopwords (English function words, punctuation, special and template tokens) collapse to their
  vocabulary token's prototype, sign(mean of all occurrences): their residual becomes zero.
- Every other vocabulary token: bipartite merge of ``ratio`` of its occurrences by Hamming distance
  (alternate occurrences form sets A and B; each A links to its nearest B; the best links merge);
  a merged group takes sign(sum), ties going to the prototype bit. Merged vectors sit closer to the
  prototype, so their residuals code smaller.

Occurrences are grouped by token id through an external partition: pass 1 streams the index into
one file per token-id bucket, pass 2 merges one bucket at a time (within chunks of ``chunk``
occurrences, which bounds the pairwise work), writing changed vectors to one file per shard, and
pass 3 rewrites each shard with its changes. Memory is bounded by a bucket and a shard, never the
corpus.
"""

from __future__ import annotations

import itertools
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from reader.inputs import PASSAGE_TEMPLATE

from .index import Index, IndexWriter, Manifest

# A standard English function-word list (as in common stopword lists).
ENGLISH_STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most
    my myself no nor not now of off on once only or other our ours ourselves out over own same she should
    so some such than that the their theirs them themselves then there these they this those through to
    too under until up very was we were what when where which while who whom why will with would you
    your yours yourself yourselves also its""".split()
)


@dataclass(frozen=True)
class OfflineMerge:
    """Settings of the offline pass; recorded in the manifest."""

    ratio: float = 0.2
    chunk: int = 1024
    buckets: int = 64

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 0.5:
            raise ValueError(f"offline merge ratio must be in [0, 0.5] (bipartite limit), got {self.ratio}")
        if self.chunk < 2 or self.buckets < 1:
            raise ValueError("chunk must be >= 2 and buckets >= 1")


def stopword_ids(tokenizer) -> set[int]:
    """Token ids that collapse to their prototype: function words, punctuation, special and template tokens."""
    template_words = PASSAGE_TEMPLATE.replace("{title}", " ").replace("{text}", " ")
    words = set(ENGLISH_STOPWORDS) | set(re.findall(r"\w+", template_words))
    ids = set(tokenizer.all_special_ids)
    for word in words:
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(pieces) == 1:  # a word split into pieces has no single vector to collapse
            ids.add(pieces[0])
    for token, i in tokenizer.get_vocab().items():
        text = token.removeprefix("##").removeprefix("\u2581")
        if text and not any(ch.isalnum() for ch in text):
            ids.add(i)
    return ids


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


def _partition(index: Index, folder: Path, buckets: int) -> None:
    """Pass 1: every occurrence (token, row, position, bits) into its token-id bucket's file."""
    width = index.format.codec.hidden_size // 8
    dtype = _occurrence_dtype(width)
    files = [open(folder / f"bucket-{b:04d}.bin", "ab") for b in range(buckets)]
    try:
        for shard in index.manifest.shards:
            for start in range(shard.first_row, shard.first_row + shard.rows, 256):
                rows = list(range(start, min(start + 256, shard.first_row + shard.rows)))
                passages = index.fetch(rows)
                total = sum(len(p.tokens) for p in passages)
                block = np.empty(total, dtype=dtype)
                block["token"] = np.concatenate([p.tokens.token_ids.numpy() for p in passages])
                block["row"] = np.repeat(rows, [len(p.tokens) for p in passages])
                block["pos"] = np.concatenate([np.arange(len(p.tokens)) for p in passages])
                block["bits"] = np.concatenate([p.tokens.bits.numpy() for p in passages])
                bucket_of = block["token"] % buckets
                for b in np.unique(bucket_of):
                    files[b].write(block[bucket_of == b].tobytes())
    finally:
        for f in files:
            f.close()


def _merge_bucket(path: Path, index: Index, stopwords: set[int], settings: OfflineMerge, shard_files: list) -> int:
    """Pass 2 for one bucket: new bits for every changed occurrence, appended to its shard's file."""
    codec = index.format.codec
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
        if token in stopwords:
            new_bits[start:end] = codec.prototypes[token]
            continue
        for lo in range(start, end, settings.chunk):
            hi = min(lo + settings.chunk, end)
            new_bits[lo:hi] = merge_occurrences(new_bits[lo:hi], codec.prototypes[token], settings.ratio)
    changed = np.flatnonzero((new_bits != occurrences["bits"]).any(1))
    starts_of_shards = np.array([s.first_row for s in index.manifest.shards])
    shard_of = np.searchsorted(starts_of_shards, occurrences["row"][changed], side="right") - 1
    changes = np.empty(len(changed), dtype=_change_dtype(width))
    changes["row"], changes["pos"], changes["bits"] = occurrences["row"][changed], occurrences["pos"][changed], new_bits[changed]
    for s in np.unique(shard_of):
        shard_files[s].write(changes[shard_of == s].tobytes())
    return len(changed)


def _merged_passages(index: Index, shard_id: int, changes_path: Path):
    """(pid, title, text, tokens) of one shard with its changed vectors swapped in."""
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
            change = by_row.get(stored.row)
            if change is not None:
                bits[change["pos"].astype(np.int64)] = change["bits"]
            yield stored.pid, stored.title, stored.text, replace(stored.tokens, bits=torch.from_numpy(bits))


def merge_index(
    source: Path | str, destination: Path | str, stopwords: set[int], settings: OfflineMerge | None = None,
    workdir: Path | str | None = None,
) -> Manifest:
    """Write an offline-compressed copy of the index at ``source`` to ``destination``."""
    settings = settings or OfflineMerge()
    index = Index.open(source)
    destination = Path(destination)
    scratch = Path(tempfile.mkdtemp(prefix="btr-merge-", dir=workdir))
    try:
        _partition(index, scratch, settings.buckets)
        shard_files = [open(scratch / f"changes-{i:05d}.bin", "ab") for i in range(len(index.manifest.shards))]
        try:
            changed = sum(
                _merge_bucket(scratch / f"bucket-{b:04d}.bin", index, stopwords, settings, shard_files)
                for b in range(settings.buckets)
            )
        finally:
            for f in shard_files:
                f.close()
        for b in range(settings.buckets):  # free the disk before pass 3 writes new shards
            (scratch / f"bucket-{b:04d}.bin").unlink()
        # Same prototypes; the dictionary is retrained on merged residuals, which differ from lossless ones.
        merged = itertools.chain.from_iterable(
            _merged_passages(index, i, scratch / f"changes-{i:05d}.bin") for i in range(len(index.manifest.shards))
        )
        sample = [
            (tokens.token_ids.numpy(), tokens.bits.numpy())
            for *_, tokens in itertools.islice(merged, index.format.codec.settings.dictionary_samples)
        ]
        writer = IndexWriter(destination, index.manifest.reader, index.format.codec.with_dictionary(sample))
        shards = [
            writer.write_shard(i, shard.first_row, _merged_passages(index, i, scratch / f"changes-{i:05d}.bin"))
            for i, shard in enumerate(index.manifest.shards)
        ]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    extra = {**index.manifest.extra, "offline_merge": {**asdict(settings), "stopwords": len(stopwords), "changed_tokens": changed}}
    return writer.publish(shards, extra=extra)


__all__ = ["OfflineMerge", "merge_index", "merge_occurrences", "stopword_ids"]
