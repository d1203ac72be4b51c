"""The work of one shard: read its rows, run the lower layers, binarize and pack, embed, write.

``ShardIndexer`` holds the reader and the retriever's encoder, loaded once; the Ray actor in
``workers.actor`` wraps it so a worker serves many shards. Every method returns small summaries
(paths, counts, digests), never tensors.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from reader.load import ReaderSpec, load_reader
from reader.encoder import Encoder
from reader.split import SplitReader
from storage.codec import Codec, CodecSettings, file_digest
from storage.index import ADDED, IndexWriter
from storage.shard import ShardInfo, shard_name, write_shard

from .build import encode_corpus
from .corpus import read_rows
from .pipeline import ShardPipeline
from .progress import ShardProgress

EMBEDDINGS = "embeddings"
# Shard embeddings wait on disk in float16 until the retriever takes them (it reads them back as float32):
# half the pile at the end of indexing, 16 GB instead of 32 for DPR's 21M passages. Answer recall of the
# retriever built from them: flows.retriever_recall's float16 rows against its float32 reference.
EMBEDDING_DTYPE = np.float16
CONSUMED = "in-retriever.json"  # the embeddings went into this retriever and were deleted
# The zstd level of lossless staging shards, which the offline merge decodes and codes again at the codec's own
# level: level 19 coded the demo index's bits at 224k tokens/s here, level 1 at 1.46M, 2% larger (issue 41).
STAGING_LEVEL = 1
# Fault injection for the pipeline's own tests: "<shard id>:<marker file>" makes the worker SIGKILL
# itself once, half-way through writing that shard (the marker records that it happened).
FAULT_ENV = "BTR_FAULT_KILL_SHARD"


@dataclass(frozen=True)
class ShardPlan:
    """Rows ``first_row .. first_row + rows - 1`` of the normalized corpus become shard ``shard_id``."""

    shard_id: int
    first_row: int
    rows: int


def plan_shards(passages: int, shard_size: int) -> list[ShardPlan]:
    """Deterministic shards: the same corpus and shard size always give the same plan."""
    if shard_size < 1:
        raise ValueError(f"shard size must be positive, got {shard_size}")
    return [
        ShardPlan(i, first, min(shard_size, passages - first)) for i, first in enumerate(range(0, passages, shard_size))
    ]


def calibrate_codec(
    index_root: Path, corpus: Path, reader: SplitReader, sample: int, settings: CodecSettings | None = None
) -> dict:
    """Fit the codec (prototypes, zstd dictionary) on the first ``sample`` passages and save it.

    A codec saved by an earlier run is kept as it is, so a resumed run writes the same bytes.
    """
    folder = index_root / "codec"
    if (folder / "codec.json").exists():
        return json.loads((folder / "codec.json").read_text())
    passages = read_rows(corpus, 0, sample)
    records = encode_corpus(reader, passages)
    codec = Codec.fit(((r.token_ids.numpy(), r.bits.numpy()) for r in records), reader.vocab_size, reader.hidden_size, settings)
    return codec.save(folder)


def resumed(info: ShardInfo) -> dict:
    """The summary of a shard an earlier run sealed: nothing indexed now."""
    return {"shard": info.to_dict(), "skipped": True, "passages": info.rows, "tokens": info.tokens, "seconds": 0.0}


class ShardIndexer:
    """Turns shards of the normalized corpus into sealed index shards and embedding files.

    ``threads``: the coding pool's (``workers.pipeline``); ``level``: the zstd level records are written at
    (None: the codec's own; the flow gives lossless staging shards, which the offline merge codes again, a fast one).
    """

    def __init__(
        self, index_root: str, corpus: str, spec: ReaderSpec, encoder: str | None = None, batch_size: int = 32,
        threads: int = 1, level: int | None = None,
    ):
        self.root, self.corpus, self.batch_size = Path(index_root), Path(corpus), batch_size
        self.reader = load_reader(spec)
        if torch.cuda.is_available():
            self.reader.to("cuda", dtype=torch.bfloat16)
        self.encoder = Encoder(encoder)
        self.writer = IndexWriter(self.root, self.reader.identity())
        fmt = self.writer.format
        if level is not None:
            fmt = replace(fmt, codec=fmt.codec.at_level(level))
        self.pipeline = ShardPipeline(self.reader, self.encoder, fmt, batch_size, threads)
        (self.root / EMBEDDINGS).mkdir(exist_ok=True)

    def _embeddings_path(self, shard_id: int) -> Path:
        return self.root / EMBEDDINGS / f"{shard_name(shard_id)}.npy"

    def done(self, plan: ShardPlan) -> dict | None:
        """The summary of a shard an earlier run completed intact, else None."""
        info = self.writer.sealed(plan.shard_id)
        path = self._embeddings_path(plan.shard_id)
        digest_file = path.with_suffix(".sha256")
        if info is None or info.rows != plan.rows or info.first_row != plan.first_row or not digest_file.exists():
            return None
        if not path.exists():  # lost, or in the retriever (built, or a build's finished unit) already
            if embeddings_consumed(self.root) is None and not path.with_suffix(ADDED).exists():
                return None
        elif file_digest(path) != digest_file.read_text().strip():
            return None
        return resumed(info)

    def index(self, plan: ShardPlan) -> dict:
        """Index one shard (or skip it when already complete); a small summary comes back."""
        previous = self.done(plan)
        if previous is not None:
            return previous
        start = time.perf_counter()
        passages = read_rows(self.corpus, plan.first_row, plan.first_row + plan.rows)
        progress = ShardProgress(self.root, plan.shard_id, plan.rows)
        out = self.pipeline.run(passages, progress.add)
        info = write_shard(self.root, plan.shard_id, plan.first_row, _maybe_die(out.records, plan.shard_id), out.tokens)
        path = self._embeddings_path(plan.shard_id)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, np.asarray(out.embeddings, dtype=EMBEDDING_DTYPE))
        os.replace(tmp, path)
        path.with_suffix(".sha256").write_text(file_digest(path))
        seconds = time.perf_counter() - start
        return {
            "shard": info.to_dict(),
            "skipped": False,
            "passages": info.rows,
            "tokens": info.tokens,
            "seconds": round(seconds, 3),
            "passages_per_s": round(info.rows / seconds, 1),
            "tokens_per_s": round(info.tokens / seconds, 1),
        }


def _maybe_die(rows, shard_id: int):
    """Pass rows through; under FAULT_ENV, SIGKILL this process half-way through the named shard once."""
    fault = os.environ.get(FAULT_ENV)
    target, marker = fault.split(":", 1) if fault else (None, None)
    for n, row in enumerate(rows):
        if target is not None and int(target) == shard_id and n == 2 and not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        yield row


def consume_embeddings(index_root: Path, plans: list[ShardPlan], retriever: dict) -> None:
    """Record that the retriever ``retriever`` holds every shard's embeddings, then delete their files (their digests stay).

    A rerun then counts a sealed shard without its embeddings as done, and keeps the retriever.
    """
    (index_root / EMBEDDINGS / CONSUMED).write_text(json.dumps(retriever))
    for path in embedding_files(index_root, plans):
        path.unlink(missing_ok=True)


def embeddings_consumed(index_root: Path) -> dict | None:
    """The retriever built from this staging folder's embeddings (deleted since), else None."""
    path = index_root / EMBEDDINGS / CONSUMED
    return json.loads(path.read_text()) if path.exists() else None


def embedding_files(index_root: Path, plans: list[ShardPlan]) -> list[Path]:
    """Every shard's embeddings file, in row order."""
    return [index_root / EMBEDDINGS / f"{shard_name(p.shard_id)}.npy" for p in plans]


def shard_embeddings(index_root: Path, plans: list[ShardPlan]) -> list[np.ndarray]:
    """Every shard's embeddings, in row order, memory-mapped (never all in RAM at once)."""
    return [np.load(path, mmap_mode="r") for path in embedding_files(index_root, plans)]
