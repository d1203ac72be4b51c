"""Reader speed, side by side: unsplit FiD vs split (no bits) vs BTR (bits + runtime merging).

    python -m bench.reader --json [--family fid|extractive] [--device auto|cpu|cuda[:N]] [--dtype auto] [--batch N]

fid (the default): a FiD reader with full t5-base shapes and random weights (speed does not depend
on them); extractive: the trained default reader (reader/checkpoint, or ``--checkpoint``) through the
query path's own model pass (``reader.model_pass.run_reader``; neither faiss nor an index is needed). Both take real passages from the bundled Wikipedia
sample, compute BTR's bits beforehand (the offline half), then time every mode in interleaved
rounds through the product's own code path, ``--batch`` questions per model pass, on ``--device``
(a GPU's work is waited for before each clock read). ``latency_ms``: p50 and p99 of one pass.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict

from reader.device import add_device_arguments


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags (no heavy import: ``--help`` answers at once)."""
    parser = argparse.ArgumentParser(prog="python -m bench.reader", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object (default: off, a summary)")
    parser.add_argument("--family", choices=("fid", "extractive"), default="fid",
                        help="fid: random T5 of --shape; extractive: the trained default reader (default: %(default)s)")
    parser.add_argument("--shape", default="t5-base",
                        help="a T5 shape of reader.t5_shapes, for fid (default: %(default)s)")
    parser.add_argument("--checkpoint", help="extractive: a checkpoint of the same shape (default: the trained reader)")
    parser.add_argument("--split-layer", type=int, default=None, help="k (default: 3/4 of the layers, 9 of 12)")
    parser.add_argument("--queries", type=int, default=5,
                        help="questions timed per round, each over its own --passages (default: %(default)s)")
    parser.add_argument("--passages", type=int, default=10, help="passages per query (default: %(default)s)")
    parser.add_argument("--passage-tokens", type=int, default=200,
                        help="passage length limit, in tokens (default: %(default)s)")
    parser.add_argument("--answer-tokens", type=int, default=5,
                        help="greedy decoding steps per query, fid (default: %(default)s)")
    parser.add_argument("--encoder-merge", type=float, default=0.2,
                        help="r_p, intra-passage merge ratio, fid (default: %(default)s)")
    parser.add_argument("--decoder-merge", type=float, default=0.2,
                        help="cross-passage merge ratio, fid (default: %(default)s)")
    parser.add_argument("--decoder-skip", type=int, default=3,
                        help="g: every g-th decoder layer skips merging, fid (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1,
                        help="questions per model pass; 1: one at a time (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds over every mode; the median counts (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (default: this machine's CPUs, %(default)s)")
    add_device_arguments(parser)
    return parser


if __name__ == "__main__":  # --help and a bad flag answer before torch and transformers load (seconds)
    build_parser().parse_args()

import numpy as np
import torch
from transformers import AutoTokenizer

from reader.assets import minilm_path, wikipedia_sample
from reader.config import NO_MERGE, BTRConfig, RuntimeMerge
from reader.device import resolve
from reader.fid import FiDReader
from reader.load import ReaderSpec, load_reader
from reader.model_pass import run_reader
from reader.t5_shapes import SHAPES, random_t5
from storage.record import Passage


def sample_passages(count: int, min_words: int) -> list[Passage]:
    """The first ``count`` articles of the bundled sample with at least ``min_words`` words."""
    picked = wikipedia_sample(count, min_words)
    if len(picked) < count:
        raise SystemExit(f"the sample has only {len(picked)} articles of {min_words}+ words; asked for {count}")
    return picked


def build_reader(shape: str, split_layer: int | None, passage_tokens: int, merge: RuntimeMerge) -> FiDReader:
    """A FiD reader with the given T5 shape, random weights, and the bundled WordPiece tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    btr = BTRConfig(split_layer=split_layer, max_passage_tokens=passage_tokens, merge=merge)
    return FiDReader(random_t5(shape, tokenizer).eval(), tokenizer, btr)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it counts it (a GPU runs ahead of Python)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_query(
    reader: FiDReader, questions: list[str], passages: list[list], mode: str, merge: RuntimeMerge, answer_tokens: int
) -> tuple[float, float]:
    """Seconds to encode, then to decode ``answer_tokens`` greedy tokens, for one pass over ``questions``."""
    with torch.inference_mode():
        start = time.perf_counter()
        memory = reader.encode(questions, passages, mode, merge)
        synchronize(reader.device)
        encoded = time.perf_counter()
        reader.generate(memory, merge, max_new_tokens=answer_tokens, stop_at_eos=False)
        synchronize(reader.device)
        done = time.perf_counter()
    return encoded - start, done - encoded


def time_read(reader, questions: list[str], passages: list[list], mode: str) -> tuple[float, float]:
    """Seconds for one pass of the extractive query path's model function (decode to extract), as (encode, 0)."""
    scores = [[1.0 - 0.01 * rank for rank in range(len(group))] for group in passages]  # the retriever's, best first
    start = time.perf_counter()
    run_reader(reader, questions, passages, scores, mode, {})
    synchronize(reader.device)
    return time.perf_counter() - start, 0.0


def memory_tokens(reader: FiDReader, question: str, passages: list, mode: str, merge: RuntimeMerge) -> dict[str, int]:
    """Tokens the decoder reads: real tokens in, memory rows at the first and last decoder layer."""
    with torch.inference_mode():
        memory = reader.encode([question], [passages], mode, merge)
        layers = reader.decoder_memories(memory, merge)
    real = lambda t: int((t.size > 0).sum())  # noqa: E731
    return {"input": int(memory.size.sum()), "first_layer": real(layers[0]), "last_layer": real(layers[-1])}


def run(args: argparse.Namespace) -> dict:
    """Build, precompute bits, time the modes side by side; return the figures."""
    torch.set_num_threads(args.threads)
    device, dtype = resolve(args.device, args.dtype)
    merge = RuntimeMerge(args.encoder_merge, args.decoder_merge, args.decoder_skip)
    fid = args.family == "fid"
    if fid:
        reader = build_reader(args.shape, args.split_layer, args.passage_tokens, merge)
    else:
        spec = ReaderSpec(checkpoint=args.checkpoint, split_layer=args.split_layer, max_passage_tokens=args.passage_tokens)
        reader = load_reader(spec)
    reader = reader.to(device=device, dtype=dtype)
    passages = sample_passages(args.queries * args.passages, min_words=int(args.passage_tokens * 0.8))
    groups = [passages[i * args.passages : (i + 1) * args.passages] for i in range(args.queries)]
    questions = [f"what is {group[0].title} known for?" for group in groups]

    start = time.perf_counter()
    stored = [reader.encode_passages(group) for group in groups]
    offline_s = time.perf_counter() - start
    # name -> (mode, runtime merging, passages); btr_unmerged separates the bits' gain from merging's.
    variants = {
        "baseline": ("baseline", NO_MERGE, groups),
        "split": ("split", NO_MERGE, groups),
        "btr_unmerged": ("btr", NO_MERGE, stored),
        "btr": ("btr", merge, stored),
    }
    if not fid:  # an extractive reader merges no tokens at run time: btr is btr_unmerged
        del variants["btr_unmerged"]

    def one_pass(start: int, mode: str, run_merge: RuntimeMerge, inputs: list) -> tuple[float, float]:
        chunk = slice(start, start + args.batch)
        if fid:
            return time_query(reader, questions[chunk], inputs[chunk], mode, run_merge, args.answer_tokens)
        return time_read(reader, questions[chunk], inputs[chunk], mode)

    for mode, run_merge, inputs in variants.values():  # warm-up: allocator, thread pools, kernels
        one_pass(0, mode, run_merge, inputs)
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    stages: dict[str, dict[str, list[float]]] = {name: {"encode": [], "decode": []} for name in variants}
    for _ in range(args.rounds):
        for name, (mode, run_merge, inputs) in variants.items():  # interleaved: noise hits all alike
            total = 0.0
            for first in range(0, args.queries, args.batch):
                enc, dec = one_pass(first, mode, run_merge, inputs)
                stages[name]["encode"].append(enc)
                stages[name]["decode"].append(dec)
                total += enc + dec
            rounds[name].append(total)

    qps = {name: args.queries / statistics.median(rounds[name]) for name in variants}
    passes = {name: np.add(stages[name]["encode"], stages[name]["decode"]) for name in variants}
    result = {
        **{f"{name}_qps": round(value, 3) for name, value in qps.items()},
        "speedup": round(qps["btr"] / qps["baseline"], 2),
        "split_speedup": round(qps["split"] / qps["baseline"], 2),
        "stage_ms_per_query": {  # per pass: a batch's questions share it
            name: {s: round(1000 * statistics.median(v), 1) for s, v in stages[name].items()} for name in variants
        },
        "latency_ms": {  # one pass (a question waits for its whole batch)
            name: {"p50": round(1000 * float(np.percentile(v, 50)), 1), "p99": round(1000 * float(np.percentile(v, 99)), 1)}
            for name, v in passes.items()
        },
        "offline_bits_s": round(offline_s, 2),
        "stored_bytes_per_token": reader.hidden_size // 8 + 2 + 4,  # bits + fp16 scale + int32 id
        "config": {
            "family": args.family,
            **({"shape": args.shape, **SHAPES[args.shape]} if fid else {"checkpoint": args.checkpoint or "reader/checkpoint"}),
            "split_layer": reader.split_layer,
            "queries": args.queries,
            "passages_per_query": args.passages,
            "passage_tokens": args.passage_tokens,
            "mean_passage_tokens": round(statistics.mean(len(r) for g in stored for r in g), 1),
            "batch": args.batch,
            "rounds": args.rounds,
            "threads": args.threads,
            "device": str(reader.device),
            "dtype": str(reader.dtype).removeprefix("torch."),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
        },
    }
    if fid:
        result["unmerged_speedup"] = round(qps["btr_unmerged"] / qps["baseline"], 2)
        result["decoder_memory_tokens"] = {
            name: memory_tokens(reader, questions[0], inputs[0], mode, run_merge)
            for name, (mode, run_merge, inputs) in variants.items()
        }
        result["config"] |= {"answer_tokens": args.answer_tokens, "merge": asdict(merge)}
    return result


def main(argv: list[str] | None = None) -> int | None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.family == "fid" and args.shape not in SHAPES:
        parser.error(f"--shape {args.shape}: expected one of {', '.join(sorted(SHAPES))}")
    layers = SHAPES[args.shape]["num_layers"] if args.family == "fid" else None
    if args.split_layer is not None and layers is not None and not 0 <= args.split_layer <= layers:
        parser.error(f"--split-layer {args.split_layer} exceeds the {args.shape} encoder's layers")
    if args.batch < 1 or args.batch > args.queries:
        parser.error(f"--batch must be from 1 to --queries ({args.queries}), got {args.batch}")
    try:
        result = run(args)
    except ValueError as error:  # reader.device.DeviceUnavailable among them: one line, exit 2
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return
    what = f"{args.shape} shapes" if args.family == "fid" else "the default extractive reader"
    print(f"{args.queries} queries x {args.passages} passages of <= {args.passage_tokens} tokens, {what}, "
          f"batch {args.batch}, {result['config']['device']} {result['config']['dtype']}")
    for name, stage in result["stage_ms_per_query"].items():
        latency = result["latency_ms"][name]
        stages = f"encode {stage['encode']:7.1f} ms   decode {stage['decode']:7.1f} ms   " if args.family == "fid" else ""
        print(f"  {name:12s} {result[name + '_qps']:7.2f} q/s   {stages}pass p50 {latency['p50']:7.1f} ms  p99 {latency['p99']:7.1f} ms")
    print(f"  speedup over baseline: btr {result['speedup']}x, split {result['split_speedup']}x"
          + (f", btr without merging {result['unmerged_speedup']}x" if "unmerged_speedup" in result else ""))


if __name__ == "__main__":
    sys.exit(main())
