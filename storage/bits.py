"""The index's bit-packed tokens: ``BinaryTokens`` (one passage's ids, sign bits and scales) and the bit order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class IncompatibleRepresentation(ValueError):
    """Stored bits were made by a reader with another split layer, hidden size or calibration."""


_BIT_WEIGHTS = 1 << torch.arange(8, dtype=torch.uint8)


def pack_bits(signs: torch.Tensor) -> torch.Tensor:
    """Signs [..., d] (d a multiple of 8) -> uint8 [..., d/8], little-endian bit order."""
    d = signs.shape[-1]
    if d % 8:
        raise ValueError(f"hidden size {d} is not a multiple of 8; bits cannot be packed")
    if signs.device.type == "cpu":  # numpy packs the same bits ~20x faster
        return torch.from_numpy(np.packbits((signs > 0).numpy(), axis=-1, bitorder="little"))
    bits = (signs > 0).to(torch.uint8).reshape(*signs.shape[:-1], d // 8, 8)
    return (bits * _BIT_WEIGHTS.to(bits.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., d/8] -> signs [..., d] in {-1, +1}."""
    bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS.to(packed.device)) != 0
    signs = bits.to(dtype) * 2 - 1
    return signs.reshape(*packed.shape[:-1], packed.shape[-1] * 8)


@dataclass(frozen=True)
class BinaryTokens:
    """What the index keeps for one passage: token ids, packed sign bits, per-token fp16 scale.

    ``split_layer``, ``hidden_size`` and ``calibration`` say which reader made the bits, so a reader
    with another split refuses them instead of reading garbage.
    """

    token_ids: torch.Tensor  # int32 [L]
    bits: torch.Tensor  # uint8 [L, d/8]
    scale: torch.Tensor  # float16 [L]
    split_layer: int
    hidden_size: int
    calibration: str

    def __post_init__(self) -> None:
        n = self.token_ids.shape[0]
        if self.bits.shape != (n, self.hidden_size // 8) or self.scale.shape != (n,):
            raise ValueError(
                f"inconsistent binary tokens: {n} ids, bits {tuple(self.bits.shape)}, "
                f"scale {tuple(self.scale.shape)} for hidden size {self.hidden_size}"
            )

    def __len__(self) -> int:
        return self.token_ids.shape[0]

    def check_compatible(self, split_layer: int, hidden_size: int, calibration: str) -> None:
        """Raise IncompatibleRepresentation unless these bits fit a reader with these settings."""
        mine = (self.split_layer, self.hidden_size, self.calibration)
        theirs = (split_layer, hidden_size, calibration)
        if mine != theirs:
            raise IncompatibleRepresentation(
                f"stored bits come from layer k={self.split_layer}, hidden size {self.hidden_size}, "
                f"calibration {self.calibration!r}; this reader splits at k={split_layer} with hidden "
                f"size {hidden_size} and calibration {calibration!r}: rebuild the index with this reader"
            )
