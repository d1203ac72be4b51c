"""Which reader to build, as plain data a Prefect parameter or a Ray actor can carry."""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .assets import minilm_path
from .config import BTRConfig

if TYPE_CHECKING:
    from .split import SplitReader

# family -> (module, class): a family's module is imported when a reader of it is loaded, so an
# extractive question never imports the T5 family (reader.fid), nor the other way round.
FAMILIES = {"extractive": ("reader.extractive", "ExtractiveReader"), "fid": ("reader.fid", "FiDReader")}
DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoint"  # the trained MiniLM reader (model card inside)
BASE_ENCODER = "all-MiniLM-L6-v2"  # the packaged encoder the default was trained from (fresh span head)
SETTINGS_FILE = "btr.json"


@dataclass(frozen=True)
class ReaderSpec:
    """A reader family, a checkpoint, and BTR settings.

    ``checkpoint``: a hub name or a path; None = the trained default in ``reader/checkpoint``;
    ``"all-MiniLM-L6-v2"`` = the packaged encoder with a fresh span head (what training starts from).
    ``split_layer`` None = the checkpoint's own (its btr.json), else 3/4 of the layers.
    """

    family: str = "extractive"
    checkpoint: str | None = None
    split_layer: int | None = None
    max_passage_tokens: int = 320

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_checkpoint(spec: ReaderSpec) -> tuple[str, bool]:
    """The path or hub name to load and whether it must be local."""
    if spec.checkpoint is None:
        if not (DEFAULT_CHECKPOINT / SETTINGS_FILE).exists():
            raise FileNotFoundError(f"the default reader checkpoint is missing from {DEFAULT_CHECKPOINT}")
        return str(DEFAULT_CHECKPOINT), True
    if spec.checkpoint == BASE_ENCODER:
        return str(minilm_path()), True
    return spec.checkpoint, Path(spec.checkpoint).exists()


def checkpoint_settings(checkpoint: str) -> dict | None:
    """The BTR settings a training stage saved beside its weights (None for other checkpoints)."""
    path = Path(checkpoint) / SETTINGS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def quiet_library_logs() -> None:
    """Command-line tools print their own lines: no weight-loading bars or load reports on stderr.

    transformers reads the environment when it is imported (0.8 s, which a question read without it never
    pays); one imported already is told directly."""
    import os
    import sys

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()


def load_reader(spec: ReaderSpec, light: bool = False) -> SplitReader:
    """Build the reader a spec names (offline for the packaged checkpoints), in float32 on CPU.

    ``light``: for answering, a local checkpoint its family can read without transformers' model classes (an
    extractive BERT: ``reader.bert``, the same weights and outputs) is read so, in a fraction of the start-up;
    any other as always. Training and indexing load through transformers.
    """
    if spec.family not in FAMILIES:
        raise ValueError(f"unknown reader family {spec.family!r}; expected one of {', '.join(FAMILIES)}")
    module, name = FAMILIES[spec.family]
    family = getattr(importlib.import_module(module), name)
    checkpoint, local = resolve_checkpoint(spec)
    split_layer = spec.split_layer
    settings = checkpoint_settings(checkpoint)
    if settings is not None:
        if settings["family"] != family.__name__:
            raise ValueError(f"{checkpoint} is a {settings['family']} checkpoint, not {family.__name__}")
        if split_layer is not None and split_layer != settings["split_layer"]:
            raise ValueError(f"{checkpoint} was trained to split at k={settings['split_layer']}, not k={split_layer}")
        split_layer = settings["split_layer"]
    # Passages take positions from max_query_tokens on, so a trained reader keeps the limit it learned.
    query_tokens = settings.get("max_query_tokens", BTRConfig.max_query_tokens) if settings else BTRConfig.max_query_tokens
    config = BTRConfig(split_layer=split_layer, max_query_tokens=query_tokens, max_passage_tokens=spec.max_passage_tokens)
    # Parameters a checkpoint lacks (the span head of a plain encoder) are initialised from a fixed
    # seed, so the same spec always gives the same reader, and the same weights digest.
    reader = family.light(checkpoint, config, torch.float32) if light and local and hasattr(family, "light") else None
    if reader is None:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            reader = family.from_pretrained(checkpoint, config, local_files_only=local, dtype=torch.float32)
    if settings is not None and settings["calibration"] != reader.calibration:
        raise ValueError(f"{checkpoint} was trained with {settings['calibration']} calibration, not {reader.calibration}")
    for name, value in (settings or {}).get("answer", {}).items():  # the answer rule chosen on dev
        if not hasattr(reader, name):
            raise ValueError(f"{checkpoint}/{SETTINGS_FILE}: unknown answer setting {name!r}")
        setattr(reader, name, value)
    return reader.eval()
