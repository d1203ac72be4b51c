"""Reader speed, side by side: unsplit FiD vs split (no bits) vs BTR (bits + runtime merging).

    python -m bench.reader --json

Builds a FiD reader with full t5-base shapes and random weights (speed does not depend on them),
takes real passages from the bundled Wikipedia sample, computes BTR's bits beforehand (the offline
half), then times all three modes in interleaved rounds through the product's own code path.
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

import torch
from transformers import AutoTokenizer

from reader.assets import minilm_path, wikipedia_sample
from reader.config import NO_MERGE, BTRConfig, RuntimeMerge
from reader.fid import FiDReader
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


def time_query(
    reader: FiDReader, question: str, passages: list, mode: str, merge: RuntimeMerge, answer_tokens: int
) -> tuple[float, float]:
    """Seconds to encode, then to decode ``answer_tokens`` greedy tokens, for one question."""
    with torch.inference_mode():
        start = time.perf_counter()
        memory = reader.encode([question], [passages], mode, merge)
        encoded = time.perf_counter()
        reader.generate(memory, merge, max_new_tokens=answer_tokens, stop_at_eos=False)
        done = time.perf_counter()
    return encoded - start, done - encoded


def memory_tokens(reader: FiDReader, question: str, passages: list, mode: str, merge: RuntimeMerge) -> dict[str, int]:
    """Tokens the decoder reads: real tokens in, memory rows at the first and last decoder layer."""
    with torch.inference_mode():
        memory = reader.encode([question], [passages], mode, merge)
        layers = reader.decoder_memories(memory, merge)
    real = lambda t: int((t.size > 0).sum())  # noqa: E731
    return {"input": int(memory.size.sum()), "first_layer": real(layers[0]), "last_layer": real(layers[-1])}


def run(args: argparse.Namespace) -> dict:
    """Build, precompute bits, time the three modes side by side; return the figures."""
    torch.set_num_threads(args.threads)
    merge = RuntimeMerge(args.encoder_merge, args.decoder_merge, args.decoder_skip)
    reader = build_reader(args.shape, args.split_layer, args.passage_tokens, merge)
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

    for mode, run_merge, inputs in variants.values():  # warm-up: allocator, thread pools
        time_query(reader, questions[0], inputs[0], mode, run_merge, args.answer_tokens)
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    stages: dict[str, dict[str, list[float]]] = {name: {"encode": [], "decode": []} for name in variants}
    for _ in range(args.rounds):
        for name, (mode, run_merge, inputs) in variants.items():  # interleaved: noise hits all alike
            total = 0.0
            for question, group in zip(questions, inputs):
                enc, dec = time_query(reader, question, group, mode, run_merge, args.answer_tokens)
                stages[name]["encode"].append(enc)
                stages[name]["decode"].append(dec)
                total += enc + dec
            rounds[name].append(total)

    qps = {name: args.queries / statistics.median(rounds[name]) for name in variants}
    return {
        **{f"{name}_qps": round(value, 3) for name, value in qps.items()},
        "speedup": round(qps["btr"] / qps["baseline"], 2),
        "split_speedup": round(qps["split"] / qps["baseline"], 2),
        "unmerged_speedup": round(qps["btr_unmerged"] / qps["baseline"], 2),
        "stage_ms_per_query": {
            name: {s: round(1000 * statistics.median(v), 1) for s, v in stages[name].items()} for name in variants
        },
        "decoder_memory_tokens": {
            name: memory_tokens(reader, questions[0], inputs[0], mode, run_merge)
            for name, (mode, run_merge, inputs) in variants.items()
        },
        "offline_bits_s": round(offline_s, 2),
        "stored_bytes_per_token": reader.hidden_size // 8 + 2 + 4,  # bits + fp16 scale + int32 id
        "config": {
            "shape": args.shape,
            **SHAPES[args.shape],
            "split_layer": reader.split_layer,
            "queries": args.queries,
            "passages_per_query": args.passages,
            "passage_tokens": args.passage_tokens,
            "mean_passage_tokens": round(statistics.mean(len(r) for g in stored for r in g), 1),
            "answer_tokens": args.answer_tokens,
            "merge": asdict(merge),
            "rounds": args.rounds,
            "threads": args.threads,
            "device": str(reader.device),
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.reader", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="t5-base")
    parser.add_argument("--split-layer", type=int, default=None, help="k (default: 3/4 of the layers, 9 of 12)")
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--passages", type=int, default=10, help="passages per query")
    parser.add_argument("--passage-tokens", type=int, default=200, help="passage length limit")
    parser.add_argument("--answer-tokens", type=int, default=5, help="greedy decoding steps per query")
    parser.add_argument("--encoder-merge", type=float, default=0.2, help="r_p, intra-passage merge ratio")
    parser.add_argument("--decoder-merge", type=float, default=0.2, help="cross-passage merge ratio")
    parser.add_argument("--decoder-skip", type=int, default=3, help="g: every g-th decoder layer skips merging")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.split_layer is not None and not 0 <= args.split_layer <= SHAPES[args.shape]["num_layers"]:
        parser.error(f"--split-layer {args.split_layer} exceeds the {args.shape} encoder's layers")
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.queries} queries x {args.passages} passages of <= {args.passage_tokens} tokens, {args.shape} shapes")
    for name, stage in result["stage_ms_per_query"].items():
        print(f"  {name:12s} {result[name + '_qps']:7.2f} q/s   encode {stage['encode']:7.1f} ms   decode {stage['decode']:7.1f} ms")
    print(
        f"  speedup over baseline: btr {result['speedup']}x, btr without merging {result['unmerged_speedup']}x, "
        f"split {result['split_speedup']}x"
    )


if __name__ == "__main__":
    sys.exit(main())
