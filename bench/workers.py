"""Indexing throughput: a worker's shard against its forwards, the host's side alone, today's code beside the old.

    python -m bench.workers --json [--passages 1000] [--out results/workers-cpu.json]
    python -m bench.workers --flat-memory --passages 100000 --json     # RSS shard by shard (tiny random models)

Same passages, same batches, one sitting, rounds alternated so that machine noise hits every row alike:

- bare forwards: layers 1..k, and the retriever's encoder, over batches tokenized beforehand;
- ``serial``: the worker as it was before ``workers.pipeline`` (each stage after the other in one thread, records
  at the codec's zstd level 19), kept here as the reference; ``pipelined``: the worker's real ``ShardIndexer.index``
  (tokenizer thread, device loop, coding pool, records at the staging level);
- each with only the bits (the old figure: ``efficiency`` = bits pipeline / bare lower layers), with the retriever
  too (``efficiency_both`` = worker / (lower layers + retriever)), and with both forwards replayed from recorded
  outputs: the host's side alone, what bounds a worker on a fast GPU;
- the host's side alone again with each passage tokenized for each model apart (``tokenized_once_speedup``: what
  tokenizing once for both, ``reader.inputs.PassagePieces``, gives);
- a breakdown: busy seconds per million tokens of each stage (the pipeline's stages overlap, so they add up to
  more than its wall time; the serial path's add up to it).

The serial worker binarizes and packs on the host (its device step is the forward alone); the pipelined one on
the device: each replay gives back what its own device step hands the host.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch

import storage.index
import workers.indexer
from reader import split as reader_split
from reader.encoder import passage_text
from reader.inputs import pad
from reader.load import ReaderSpec, load_reader, quiet_library_logs
from storage.shard import SHARDS
from workers.build import encode_corpus
from workers.corpus import normalize, read_rows
from workers.indexer import EMBEDDINGS, STAGING_LEVEL, ShardIndexer, ShardPlan
from workers.pipeline import Device, Replay, ShardPipeline, StageTimes
from workers.sizing import size_workers


class Stages:
    """Busy seconds per stage of a serial run, taken by wrapping the real code's calls (restored after)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, stage: str, call):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start
        return timed

    @contextmanager
    def patched(self, owner, name: str, stage: str):
        """``owner.name`` timed as ``stage`` while the block runs."""
        original = getattr(owner, name)
        setattr(owner, name, self.wrap(stage, original))
        try:
            yield
        finally:
            setattr(owner, name, original)


class Timed:
    """A callable object (tokenizer, model) whose calls are timed; everything else passes through."""

    def __init__(self, inner, stages: Stages, stage: str) -> None:
        self.inner, self.call = inner, stages.wrap(stage, inner)

    def __call__(self, *args, **kwargs):
        return self.call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def serial_shard(indexer: ShardIndexer, plan: ShardPlan, embed: bool = True) -> int:
    """The worker's shard before the pipeline: read, bits, retriever vectors, records, write, one after the other."""
    passages = read_rows(indexer.corpus, plan.first_row, plan.first_row + plan.rows)
    records = encode_corpus(indexer.reader, passages, indexer.batch_size)
    if embed:
        vectors = indexer.encoder.embed([passage_text(p) for p in passages])
        np.save(indexer.root / EMBEDDINGS / "serial.npy", vectors.astype(np.float16))
    rows = ((p.id, p.title, p.text, r) for p, r in zip(passages, records))
    return indexer.writer.write_shard(plan.shard_id, plan.first_row, rows).tokens


def serial_stages(indexer: ShardIndexer, stack: ExitStack, stages: Stages) -> None:
    """Time the serial path's stages by wrapping the calls it makes."""
    reader, encoder = indexer.reader, indexer.encoder
    for owner, name, stage in [
        (sys.modules[__name__], "read_rows", "read rows"), (reader, "lower", "device: lower layers"),
        (reader_split, "to_binary_batch", "binarize + pack (host)"), (encoder, "forward", "device: retriever"),
        (indexer.writer, "encode", "code records"), (storage.index, "write_shard", "write shard"),
    ]:
        stack.enter_context(stages.patched(owner, name, stage))
    reader.tokenizer = Timed(reader.tokenizer, stages, "tokenize")
    encoder.tokenizer = Timed(encoder.tokenizer, stages, "tokenize")
    stack.callback(setattr, reader, "tokenizer", reader.tokenizer.inner)
    stack.callback(setattr, encoder, "tokenizer", encoder.tokenizer.inner)


class Recorded:
    """A callable (the reader's lower layers, the retriever's model) that records its outputs, then gives them back in order."""

    def __init__(self, inner) -> None:
        self.inner, self.outputs, self.replaying = inner, [], None

    def __call__(self, *args, **kwargs):
        if self.replaying is not None:
            return next(self.replaying)
        self.outputs.append(self.inner(*args, **kwargs))
        return self.outputs[-1]

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def replay(self) -> None:
        self.replaying = iter(self.outputs)


def record_serial(indexer: ShardIndexer, plan: ShardPlan) -> tuple[Recorded, Recorded]:
    """The serial path's two forwards over ``plan``, recorded."""
    lower, model = Recorded(indexer.reader.lower), Recorded(indexer.encoder.model)
    with replaying_serial(indexer, lower, model):
        serial_shard(indexer, plan)
    return lower, model


@contextmanager
def replaying_serial(indexer: ShardIndexer, lower: Recorded, model: Recorded):
    """The serial path's forwards (layers 1..k, the retriever's model) are ``lower`` and ``model`` while the block runs."""
    reader, encoder = indexer.reader, indexer.encoder
    original = encoder.model
    reader.lower, encoder.model = lower, model
    try:
        yield
    finally:
        del reader.lower  # the class's method again
        encoder.model = original


def bare_forwards(indexer: ShardIndexer, passages: list, batch_size: int) -> tuple[float, float, int]:
    """Seconds of layers 1..k and of the retriever's forward over the workers' batches, tokenized beforehand; tokens."""
    reader, encoder = indexer.reader, indexer.encoder
    order = sorted(range(len(passages)), key=lambda i: len(passages[i].text))
    ids = [reader.passage_ids(passages[i]) for i in order]
    batches = [pad(ids[s : s + batch_size], reader.layout.pad_id) for s in range(0, len(ids), batch_size)]
    texts = [passage_text(p) for p in passages]
    embed_batches = [tokens for _, tokens in encoder.batches(texts)]
    with torch.no_grad():
        start = time.perf_counter()
        for batch, mask in batches:
            reader.lower(batch, mask)
        synchronize(reader.device)
        lower = time.perf_counter() - start
        start = time.perf_counter()
        for tokens in embed_batches:
            encoder.forward(tokens)
        synchronize(encoder.device)
    return lower, time.perf_counter() - start, sum(len(i) for i in ids)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # kernels run behind the Python loop; time their end


def clear(indexer: ShardIndexer) -> None:
    """Remove the shard and vectors a run wrote, so that the next one writes them again (not a resume)."""
    shutil.rmtree(indexer.root / SHARDS, ignore_errors=True)
    for path in (indexer.root / EMBEDDINGS).glob("*.npy"):
        path.unlink()


def pipelined(indexer: ShardIndexer, plan: ShardPlan, pipeline: ShardPipeline, device, encoder) -> tuple[int, dict]:
    """The worker's own ``index`` through ``pipeline``, with the given device step (real or replayed) and encoder (None: bits only)."""
    indexer.pipeline = pipeline
    pipeline.device, pipeline.encoder = device, encoder
    pipeline.times = StageTimes()
    stages = Stages()
    with stages.patched(workers.indexer, "read_rows", "read rows"), stages.patched(workers.indexer, "write_shard", "write shard"):
        summary = indexer.index(plan)
    return summary["tokens"], dict(pipeline.times.seconds) | dict(stages.seconds)


def measure(args, indexer: ShardIndexer, plan: ShardPlan, host: ShardPipeline, host_twice: ShardPipeline) -> dict:
    """Every row of the table, ``args.rounds`` times alternated; the best of each (tokens/s) and its stages.

    The forwards run through the worker's own pipeline (sized for this machine); the host's side alone through
    ``host``, sized as a GPU worker on this machine's cores would be: the host's side only matters beside a device;
    ``host_twice`` is the same with each passage tokenized for each model apart (``share_tokens=False``).
    """
    worker = indexer.pipeline
    passages = read_rows(indexer.corpus, 0, plan.rows)
    device = Device(indexer.reader, indexer.encoder)
    replay = Replay().record(device)
    pipelined(indexer, plan, host, replay, indexer.encoder)  # warm-up, and the pipelined replay's recording
    clear(indexer)
    recorded = record_serial(indexer, plan)
    clear(indexer)
    best: dict[str, tuple[float, dict]] = {}
    written: dict[str, float] = {}

    def keep(name: str, tokens: int, seconds: float, stages: dict | None = None) -> None:
        if name not in best or tokens / seconds > best[name][0]:
            best[name] = (tokens / seconds, {k: round(v / tokens * 1e6, 3) for k, v in (stages or {}).items()} | {"wall": round(seconds / tokens * 1e6, 3)})

    for _ in range(args.rounds):
        lower, embed, tokens = bare_forwards(indexer, passages, args.batch_size)
        keep("bare lower layers", tokens, lower)
        keep("bare retriever", tokens, embed)
        keep("bare both forwards", tokens, lower + embed)
        for name, encoder in (("bits only", None), ("worker", indexer.encoder)):
            clear(indexer)
            stages = Stages()
            with ExitStack() as stack:
                serial_stages(indexer, stack, stages)
                start = time.perf_counter()
                tokens = serial_shard(indexer, plan, embed=encoder is not None)
                keep(f"serial {name}", tokens, time.perf_counter() - start, stages.seconds)
            written[f"serial (zstd {indexer.writer.format.codec.settings.level})"] = shard_bytes_per_token(indexer)
            clear(indexer)
            start = time.perf_counter()
            tokens, seconds = pipelined(indexer, plan, worker, device, encoder)
            keep(f"pipelined {name}", tokens, time.perf_counter() - start, seconds)
            written[f"pipelined (zstd {worker.format.codec.settings.level})"] = shard_bytes_per_token(indexer)
        clear(indexer)
        stages = Stages()
        for forward in recorded:
            forward.replay()
        with ExitStack() as stack:
            stack.enter_context(replaying_serial(indexer, *recorded))
            serial_stages(indexer, stack, stages)
            start = time.perf_counter()
            tokens = serial_shard(indexer, plan)
            keep("serial host side (forwards replayed)", tokens, time.perf_counter() - start, stages.seconds)
        clear(indexer)
        start = time.perf_counter()
        tokens, seconds = pipelined(indexer, plan, host, replay.replay(), indexer.encoder)
        keep("pipelined host side (forwards replayed)", tokens, time.perf_counter() - start, seconds)
        clear(indexer)
        start = time.perf_counter()
        tokens, seconds = pipelined(indexer, plan, host_twice, replay.replay(), indexer.encoder)
        keep("pipelined host side, tokenized twice (forwards replayed)", tokens, time.perf_counter() - start, seconds)
    rate = {name: value[0] for name, value in best.items()}
    return {
        "tokens_per_s": {name: round(v, 1) for name, v in rate.items()},
        "seconds_per_million_tokens": {name: value[1] for name, value in best.items()},
        "efficiency": {  # the old definition: the bits' pipeline against the bare lower layers
            kind: round(rate[f"{kind} bits only"] / rate["bare lower layers"], 3) for kind in ("serial", "pipelined")
        },
        "efficiency_both": {  # a worker's shard against both of its forwards
            kind: round(rate[f"{kind} worker"] / rate["bare both forwards"], 3) for kind in ("serial", "pipelined")
        },
        "host_side_speedup": round(rate["pipelined host side (forwards replayed)"] / rate["serial host side (forwards replayed)"], 2),
        "tokenized_once_speedup": round(rate["pipelined host side (forwards replayed)"]
                                        / rate["pipelined host side, tokenized twice (forwards replayed)"], 2),
        "tokenized_once": host.pieces is not None,  # the two models' tokenizers allowed it
        "worker_speedup": round(rate["pipelined worker"] / rate["serial worker"], 3),
        "shard_bytes_per_token": written,  # the shard file (records + LMDB), at each path's zstd level
    }


def shard_bytes_per_token(indexer: ShardIndexer) -> float:
    """Bytes of the shard a run just wrote (its data file, as sealed) per token."""
    info = json.loads((indexer.root / SHARDS / "shard-00000" / "shard.json").read_text())
    return round(info["bytes"] / info["tokens"], 3)


def rss_mb() -> float:
    """This process's resident memory now, MB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def flat_memory(args, work: Path, threads: int) -> dict:
    """RSS after each shard of ``args.passages`` passages (the sample, repeated under new ids), tiny random reader and encoder."""
    from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

    from reader.assets import minilm_path, wikipedia_sample
    from reader.config import BTRConfig
    from reader.extractive import ExtractiveReader

    sample = wikipedia_sample(None)
    with open(work / "corpus.jsonl", "w") as f:
        for i in range(args.passages):
            p = sample[i % len(sample)]
            f.write(json.dumps({"id": f"p{i}", "title": p.title, "text": p.text}) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    torch.manual_seed(0)
    bert = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2)
    tiny = ExtractiveReader(BertForQuestionAnswering(bert).eval(), tokenizer, BTRConfig(split_layer=1, max_passage_tokens=320))
    tiny.model.save_pretrained(work / "reader")
    tokenizer.save_pretrained(work / "reader")
    corpus = normalize(str(work / "corpus.jsonl"), "jsonl", work / "normalized")
    spec = ReaderSpec("extractive", str(work / "reader"), 1, 320)
    root = work / "index"
    workers.indexer.calibrate_codec(root, Path(corpus.path), load_reader(spec), 2000)
    indexer = ShardIndexer(str(root), corpus.path, spec, str(work / "reader"), args.batch_size, threads, STAGING_LEVEL)
    rss, start = [], time.perf_counter()
    for plan in workers.indexer.plan_shards(corpus.passages, args.shard_size):
        indexer.index(plan)
        rss.append(round(rss_mb(), 1))
    shards = len(rss)
    return {
        "passages": corpus.passages, "shards": shards, "seconds": round(time.perf_counter() - start, 1),
        "rss_mb_after_shard": {str(i + 1): rss[i] for i in range(shards) if i in (0, 1, 9, 49) or i == shards - 1},
        "rss_growth_shard_2_to_last": round(rss[-1] / rss[min(1, shards - 1)] - 1, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true",
                        help="print the result as one JSON line (default: off, indented JSON)")
    parser.add_argument("--out", help="also write the result to this JSON file (default: not written)")
    parser.add_argument("--passages", type=int, default=1000, help="passages in the shard (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="lower-layer batch, the flow's (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternated rounds; the best of each row is kept (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="CPUs the worker takes (default: all; workers.actor.size_workers)")
    parser.add_argument("--corpus", help="a corpus file (default: the bundled sample)")
    parser.add_argument("--format", default="sample",
                        help="how --corpus is read (workers.corpus): sample, jsonl, dpr, parquet, wikixml "
                             "(default: %(default)s)")
    parser.add_argument("--checkpoint", help="reader checkpoint (default: the bundled reader); only its shape matters here")
    parser.add_argument("--retriever", help="passage encoder (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--split-layer", type=int,
                        help="k, for a checkpoint without btr.json (default: the checkpoint's own)")
    parser.add_argument("--flat-memory", action="store_true",
                        help="measure RSS shard by shard over --passages instead, with tiny random models (default: off)")
    parser.add_argument("--shard-size", type=int, default=1000,
                        help="passages per shard for --flat-memory (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_library_logs()

    sizing = size_workers(os.cpu_count() or 1, torch.cuda.device_count(), 1, args.threads)
    as_gpu_worker = size_workers(os.cpu_count() or 1, 1, 1, args.threads)  # the host's side of a worker beside a GPU
    torch.set_num_threads(sizing.torch_threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.flat_memory:
            result = flat_memory(args, work, as_gpu_worker.pool_threads)  # threaded: the queues are what could grow
        else:
            corpus = normalize(args.corpus, args.format, work / "corpus")
            spec = ReaderSpec(checkpoint=args.checkpoint, split_layer=args.split_layer)
            root = work / "index"
            workers.indexer.calibrate_codec(root, Path(corpus.path), load_reader(spec), 200)
            indexer = ShardIndexer(str(root), corpus.path, spec, args.retriever, args.batch_size, sizing.pool_threads, STAGING_LEVEL)
            host, host_twice = (ShardPipeline(indexer.reader, indexer.encoder, indexer.pipeline.format, args.batch_size,
                                              as_gpu_worker.pool_threads, share_tokens=share) for share in (True, False))
            result = measure(args, indexer, ShardPlan(0, 0, min(args.passages, corpus.passages)), host, host_twice)
            reader = indexer.reader
            result["config"] = {
                "reader": args.checkpoint or "all-MiniLM-L6-v2 extractive (the default)", "split_layer": reader.split_layer,
                "retriever": indexer.encoder.name,
                "passages": min(args.passages, corpus.passages), "batch_size": args.batch_size, "rounds": args.rounds,
                "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                "worker_coding_threads": sizing.pool_threads, "host_side_coding_threads": as_gpu_worker.pool_threads,
                "staging_level": STAGING_LEVEL, "serial_level": indexer.writer.format.codec.settings.level,
                "device": str(reader.device), "dtype": str(reader.dtype),
                "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
