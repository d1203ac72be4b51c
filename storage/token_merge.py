"""What the offline merge does to one token's occurrences (the BTR paper's offline compression).

- Stopwords (the ids the caller passes: ``reader.inputs.stopword_ids``, English function words,
  punctuation, special and template tokens) collapse to their
  vocabulary token's prototype, sign(mean of all occurrences): their residual becomes zero.
- Every other vocabulary token: bipartite merge of ``ratio`` of its occurrences by Hamming distance
  (alternate occurrences form sets A and B; each A links to its nearest B; the best links merge);
  a merged group takes sign(sum), ties going to the prototype bit. Merged vectors sit closer to the
  prototype, so their residuals code smaller.

``storage.offline`` applies this to a whole index in bounded memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OfflineMerge:
    """Settings of the offline pass; recorded in the manifest."""

    ratio: float = 0.2
    chunk: int = 1024
    buckets: int = 8  # at least; one more per bucket_tokens tokens of the corpus
    # About 35 MB of bucket file at d = 384 (stopwords, ~45% of tokens, stay out): the bound on pass 2's memory.
    bucket_tokens: int = 1_000_000
    # Passages merged together: a token's chunks are cut within a window, so a window's lossless
    # shards go as soon as it is merged and the disk holds one window's scratch, not the corpus's.
    window: int = 500_000

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 0.5:
            raise ValueError(f"offline merge ratio must be in [0, 0.5] (bipartite limit), got {self.ratio}")
        if self.chunk < 2 or self.buckets < 1 or self.bucket_tokens < 1 or self.window < 1:
            raise ValueError("chunk must be >= 2, buckets, bucket_tokens and window >= 1")

    def bucket_count(self, tokens: int) -> int:
        """Buckets for a corpus of ``tokens`` tokens: a bucket's size does not grow with the corpus."""
        return max(self.buckets, -(-tokens // self.bucket_tokens))


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


__all__ = ["OfflineMerge", "merge_occurrences"]
