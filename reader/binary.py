"""Binarizing a reader's states: straight-through sign and calibration scale (the bits' layout is ``storage.bits``).

A token state h (d floats) is stored as sign bits plus one fp16 scale s, and restored as s * sign(h).
Two calibrations, one per model family:

- ``rms`` (pre-norm T5): s = sqrt(mean(h^2)), the statistic the next block's RMSNorm computes. The
  restored s * b has exactly that variance, so the norm inside block k+1 gives back weight * b, i.e.
  sign(normed hidden) at the original scale: the calibrated binarization of BTR.
- ``mean_abs`` (post-norm BERT): s = mean(|h|), the least-squares scale of sign(h).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from storage.bits import BinaryTokens, pack_bits

CALIBRATIONS = ("rms", "mean_abs")
_EPS = 1e-6


class _SignSTE(torch.autograd.Function):
    """sign(x) forward (zeros map to +1), tanh'(x) backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)


def ste_sign(x: torch.Tensor) -> torch.Tensor:
    """Signs in {-1, +1}; gradients pass as if through tanh."""
    return _SignSTE.apply(x)


def token_scale(hidden: torch.Tensor, calibration: str) -> torch.Tensor:
    """Per-token scale [..., 1] of hidden [..., d] under the given calibration."""
    h = hidden.float()
    if calibration == "rms":
        return h.pow(2).mean(-1, keepdim=True).sqrt()
    if calibration == "mean_abs":
        return h.abs().mean(-1, keepdim=True)
    raise ValueError(f"unknown calibration {calibration!r}; expected one of {CALIBRATIONS}")


def binarize(hidden: torch.Tensor, calibration: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Signs [..., d] (straight-through) and scales [..., 1] of hidden states.

    The tanh gradient is taken on the normalized value h / s: on raw T5 residuals (hundreds) it
    would be zero almost everywhere.
    """
    scale = token_scale(hidden, calibration)
    signs = ste_sign(hidden.float() / (scale + _EPS))
    return signs.to(hidden.dtype), scale


def restore(signs: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Signs [..., d] times scales [..., 1]: the float states the upper layers read."""
    return signs * scale.to(signs.dtype)


def pack_states(hidden: torch.Tensor, calibration: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed sign bits uint8 [..., d/8] and fp16 scales [...] of states [..., d], computed where the states are.

    A GPU worker calls it on the device, so only these (1/16 and 1/d of float32 states) cross to the host.
    """
    # sign(h / s) is sign(h) for the positive scale s: the bits come straight from the states.
    scale = token_scale(hidden, calibration).squeeze(-1)
    return pack_bits(hidden >= 0), scale.clamp(max=torch.finfo(torch.float16).max).to(torch.float16)


def to_binary_tokens(
    token_ids: torch.Tensor, hidden: torch.Tensor, split_layer: int, calibration: str
) -> BinaryTokens:
    """Binarize one passage's lower-layer states [L, d] into what storage keeps."""
    return to_binary_batch(token_ids[None], hidden[None], [len(token_ids)], split_layer, calibration)[0]


def to_binary_batch(
    token_ids: torch.Tensor, hidden: torch.Tensor, lengths: Sequence[int], split_layer: int, calibration: str
) -> list[BinaryTokens]:
    """``to_binary_tokens`` of each passage of a padded batch (ids [B, L], states [B, L, d]) at once.

    Binarizing is per token, so one pass over the batch gives each passage the same record as its own
    call would, with the per-call work done once per batch.
    """
    bits, scale = pack_states(hidden, calibration)
    ids = token_ids.to(torch.int32)
    return [
        BinaryTokens(ids[i, :n].clone(), bits[i, :n].clone(), scale[i, :n].clone(), split_layer, hidden.shape[-1], calibration)
        for i, n in enumerate(lengths)
    ]
