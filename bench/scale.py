"""A synthetic corpus of any size through the product's own storage code: throughput, disk, memory, reads.

    python -m bench.scale --passages 1000000 --json
    python -m bench.scale --passages 1000000 --workers 2 --json     # the steps after the workers on Ray

Everything after the model, as the flow `index-wikipedia` does it, at a size no CPU could encode:
passages and bits come from ``bench.synthetic`` (no model runs), then each step runs in its own
process so that its peak memory is its own:

    write     passages shard by shard; the codec fitted on the first 2,000 (as the flow); IndexWriter
              shards and manifest (the flow's lossless staging index); random unit vectors per shard
    faiss     reader.retriever.build_faiss over those vectors (the index type the flow picks for the count)
    faiss_pq  the same with the IVF-PQ type the flow picks past 5M passages (IVF-PQ training at this size)
    merge     storage.offline.merge_index, r_o = 0.2, into the final index (as the flow's publish)
    verify    storage.verify on the final index (digests, every record's checksum, the retriever)
    fetch     40 random passages fetched and decoded, p50 / p99 over 200 draws, lossless and merged

With ``--workers W`` the retriever builds, the merge and verify run as tasks on a loopback Ray of W
CPUs started for each step (``reader.retriever.build_faiss_apart``, ``workers.offline``); their
``digests`` match whatever W is.

Peak memory per step: ``peak_rss_mb`` (the kernel's high-water mark, file pages of memory-mapped
shards included) and ``peak_anon_mb`` (heap, sampled every 0.1 s: what the step's largest process
really holds, Ray's processes included); ``peak_disk_bytes``, the work folder's, sampled every second.
Work goes to ``--out`` (kept), or a temporary folder removed afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from storage.shard import default_shard_size

from .step_monitor import run_watched

STEPS = ("write", "faiss", "faiss_pq", "merge", "verify", "fetch")
HIDDEN_SIZE = 384  # the default reader's (all-MiniLM-L6-v2)
CONFIG = "scale.json"


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
            out / "lossless", out / "index", stopword_ids(_tokenizer()[0]), OfflineMerge(cfg["offline_ratio"]),
            workdir=out, progress=progress, run=run,
        )
    merge = manifest.extra["offline_merge"]
    return {"changed_tokens": merge["changed_tokens"], "bucket_files": merge["bucket_files"], "passages": manifest.passages}


def step_verify(cfg: dict, out: Path) -> dict:
    from storage.verify import verify

    print("verify: checking every shard's digest and every record's checksum", file=sys.stderr, flush=True)
    with _runner(cfg) as run:
        problems, checked = verify(out / "index", run)
    return {"ok": not problems, "records": checked, "problems": problems[:10]}


def step_fetch(cfg: dict, out: Path) -> dict:
    """Fetch + decode of ``fetch`` random passages, ``draws`` times; bits per dimension from a sample of records."""
    import numpy as np

    from storage.index import Index
    from storage.record import section_sizes

    result = {}
    for name, folder in (("lossless", out / "lossless"), ("merged", out / "index")):
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


# ---- the driver ------------------------------------------------------------------------------------
def run_step(step: str, out: Path) -> dict:
    """Run one step in a child process; its result, wall time, peak memory and peak disk."""
    command = [sys.executable, "-m", "bench.scale", "--step", step, "--out", str(out)]
    watched = run_watched(command, out)
    if watched.pop("exit") != 0:
        raise RuntimeError(f"step {step} failed; its folder is {out}")
    return {**json.loads((out / "steps" / f"{step}.json").read_text()), **watched}


def _child(step: str, out: Path) -> int:
    cfg = json.loads((out / CONFIG).read_text())
    figures = globals()[f"step_{step}"](cfg, out)
    (out / "steps").mkdir(exist_ok=True)
    (out / "steps" / f"{step}.json").write_text(json.dumps(figures))
    return 0


def digests(out: Path) -> dict:
    """What two runs over the same corpus share, whoever ran them: manifests (no timestamp), merged shards, retrievers."""
    import hashlib

    from storage.index import Manifest

    def manifest(folder: Path) -> str:
        data = json.loads((folder / "manifest.json").read_text())
        del data["created"]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def retriever(folder: Path) -> str:  # lists merged on disk: the index file names them by path, which is blanked
        lists = (folder / "retriever.ivfdata").resolve()
        data = (folder / "retriever.faiss").read_bytes().replace(str(lists).encode(), b"")
        return hashlib.sha256(data + (lists.read_bytes() if lists.exists() else b"")).hexdigest()

    return {
        "lossless": manifest(out / "lossless"), "merged": manifest(out / "index"),
        "retriever": retriever(out / "index"), "retriever_ivfpq": retriever(out / "ivfpq"),
        "merged_shards": [s.digest for s in Manifest.load(out / "index").shards],
    }


def measure(cfg: dict, out: Path) -> dict:
    """Every step in order; the figures in one dict."""
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(json.dumps(cfg, indent=1))
    steps = {step: run_step(step, out) for step in STEPS}
    from storage.index import Manifest  # light enough for the driver: no model, no faiss

    lossless, merged = Manifest.load(out / "lossless"), Manifest.load(out / "index")
    tokens = lossless.tokens
    codec_bytes = sum(f.stat().st_size for f in (out / "index" / "codec").iterdir())
    write = steps["write"]
    return {
        "passages": lossless.passages,
        "workers": cfg["workers"],
        "tokens": tokens,
        "tokens_per_passage": round(tokens / lossless.passages, 1),
        "write_passages_per_s": write["passages_per_s"],
        "write_tokens_per_s": write["tokens_per_s"],
        "disk_bytes_per_token": {
            "lossless": round(sum(s.bytes for s in lossless.shards) / tokens, 2),
            "merged": round(sum(s.bytes for s in merged.shards) / tokens, 2),
        },
        "bits_per_dim": {name: steps["fetch"][name]["bits_per_dim"] for name in ("lossless", "merged")},
        "fetch_ms": {
            name: {"p50": steps["fetch"][name]["fetch_ms_p50"], "p99": steps["fetch"][name]["fetch_ms_p99"]}
            for name in ("lossless", "merged")
        },
        "faiss": {
            name: {key: steps[name].get(key) for key in ("factory", "train_s", "train_peak_rss_mb", "bytes")}
            for name in ("faiss", "faiss_pq")
        },
        "verify_s": steps["verify"]["seconds"],
        "verified": steps["verify"]["ok"],
        "peak_rss_mb": {step: steps[step]["peak_rss_mb"] for step in STEPS},
        "peak_anon_mb": {step: steps[step]["peak_anon_mb"] for step in STEPS},
        "seconds": {step: steps[step]["seconds"] for step in STEPS},
        "peak_disk_bytes": {step: steps[step]["peak_disk_bytes"] for step in STEPS},
        "digests": digests(out),
        "disk_bytes": {
            "lossless_shards": sum(s.bytes for s in lossless.shards),
            "merged_shards": sum(s.bytes for s in merged.shards),
            "codec": codec_bytes,
            "retriever": steps["faiss"]["bytes"],
            "retriever_ivfpq": steps["faiss_pq"]["bytes"],
        },
        "bucket_files": steps["merge"]["bucket_files"],
        "total_s": round(sum(steps[step]["seconds"] for step in STEPS), 1),
        "steps": steps,
        "config": cfg,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=5000, help="synthetic passages to index")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, help="work folder, kept (default: a temporary folder, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path goes to stderr)")
    parser.add_argument("--shard-size", type=int, default=0, help="passages per shard (default: the flow's, from the count)")
    parser.add_argument("--workers", type=int, default=0,
                        help="run the retriever builds, merge and verify as tasks on a loopback Ray of this many CPUs (0: one process)")
    parser.add_argument("--words", type=int, default=100, help="words per passage (DPR's Wikipedia passages: 100)")
    parser.add_argument("--max-tokens", type=int, default=320, help="passage token limit (the flow's default)")
    parser.add_argument("--codec-sample", type=int, default=2000, help="passages the codec is fitted on (the flow's)")
    parser.add_argument("--offline-ratio", type=float, default=0.2, help="r_o of the offline merge")
    parser.add_argument("--fetch", type=int, default=40, help="passages per timed fetch (a query's worth)")
    parser.add_argument("--draws", type=int, default=200, help="timed fetches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # a child process runs one step
    args = parser.parse_args(argv)
    if args.step:
        return _child(args.step, args.out)
    if args.passages < 1:
        parser.error("--passages must be positive")
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty: give a new folder")
    names = ("passages", "workers", "words", "max_tokens", "codec_sample", "offline_ratio", "fetch", "draws", "seed")
    cfg = {name: getattr(args, name) for name in names} | {"shard_size": args.shard_size or default_shard_size(args.passages)}
    out = args.out or Path(tempfile.mkdtemp(prefix="btr-scale-"))
    try:
        result = measure(cfg, out)
    finally:
        if args.out is None and not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        elif args.out is None:
            print(f"kept {out}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
        return 0 if result["verified"] else 1
    on = f"a loopback Ray of {args.workers} CPU(s)" if args.workers else "one process per step"
    print(f"{result['passages']:,} passages, {result['tokens']:,} tokens ({result['tokens_per_passage']} per passage), {on}")
    print(f"  write: {result['write_passages_per_s']:,} passages/s, {result['write_tokens_per_s']:,} tokens/s")
    disk, bits = result["disk_bytes_per_token"], result["bits_per_dim"]
    print(f"  on disk: {disk['lossless']} bytes/token lossless, {disk['merged']} merged "
          f"(bits/dim {bits['lossless']} / {bits['merged']})")
    for name, f in result["fetch_ms"].items():
        print(f"  fetch+decode {args.fetch} random passages, {name}: p50 {f['p50']} ms, p99 {f['p99']} ms")
    for name, f in result["faiss"].items():
        trained = f"trained in {f['train_s']} s (peak RSS {f['train_peak_rss_mb']} MB)" if f["train_s"] is not None else "no training"
        print(f"  {name}: {f['factory']}, {trained}, {f['bytes']:,} bytes")
    print(f"  verify: {result['verify_s']} s, {'intact' if result['verified'] else 'PROBLEMS'}; all steps {result['total_s']:,} s")
    print("  step: seconds / peak RSS MB / peak anonymous MB (largest process) / peak disk GB")
    for step in STEPS:
        figures = [result[key][step] for key in ("seconds", "peak_rss_mb", "peak_anon_mb")] + [result["peak_disk_bytes"][step] / 1e9]
        print(f"    {step:9s}" + "".join(f"{x:10.1f}" for x in figures))
    print(f"  merged index {result['digests']['merged'][:16]}, retrievers {result['digests']['retriever'][:16]} / "
          f"{result['digests']['retriever_ivfpq'][:16]}")
    return 0 if result["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
