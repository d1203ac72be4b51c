"""Bipartite token merging (Token Merging, Bolya et al. 2022) over padded batches.

Tokens carry a size (how many original tokens they stand for) and a position (size-weighted mean
of the originals', for relative-position attention). Padding is size 0, so one mechanism covers
both: merging a size-0 token changes nothing, and attention adds log(size) to each key's logit,
which both keeps merged tokens' weight proportional and masks padding (log 0 = masked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Tokens:
    """A padded batch of token states that merging may shrink."""

    hidden: torch.Tensor  # [B, N, d]
    size: torch.Tensor  # [B, N] float, 0 = padding
    position: torch.Tensor  # [B, N] float

    def __len__(self) -> int:
        return self.hidden.shape[1]

    def rows(self, index: torch.Tensor, width: int | None = None) -> "Tokens":
        """The sequences at ``index``, cut to their first ``width`` tokens."""
        return Tokens(*(t[index, :width] for t in (self.hidden, self.size, self.position)))

    def key_bias(self) -> torch.Tensor:
        """Additive attention bias [B, 1, 1, N]: log(size), the dtype's minimum for padding."""
        size = self.size.to(self.hidden.dtype)
        floor = torch.finfo(self.hidden.dtype).min
        bias = torch.where(size > 0, size.clamp_min(1e-9).log(), floor)
        return bias[:, None, None, :]

    def flatten_groups(self, group: int) -> "Tokens":
        """Concatenate each run of ``group`` consecutive sequences into one (FiD's fusion)."""
        b, n, d = self.hidden.shape
        return Tokens(
            self.hidden.reshape(b // group, group * n, d),
            self.size.reshape(b // group, group * n),
            self.position.reshape(b // group, group * n),
        )


def merge_count(num_tokens: int, ratio: float) -> int:
    """How many tokens one merge step removes: ``ratio`` of them, at most half (bipartite limit)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"merge ratio must be in [0, 1), got {ratio}")
    return min(int(ratio * num_tokens), num_tokens // 2)


def bipartite_merge(tokens: Tokens, ratio: float) -> Tokens:
    """Merge ``ratio`` of each sequence's tokens into their most cosine-similar partners.

    Alternate tokens form sets A and B; each A token links to its most similar B token; the r
    best links are merged (size-weighted mean). Padding in A is merged first (it is free); a real
    A token never prefers a padding B token. Ratio 0 returns the input unchanged.
    """
    r = merge_count(len(tokens), ratio)
    if r == 0:
        return tokens
    x, size, pos = tokens.hidden, tokens.size, tokens.position
    a, b = slice(0, None, 2), slice(1, None, 2)

    with torch.no_grad():
        metric = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        scores = metric[:, a] @ metric[:, b].transpose(1, 2)  # [B, Na, Nb], in [-1, 1]
        scores = scores.masked_fill((size[:, b] == 0)[:, None, :], -3.0)
        scores = scores.masked_fill((size[:, a] == 0)[:, :, None], 3.0)
        best, partner = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        src = order[:, :r]  # A indices merged away
        keep = order[:, r:]  # A indices kept
        dst = partner.gather(1, src)  # their B partners

    def pick(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if values.dim() == 3:
            index = index[..., None].expand(-1, -1, values.shape[-1])
        return values.gather(1, index)

    def fold_into_b(values: torch.Tensor) -> torch.Tensor:
        """B's values with the merged-away A values added to their partners."""
        index = dst if values.dim() == 2 else dst[..., None].expand(-1, -1, values.shape[-1])
        return values[:, b].scatter_add(1, index, pick(values[:, a], src))

    weight = size.to(x.dtype)
    merged_size = fold_into_b(size)
    denom = merged_size.clamp_min(1e-9)
    return Tokens(
        hidden=torch.cat([pick(x[:, a], keep), fold_into_b(x * weight[..., None]) / denom.to(x.dtype)[..., None]], 1),
        size=torch.cat([pick(size[:, a], keep), merged_size], 1),
        position=torch.cat([pick(pos[:, a], keep), fold_into_b(pos * size) / denom], 1),
    )
