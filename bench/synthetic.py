"""A corpus of any size that looks like Wikipedia to the storage code, made without running a model.

Text: DPR-style passages of ``words`` words drawn from the bundled sample's word frequencies, under
real titles, tokenized by the reader's tokenizer with the reader's passage layout and truncation.
Bits: every vocabulary token gets a prototype (bit d set with a rate drawn per dimension) and a
flip probability per (token, dimension); an occurrence is its prototype with each bit flipped at
that probability, independently. Scales are drawn from the real scales' distribution. The three
distributions are quantiles measured on the default reader's real bits (``measure_bit_model``,
``python -m bench.synthetic``), so the codec meets the same skew as on real bits;
what independent flips lack is context (occurrences of a word in similar contexts sharing flips),
which the offline merge would exploit.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch

from reader.assets import wikipedia_sample
from reader.inputs import TokenLayout, clean_text, encode_passage
from storage.bits import BinaryTokens
from storage.record import Passage

_LEVELS = 33  # quantiles at 0, 1/32, ..., 1

# Measured by `python -m bench.synthetic --passages 2000` (see BitModel).
_PROTOTYPE_RATE = (
    0.0, 0.01439, 0.04279, 0.07413, 0.12371, 0.1576, 0.18322, 0.20985, 0.24257, 0.28623, 0.32145,
    0.34684, 0.36566, 0.40411, 0.44957, 0.50124, 0.54305, 0.57318, 0.61829, 0.63552, 0.65611,
    0.68704, 0.72626, 0.7551, 0.79622, 0.82204, 0.84987, 0.87723, 0.90997, 0.9404, 0.96598, 0.97969,
    1.0,
)
_FLIP_RATE = (
    0.0, 0.0, 0.0005, 0.00758, 0.01804, 0.02954, 0.04138, 0.05372, 0.06839, 0.08333, 0.09881,
    0.11441, 0.13208, 0.14923, 0.16667, 0.18367, 0.20017, 0.21715, 0.23429, 0.25234, 0.27141,
    0.28943, 0.30773, 0.32839, 0.34783, 0.36667, 0.38462, 0.40586, 0.4244, 0.44251, 0.46156,
    0.48077, 0.5,
)
_SCALE = (
    0.34741, 0.40845, 0.43408, 0.44775, 0.45654, 0.46289, 0.46777, 0.47144, 0.47437, 0.47705, 0.479,
    0.4812, 0.48291, 0.48462, 0.48608, 0.48755, 0.48901, 0.49023, 0.49146, 0.49268, 0.4939, 0.49512,
    0.49634, 0.49731, 0.49854, 0.49976, 0.50098, 0.50244, 0.50391, 0.50586, 0.50781, 0.51074,
    0.53271,
)
_SOURCE = (
    "default reader (weights 95e3948b667b, k = 3, d = 384) over the first 2000 sample articles (224689 tokens), "
    "tokens seen >= 20 times (171990 occurrences)"
)


def _quantiles(values: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, ...]:
    """(Weighted) quantiles of ``values`` at _LEVELS evenly spaced levels, rounded for the source."""
    order = np.argsort(values, kind="stable")
    values = values[order]
    cumulative = np.cumsum(np.ones(len(values)) if weights is None else weights[order], dtype=np.float64)
    share = (cumulative - cumulative[0]) / max(cumulative[-1] - cumulative[0], 1e-12)
    points = np.interp(np.linspace(0, 1, _LEVELS), share, values)
    return tuple(round(float(p), 5) for p in points)


def _draw(quantiles: tuple[float, ...], u: np.ndarray) -> np.ndarray:
    """Values with the distribution ``quantiles`` describe, from uniforms ``u`` (inverse transform)."""
    return np.interp(u, np.linspace(0, 1, len(quantiles)), quantiles)


@dataclass(frozen=True)
class BitModel:
    """Distributions of real bits: prototype bit rate per dimension, flip rate per (token, dimension), scale.

    The defaults are ``python -m bench.synthetic --passages 2000``: the default reader
    (reader/checkpoint: trained all-MiniLM-L6-v2, k = 3, d = 384) over the first 2,000 articles
    of the bundled sample (the corpus of ``bench.storage``), tokens seen at least 20 times, flip
    rates weighted by occurrences (their mean, 0.23, is the share of ones in the XOR residual).
    """

    prototype_rate: tuple[float, ...] = _PROTOTYPE_RATE
    flip_rate: tuple[float, ...] = _FLIP_RATE
    scale: tuple[float, ...] = _SCALE
    source: str = _SOURCE

    def to_dict(self) -> dict:
        return asdict(self)


def measure_bit_model(passages: int = 2000, min_count: int = 20) -> BitModel:
    """The three distributions on the default reader's real bits over the first ``passages`` sample articles."""
    from reader.load import ReaderSpec, load_reader, quiet_library_logs
    from storage.codec import PrototypeCounter
    from workers.build import encode_corpus

    quiet_library_logs()
    reader = load_reader(ReaderSpec())
    records = encode_corpus(reader, wikipedia_sample(passages))
    counter = PrototypeCounter(reader.vocab_size, reader.hidden_size)
    for r in records:
        counter.add(r.token_ids.numpy(), r.bits.numpy())
    seen = counter.count >= min_count
    ones, count = counter.ones[seen].astype(np.float64), counter.count[seen]
    rate = ones / count[:, None]
    majority = rate >= 0.5
    prototype_rate = (majority * count[:, None]).sum(0) / count.sum()  # per dimension, occurrence-weighted
    flips = np.minimum(rate, 1 - rate).ravel()
    scales = np.concatenate([r.scale.float().numpy() for r in records])
    tokens = int(counter.count.sum())
    return BitModel(
        prototype_rate=_quantiles(prototype_rate),
        flip_rate=_quantiles(flips, np.repeat(count, reader.hidden_size).astype(np.float64)),
        scale=_quantiles(scales),
        source=f"default reader (weights {reader.identity().weights_digest[:12]}, k = {reader.split_layer}, "
        f"d = {reader.hidden_size}) over the first {passages} sample "
        f"articles ({tokens} tokens), tokens seen >= {min_count} times ({int(count.sum())} occurrences)",
    )


class SyntheticCorpus:
    """Deterministic synthetic passages and their bits: block ``i`` is the same whatever else is drawn."""

    def __init__(
        self, tokenizer, layout: TokenLayout, hidden_size: int, model: BitModel, words: int = 100,
        max_tokens: int = 320, seed: int = 0, split_layer: int = 3, calibration: str = "mean_abs",
    ) -> None:
        self.tokenizer, self.layout, self.words, self.max_tokens, self.seed = tokenizer, layout, words, max_tokens, seed
        self.hidden_size, self.split_layer, self.calibration, self.model = hidden_size, split_layer, calibration, model
        sample = wikipedia_sample()
        counts = collections.Counter(w for p in sample for w in p.text.split())
        self.vocabulary = list(counts)
        self.cumulative = np.cumsum([counts[w] for w in self.vocabulary], dtype=np.float64)
        self.titles = [clean_text(p.title) for p in sample]
        vocab = len(tokenizer)
        rng = np.random.default_rng(seed)
        dim_rate = _draw(model.prototype_rate, rng.random(hidden_size))
        ones = rng.random((vocab, hidden_size), dtype=np.float32) < dim_rate
        self.prototypes = np.packbits(ones, axis=1, bitorder="little")
        # Flip probabilities as 16-bit thresholds: an occurrence's bits flip where 2 random bytes fall below.
        flip = _draw(model.flip_rate, rng.random((vocab, hidden_size), dtype=np.float32))
        self.thresholds = np.round(flip * 65536).clip(0, 65535).astype(np.uint16)

    def passages(self, block: int, first_row: int, count: int) -> list[Passage]:
        """``count`` passages (ids ``syn-<row>``) of block ``block``, their text as the flow's corpus step leaves it."""
        rng = np.random.default_rng([self.seed, 1, block])
        drawn = np.searchsorted(self.cumulative, rng.random((count, self.words)) * self.cumulative[-1], side="right")
        titles = rng.integers(0, len(self.titles), count)
        return [
            Passage(self.titles[t], clean_text(" ".join(self.vocabulary[w] for w in row)), f"syn-{first_row + i}")
            for i, (t, row) in enumerate(zip(titles, drawn))
        ]

    def bits(self, block: int, passages: list[Passage]) -> list[BinaryTokens]:
        """Each passage's token ids (the reader's own tokenization) with synthetic bits and scales."""
        rng = np.random.default_rng([self.seed, 2, block])
        ids = [np.asarray(encode_passage(self.tokenizer, self.layout, p, self.max_tokens), np.int64) for p in passages]
        out = []
        for start in range(0, len(ids), 64):  # ~10k tokens at a time: bounded temporaries
            chunk = ids[start : start + 64]
            flat = np.concatenate(chunk)
            noise = np.frombuffer(rng.bytes(2 * flat.size * self.hidden_size), np.uint16).reshape(flat.size, -1)
            flips = np.packbits(noise < self.thresholds[flat], axis=1, bitorder="little")
            bits = np.bitwise_xor(self.prototypes[flat], flips)
            scale = _draw(self.model.scale, rng.random(flat.size)).astype(np.float16)
            cuts = np.cumsum([len(c) for c in chunk])[:-1]
            for piece_ids, piece_bits, piece_scale in zip(chunk, np.split(bits, cuts), np.split(scale, cuts)):
                out.append(BinaryTokens(
                    torch.from_numpy(piece_ids.astype(np.int32)), torch.from_numpy(piece_bits),
                    torch.from_numpy(piece_scale), self.split_layer, self.hidden_size, self.calibration,
                ))
        return out


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m bench.synthetic", description=measure_bit_model.__doc__)
    parser.add_argument("--passages", type=int, default=2000,
                        help="sample articles to run the default reader over (default: %(default)s)")
    parser.add_argument("--min-count", type=int, default=20,
                        help="tokens seen fewer times are left out of the flip rates (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(json.dumps(measure_bit_model(args.passages, args.min_count).to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
