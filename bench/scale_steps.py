"""The steps of ``bench.scale``, each run in its own process: write, faiss, faiss_pq, fetch_lossless, merge, verify, fetch
(``--update``'s are in ``bench.scale_update``).

Each takes the run's config and work folder and returns its figures (small JSON); ``bench.scale``
runs them in order, watching each one's memory and disk.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STEPS = ("write", "faiss", "faiss_pq", "fetch_lossless", "merge", "verify", "fetch")
BUILD_STEPS = ("write", "faiss", "merge")  # what a build does after its workers (the others measure it)
HIDDEN_SIZE = 384  # the default reader's (all-MiniLM-L6-v2)


class Progress:
    """A step's progress on stderr: rewritten in place on a terminal, else a line every ~10% or 30 s."""

    def __init__(self, label: str, total: int, unit: str) -> None:
        self.label, self.total, self.unit, self.start = label, max(total, 1), unit, time.perf_counter()
        self.tty, self.last_line, self.last_done = sys.stderr.isatty(), 0.0, 0

    def update(self, done: int, note: str = "") -> None:
        now = time.perf_counter()
        elapsed = now - self.start
        finished = done >= self.total
        if not (self.tty or finished or done - self.last_done >= self.total / 10 or now - self.last_line >= 30):
            return
        line = f"{self.label}: {done:,}/{self.total:,} {self.unit}, {elapsed:,.0f} s"
        if not finished and done:
            line += f", about {elapsed / done * (self.total - done):,.0f} s left"
        line += f" ({note})" if note else ""
        end = "\n" if finished or not self.tty else ""
        print(("\r" + line.ljust(100)) if self.tty else line, end=end, file=sys.stderr, flush=True)
        self.last_line, self.last_done = now, done


# ---- the steps (each in its own process) ----------------------------------------------------------
def _tokenizer():
    from transformers import AutoTokenizer

    from reader.assets import minilm_path
    from reader.inputs import TokenLayout

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)  # the default reader's tokenizer
    sep = tokenizer.sep_token_id
    return tokenizer, TokenLayout((tokenizer.cls_token_id,), (sep,), (sep,), tokenizer.pad_token_id)


def _identity():
    from storage.identity import ReaderIdentity

    return ReaderIdentity("synthetic bits (bench.scale)", "synthetic", "ExtractiveReader", 3, HIDDEN_SIZE, "mean_abs")


def step_write(cfg: dict, out: Path) -> dict:
    """Synthesize and write every shard, fit the codec like the flow, publish the lossless index."""
    import numpy as np

    from storage.codec import Codec, CodecSettings
    from storage.index import IndexWriter
    from storage.shard import shard_name
    from workers.indexer import EMBEDDINGS, plan_shards

    from .synthetic import BitModel, SyntheticCorpus

    tokenizer, layout = _tokenizer()
    model = BitModel()
    corpus = SyntheticCorpus(tokenizer, layout, HIDDEN_SIZE, model, cfg["words"], cfg["max_tokens"], cfg["seed"])
    plans = plan_shards(cfg["passages"], cfg["shard_size"])
    timer = {"synthesis": 0.0, "codec_fit": 0.0, "write": 0.0}

    def synthesize(plan):
        start = time.perf_counter()
        passages = corpus.passages(plan.shard_id, plan.first_row, plan.rows)
        records = corpus.bits(plan.shard_id, passages)
        rng = np.random.default_rng([cfg["seed"], 3, plan.shard_id])
        vectors = rng.standard_normal((plan.rows, HIDDEN_SIZE), np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)  # the retriever's embeddings are unit vectors
        timer["synthesis"] += time.perf_counter() - start
        return passages, records, vectors

    # The flow fits the codec on the corpus' first passages (codec_sample = 2,000), not on all of it.
    cached, sample = {}, []
    for plan in plans:
        if len(sample) >= cfg["codec_sample"]:
            break
        cached[plan.shard_id] = synthesize(plan)
        sample += cached[plan.shard_id][1][: cfg["codec_sample"] - len(sample)]
    start = time.perf_counter()
    pairs = ((r.token_ids.numpy(), r.bits.numpy()) for r in sample)
    codec = Codec.fit(pairs, len(tokenizer), HIDDEN_SIZE, CodecSettings())
    timer["codec_fit"] = time.perf_counter() - start
    del sample

    root = out / "lossless"
    writer = IndexWriter(root, _identity(), codec)
    (root / EMBEDDINGS).mkdir()
    shards, progress = [], Progress("write", cfg["passages"], "passages")
    for plan in plans:
        passages, records, vectors = cached.pop(plan.shard_id, None) or synthesize(plan)
        start = time.perf_counter()
        rows = ((p.id, p.title, p.text, r) for p, r in zip(passages, records))
        shards.append(writer.write_shard(plan.shard_id, plan.first_row, rows))
        timer["write"] += time.perf_counter() - start
        np.save(root / EMBEDDINGS / f"{shard_name(plan.shard_id)}.npy", vectors)
        written = plan.first_row + plan.rows
        progress.update(written, f"{written / timer['write']:,.0f} passages/s written")
    synthetic = {"bits": model.source, "words": cfg["words"], "seed": cfg["seed"]}
    manifest = writer.publish(shards, {"synthetic": synthetic, "shard_size": cfg["shard_size"]})
    return {
        "tokens": manifest.tokens,
        "shards": len(manifest.shards),
        "synthesis_s": round(timer["synthesis"], 2),
        "codec_fit_s": round(timer["codec_fit"], 2),
        "write_s": round(timer["write"], 2),
        "passages_per_s": round(manifest.passages / timer["write"], 1),
        "tokens_per_s": round(manifest.tokens / timer["write"], 1),
    }


@contextmanager
def _runner(cfg: dict) -> Iterator:
    """What runs a step's units: this process (``workers`` 0), else a loopback Ray of ``workers`` CPUs started for the step."""
    from storage.tasks import serial

    if not cfg["workers"]:
        yield serial
        return
    from workers.cluster import cluster, cluster_runner

    start = time.perf_counter()
    with cluster(cpus=cfg["workers"], include_dashboard=False):
        print(f"ray: {cfg['workers']} CPU(s) up in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        yield cluster_runner()


def _faiss(cfg: dict, out: Path, folder: Path, factory: str | None) -> dict:
    """The retriever over the random unit vectors (built apart on the cluster, with workers); training's time and memory."""
    import resource

    from reader.retriever import build_faiss, build_faiss_apart
    from storage.index import FAISS_FILE, IVF_DATA, Manifest
    from workers.indexer import ShardPlan, embedding_files, shard_embeddings

    manifest = Manifest.load(out / "lossless")
    plans = [ShardPlan(i, s.first_row, s.rows) for i, s in enumerate(manifest.shards)]
    folder.mkdir(exist_ok=True)
    start, marks = time.perf_counter(), {}
    bar = Progress(f"faiss {folder.name}, add", len(plans), "shards")

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "train":  # ru_maxrss: this process's peak so far (the training sample's pages included)
            marks["train_s"] = round(time.perf_counter() - start, 2)
            marks["train_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            print(f"faiss {folder.name}: trained in {marks['train_s']:,} s", file=sys.stderr, flush=True)
        else:
            bar.update(done)

    identity = {"name": "random unit vectors (bench.scale)", "weights_digest": "synthetic", "max_tokens": 256}
    with _runner(cfg) as run:
        if cfg["workers"]:
            files = embedding_files(out / "lossless", plans)
            info = build_faiss_apart(files, folder, identity, run, factory=factory, progress=progress)
        else:
            info = build_faiss(shard_embeddings(out / "lossless", plans), folder, identity, factory=factory, progress=progress)
    size = sum((folder / name).stat().st_size for name in (FAISS_FILE, IVF_DATA) if (folder / name).exists())
    return {"factory": info["factory"], "bytes": size, **marks}


def step_faiss(cfg: dict, out: Path) -> dict:
    """The retriever as the flow builds it: the index type ``index_factory`` picks for the count."""
    return _faiss(cfg, out, out / "index", None)


def step_faiss_pq(cfg: dict, out: Path) -> dict:
    """The IVF-PQ retriever the flow builds past 5M passages, at this count's lists: PQ training and code size."""
    from reader.retriever import ivfpq_factory

    return _faiss(cfg, out, out / "ivfpq", ivfpq_factory(cfg["passages"], HIDDEN_SIZE))


def step_merge(cfg: dict, out: Path) -> dict:
    """The flow's offline merge of the lossless index into the final folder."""
    from reader.inputs import stopword_ids
    from storage.offline import OfflineMerge, merge_index

    bars: dict[str, Progress] = {}

    def progress(stage: str, done: int, total: int) -> None:
        unit = "buckets" if stage == "merge" else "shards"
        bars.setdefault(stage, Progress(f"merge, {stage}", total, unit)).update(done)

    with _runner(cfg) as run:
        manifest = merge_index(
            out / "lossless", out / "index", stopword_ids(_tokenizer()[0]), OfflineMerge(cfg["offline_ratio"], window=cfg["merge_window"]),
            workdir=out, progress=progress, run=run, consume_source=True,
        )
    merge = manifest.extra["offline_merge"]
    return {"changed_tokens": merge["changed_tokens"], "bucket_files": merge["bucket_files"], "passages": manifest.passages}


def step_verify(cfg: dict, out: Path) -> dict:
    from storage.verify import verify

    print("verify: checking every shard's digest and every record's checksum", file=sys.stderr, flush=True)
    with _runner(cfg) as run:
        problems, checked = verify(out / "index", run)
    return {"ok": not problems, "records": checked, "problems": problems[:10]}


def step_fetch_lossless(cfg: dict, out: Path) -> dict:
    """``step_fetch`` on the lossless index, before the merge consumes it (as the flow's does)."""
    return _fetch(cfg, {"lossless": out / "lossless"})


def step_fetch(cfg: dict, out: Path) -> dict:
    return _fetch(cfg, {"merged": out / "index"})


def _fetch(cfg: dict, folders: dict[str, Path]) -> dict:
    """Fetch + decode of ``fetch`` random passages, ``draws`` times; bits per dimension from a sample of records."""
    import numpy as np

    from storage.index import Index
    from storage.record import section_sizes

    result = {}
    for name, folder in folders.items():
        index = Index.open(folder)
        rng = np.random.default_rng([cfg["seed"], 4])
        index.fetch([s.first_row for s in index.manifest.shards])  # every shard opened once, as a warm service has
        times = []
        for _ in range(cfg["draws"]):
            rows = rng.choice(len(index), min(cfg["fetch"], len(index)), replace=False).tolist()
            start = time.perf_counter()
            index.fetch(rows)
            times.append(time.perf_counter() - start)
        sample = rng.choice(len(index), min(2000, len(index)), replace=False).tolist()
        sizes = [section_sizes(v) for v in index.read_raw(sample)]
        tokens = sum(len(p.tokens) for p in index.fetch(sample))
        result[name] = {
            "fetch_ms_p50": round(1000 * float(np.percentile(times, 50)), 3),
            "fetch_ms_p99": round(1000 * float(np.percentile(times, 99)), 3),
            "bits_per_dim": round(8 * sum(s["bits"] for s in sizes) / (tokens * HIDDEN_SIZE), 4),
            "record_bytes_per_token": round(sum(s["total"] for s in sizes) / tokens, 2),
        }
    return result
