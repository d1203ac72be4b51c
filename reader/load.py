"""Which reader to build, as plain data a Prefect parameter or a Ray actor can carry."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .assets import minilm_path
from .config import BTRConfig
from .extractive import ExtractiveReader
from .fid import FiDReader
from .split import SplitReader

FAMILIES = {"extractive": ExtractiveReader, "fid": FiDReader}


@dataclass(frozen=True)
class ReaderSpec:
    """A reader family, a checkpoint (hub name or path; None = the packaged MiniLM), and BTR settings."""

    family: str = "extractive"
    checkpoint: str | None = None
    split_layer: int | None = None
    max_passage_tokens: int = 320

    def to_dict(self) -> dict:
        return asdict(self)


def load_reader(spec: ReaderSpec) -> SplitReader:
    """Build the reader a spec names (offline for the packaged default)."""
    if spec.family not in FAMILIES:
        raise ValueError(f"unknown reader family {spec.family!r}; expected one of {', '.join(FAMILIES)}")
    if spec.checkpoint is None and spec.family != "extractive":
        raise ValueError("the packaged default checkpoint is an extractive (BERT) reader; name a T5 checkpoint for fid")
    config = BTRConfig(split_layer=spec.split_layer, max_passage_tokens=spec.max_passage_tokens)
    checkpoint = spec.checkpoint or str(minilm_path())
    # Parameters a checkpoint lacks (the span head of a plain encoder) are initialised from a fixed
    # seed, so the same spec always gives the same reader, and the same weights digest.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reader = FAMILIES[spec.family].from_pretrained(checkpoint, config, local_files_only=spec.checkpoint is None)
    return reader.eval()
