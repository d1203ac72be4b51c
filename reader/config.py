"""BTR settings shared by both reader families: where to split, input limits, runtime merging."""

from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("baseline", "split", "btr")


@dataclass(frozen=True)
class RuntimeMerge:
    """Runtime token merging (BTR mode): intra-passage in the upper encoder, cross-passage in the decoder.

    Ratios are fractions of the current token count merged away per layer; 0 turns a stage off.
    The decoder merges before every layer except each ``decoder_skip``-th (1-based).
    """

    encoder_ratio: float = 0.2
    decoder_ratio: float = 0.2
    decoder_skip: int = 3

    def __post_init__(self) -> None:
        for name in ("encoder_ratio", "decoder_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.decoder_skip < 1:
            raise ValueError(f"decoder_skip must be >= 1, got {self.decoder_skip}")

    def decoder_merges_before(self, layer: int) -> bool:
        """Whether cross-passage merging runs before 0-based decoder layer ``layer``."""
        return self.decoder_ratio > 0 and (layer + 1) % self.decoder_skip != 0


NO_MERGE = RuntimeMerge(encoder_ratio=0.0, decoder_ratio=0.0)


@dataclass(frozen=True)
class BTRConfig:
    """How a reader is split and fed. ``split_layer`` None means 3/4 of the encoder layers (9 of 12)."""

    split_layer: int | None = None
    max_query_tokens: int = 72  # 99.5% of NQ-open and TriviaQA questions fit; longer ones are cut
    max_passage_tokens: int = 320
    merge: RuntimeMerge = field(default_factory=RuntimeMerge)

    def resolve_split_layer(self, num_layers: int) -> int:
        """The split layer k for an encoder of ``num_layers`` layers, validated."""
        k = self.split_layer if self.split_layer is not None else (3 * num_layers) // 4
        if not 0 <= k <= num_layers:
            raise ValueError(f"split layer k={k} is outside 0..{num_layers} for a {num_layers}-layer encoder")
        return k

    def merge_for(self, mode: str) -> RuntimeMerge:
        """Runtime merging applies to BTR mode only: baseline and split are the paper's references."""
        check_mode(mode)
        return self.merge if mode == "btr" else NO_MERGE


def check_mode(mode: str) -> None:
    """Raise ValueError for anything but baseline, split or btr."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
