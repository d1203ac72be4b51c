"""BTR-FiD trained from scratch on the synthetic task: EM of plain / split / btr, and runtime merging.

    python -m flows.fid_synthetic [--out checkpoints/fid-synthetic] [--shape tiny] [--warm-up passage:5000]
                                  [--steps 2500] [--split-steps 1500] [--bits-steps 2000] [--batch-size 32]
                                  [--optimizer adamw] [--threads 1] [--results results/fid-synthetic.json]

Generates the task (``flows.synthetic_qa``, open values and fresh facts unless told otherwise) into ``--data``
(again when its ``task.json`` differs), saves a randomly initialised T5 (``reader.t5_shapes`` shape
"tiny": d = 64, 4 encoder and 4 decoder layers, k = 2; "small": d = 256, 4 + 3 layers, k = 2 (``--split-layer``);
"t5-base": k = 9 of 12) as the base, teaches it to choose the asked relation's value with a curriculum
of one-passage lessons (``--warm-up``: by default the asked person's passage alone; the answer's
sentence alone, which teaches only the copy, is another lesson), trains
plain -> split -> bits through ``reader.train_chain``, the stages of ``flows.train_reader --family fid``
without Prefect (resumable: a rerun reuses finished lessons and stages, so it only evaluates), then
answers the dev questions from their given passages with each reader, one question at a time,
every variant on the same question before the next (side by side: load on the machine hits all
alike): plain (unsplit), split, btr (bits computed offline, as an index stores them), and btr with
runtime intra-passage (encoder) and cross-passage (decoder, every 3rd layer skipped) merging at each
``--ratios`` (at the paper's 0.2 and 0.5 also each side alone). EM and QPS per variant, the paired bootstrap interval
of btr's EM over plain's, and the largest ratio that keeps >= 98% of btr's EM.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoTokenizer

from flows.synthetic_qa import LESSONS, generate, lesson
from reader.assets import minilm_path
from reader.t5_shapes import SHAPES, random_t5
from reader.config import NO_MERGE, RuntimeMerge
from reader.inputs import Passage
from reader.load import ReaderSpec, load_reader, quiet_library_logs
from reader.normalize import exact_match, paired_ratio_interval
from reader.train import SCHEDULES, Stage, chain
from reader.train_chain import fit_to_budget, step_seconds, train_chain

PASSAGE_TOKENS = 64
SPLIT_LAYERS = {"tiny": 2, "small": 2, "t5-base": 9}  # k: 2 of 4 encoder layers (tiny, small; docs/fid.md); the paper's 9 of 12 for t5-base
RATIOS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
PAPER_RATIOS = (0.2, 0.5)  # the paper's runtime ratios (0.2 its default); also measured one side at a time
WARM_UP = "passage:5000"  # the curriculum before the plain stage: lesson:steps, easiest first (docs/fid.md, sixth session)


def save_base(folder: Path, shape: str = "tiny", tokenizer_path: str | None = None) -> str:
    """A randomly initialised T5 of ``shape`` (no dropout: the task is learned from scratch) with the bundled tokenizer."""
    if not (folder / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or minilm_path(), local_files_only=True)
        random_t5(shape, tokenizer, dropout_rate=0.0).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def questions_needed(steps: int, batch_size: int) -> int:
    """Fresh-fact training questions for the plain stage to draw each one once (at least 100,000, which the
    default lesson draws 1.6 times): drawn many times, a question can be remembered, and the loss falls
    below chance on training questions alone."""
    return max(100_000, steps * batch_size)


def warm_up(spec: str) -> list[tuple[str, int]]:
    """``--warm-up`` "lesson:steps,..." (``flows.synthetic_qa.LESSONS``) as [(lesson, steps)]; "none": []."""
    if spec in ("", "none"):
        return []
    lessons = []
    for item in spec.split(","):
        name, _, steps = item.partition(":")
        if name not in LESSONS or not steps.isdigit() or int(steps) < 1:
            raise argparse.ArgumentTypeError(f"{spec!r}: expected lesson:steps items with a lesson of {', '.join(LESSONS)}")
        lessons.append((name, int(steps)))
    return lessons


def train_lessons(lessons: list[tuple[str, int]], stage: Stage, base: str, data: Path, out: Path, split_layer: int) -> str:
    """The curriculum: one plain stage per lesson on its one-passage questions (written next to
    train.jsonl once per task), each from the one before; the checkpoint the three stages start from."""
    source = data / "train.jsonl"
    for name, steps in lessons:
        train = data / f"train-{name}.jsonl"
        if not train.exists() or train.stat().st_mtime_ns < source.stat().st_mtime_ns:  # missing, or the task was regenerated
            records = (json.loads(line) for line in source.read_text().splitlines())
            train.write_text("".join(json.dumps(lesson(r, name)) + "\n" for r in records))
        base = train_chain([replace(stage, steps=steps)], base, str(train), str(out / f"lesson-{name}"), 1, PASSAGE_TOKENS,
                           split_layer, family="fid")
    return base


def variants(out: Path, ratios: tuple[float, ...]) -> dict[str, tuple[str, str, RuntimeMerge]]:
    """name -> (stage folder, mode, runtime merging)."""
    chosen = {
        "plain": ("plain", "baseline", NO_MERGE),
        "split": ("plain+split", "split", NO_MERGE),
        "btr": ("plain+split+bits", "btr", NO_MERGE),
    }
    for ratio in ratios:
        chosen[f"btr_merge_{ratio}"] = ("plain+split+bits", "btr", RuntimeMerge(ratio, ratio, 3))
    for ratio in sorted(set(ratios) & set(PAPER_RATIOS)):  # which side costs the accuracy: one at a time
        chosen[f"btr_encoder_merge_{ratio}"] = ("plain+split+bits", "btr", RuntimeMerge(ratio, 0.0, 3))
        chosen[f"btr_decoder_merge_{ratio}"] = ("plain+split+bits", "btr", RuntimeMerge(0.0, ratio, 3))
    return {name: (str(out / folder), mode, merge) for name, (folder, mode, merge) in chosen.items()}


def evaluate(out: Path, dev: Path, limit: int, ratios: tuple[float, ...]) -> dict:
    """EM and QPS of every variant over the first ``limit`` dev questions, side by side."""
    records = [json.loads(line) for line in dev.read_text().splitlines()][:limit]
    chosen = variants(out, ratios)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    readers = {
        folder: load_reader(ReaderSpec("fid", folder, max_passage_tokens=PASSAGE_TOKENS)).to(device)
        for folder, _, _ in chosen.values()
    }
    groups = [[Passage(p["title"], p["text"], p["id"]) for p in r["passages"]] for r in records]
    bits_reader = readers[chosen["btr"][0]]
    stored = [bits_reader.encode_passages(group) for group in groups]  # the offline half, untimed
    seconds = {name: 0.0 for name in chosen}
    exact = {name: [] for name in chosen}
    for number, record in enumerate(records):
        for name, (folder, mode, merge) in chosen.items():
            passages = stored[number] if mode == "btr" else groups[number]
            start = time.perf_counter()
            [answer] = readers[folder].answer([record["question"]], [passages], mode, max_new_tokens=8, merge=merge)
            seconds[name] += time.perf_counter() - start
            exact[name].append("1" if exact_match(answer, record["answers"]) else "0")
    rows = {}
    for name, (folder, mode, merge) in chosen.items():
        outcomes = "".join(exact[name])
        rows[name] = {
            "checkpoint": Path(folder).name, "mode": mode, "encoder_ratio": merge.encoder_ratio,
            "decoder_ratio": merge.decoder_ratio, "em": round(100 * outcomes.count("1") / len(outcomes), 2),
            "qps": round(len(records) / seconds[name], 2), "exact": outcomes,
        }
    for row in rows.values():
        row["speedup"] = round(row["qps"] / rows["plain"]["qps"], 2)
    low, high = paired_ratio_interval(rows["btr"]["exact"], rows["plain"]["exact"])
    kept = [r for r in ratios if rows[f"btr_merge_{r}"]["em"] >= 0.98 * rows["btr"]["em"]]
    return {
        "questions": len(records),
        "rows": rows,
        "btr_over_plain_em_percent": round(100 * rows["btr"]["em"] / max(rows["plain"]["em"], 1e-9), 1),
        "btr_over_plain_interval_95": [round(low, 1), round(high, 1)],
        "largest_ratio_keeping_98_percent_of_btr": max(kept) if kept else None,
    }


def run(args: argparse.Namespace) -> dict:
    """Generate, train (or reuse) the three stages, evaluate; the figures."""
    torch.set_num_threads(args.threads)
    quiet_library_logs()
    data = Path(args.data)
    if args.train_questions is None:
        args.train_questions = questions_needed(args.steps, args.batch_size)
    task = {"people": args.people, "passages_per_question": args.passages, "values": args.values,
            "train_questions": args.train_questions}
    made = json.loads((data / "task.json").read_text()) if (data / "task.json").exists() else {}
    if {key: made.get(key) for key in task} != task:  # missing, or another task
        print(json.dumps(generate(data, args.people, args.passages, values=args.values, train_questions=args.train_questions,
                                  tokenizer=args.tokenizer)), flush=True)
    out = Path(args.out)
    began = time.perf_counter()
    learning_rate = args.learning_rate or {"adafactor": 1e-2, "adamw": 1e-3}[args.optimizer]
    stages = chain(
        learning_rate=learning_rate, steps=args.steps, split_steps=args.split_steps, bits_steps=args.bits_steps,
        batch_size=args.batch_size, max_positives=1, optimizer=args.optimizer, schedule=args.schedule,
    )
    base, factor = args.base or save_base(out / "base", args.shape, args.tokenizer), 1.0
    split_layer = SPLIT_LAYERS[args.shape] if args.split_layer is None else args.split_layer  # k = 0 is a valid split
    if args.budget_s:  # a lent GPU's minutes: every stage's steps scaled by one factor to fit
        seconds = step_seconds(base, str(data / "train.jsonl"), args.passages, PASSAGE_TOKENS, split_layer,
                               args.batch_size, family="fid")
        stages, _, factor = fit_to_budget(stages, seconds, args.budget_s)
        print(f"{seconds:.4f} s per plain step: steps {[s.steps for s in stages]} (x{factor:.3f}) to fit {args.budget_s} s", flush=True)
    # not scaled to a budget: a lesson cut short teaches nothing (copying appears after 250-400 steps), and one-passage steps are cheap
    base = train_lessons(args.warm_up, stages[0], base, data, out, split_layer)
    train_chain(stages, base, str(data / "train.jsonl"), str(out), args.passages, PASSAGE_TOKENS, split_layer, family="fid")
    trained = time.perf_counter() - began
    result = evaluate(out, data / "dev.jsonl", args.questions, tuple(args.ratios))
    result["config"] = {
        "shape": args.shape, **SHAPES[args.shape], "split_layer": split_layer, "max_passage_tokens": PASSAGE_TOKENS,
        "warm_up": dict(args.warm_up), "steps": [s.steps for s in stages], "steps_asked": [args.steps, args.split_steps, args.bits_steps],
        "budget_s": args.budget_s, "batch_size": args.batch_size,
        "learning_rate": learning_rate, "optimizer": args.optimizer, "schedule": args.schedule, "passages_per_question": args.passages, "people": args.people,
        "values": args.values, "train_questions": args.train_questions,
        "threads": args.threads, "train_seconds_this_run": round(trained), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    return result


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m flows.fid_synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/synthetic",
                        help="task folder, generated when missing or when its task.json differs (default: %(default)s)")
    parser.add_argument("--out", default="checkpoints/fid-synthetic",
                        help="stage checkpoints, and base/ (default: %(default)s)")
    parser.add_argument("--base", help="start from this FiD checkpoint (default: a random T5 of --shape in OUT/base)")
    parser.add_argument("--shape", choices=sorted(SPLIT_LAYERS), default="tiny",
                        help="the random T5's shape (reader.t5_shapes) (default: %(default)s)")
    parser.add_argument("--split-layer", type=int, help="k, the encoder layers run offline (default: the shape's, SPLIT_LAYERS)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the bundled all-MiniLM-L6-v2's)")
    parser.add_argument("--people", type=int, default=1600,
                        help="people in the generated task (flows.synthetic_qa) (default: %(default)s)")
    parser.add_argument("--passages", type=int, default=4, help="passages per question (default: %(default)s)")
    parser.add_argument("--values", choices=("open", "typed"), default="open",
                        help="the task's values (flows.synthetic_qa) (default: %(default)s)")
    parser.add_argument("--train-questions", type=int, help="fresh-fact training questions (default: --steps x --batch-size, "
                        "at least 100,000, so that the plain stage meets each once; 0: the fixed-fact task)")
    parser.add_argument("--warm-up", type=warm_up, default=WARM_UP, help="the curriculum before the plain stage, lesson:steps items "
                        f"(lessons: {', '.join(LESSONS)}; 'none' for none), each a plain stage on one-passage questions "
                        "(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=2500, help="plain stage steps (default: %(default)s)")
    parser.add_argument("--split-steps", type=int, default=1500, help="split stage steps (default: %(default)s)")
    parser.add_argument("--bits-steps", type=int, default=2000, help="bits stage steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="questions per step (default: %(default)s)")
    parser.add_argument("--optimizer", choices=("adafactor", "adamw"), default="adamw",
                        help="adamw (the tiny shape learns the task with it at 1e-3) or adafactor (T5's own; see "
                             "docs/fid.md) (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, help="peak rate (default: 1e-2 for adafactor, relative to each "
                        "weight's scale; 1e-3 for adamw)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="constant",
                        help="the rate after each stage's warm-up: constant (T5's own from scratch) or linear decay to 0 "
                             "(default: %(default)s)")
    parser.add_argument("--questions", type=int, default=480, help="dev questions evaluated (default: %(default)s)")
    parser.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=list(RATIOS),
                        help="comma-separated runtime merge ratios, each evaluated on btr "
                             f"(default: {','.join(map(str, RATIOS))})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--budget-s", type=float,
                        help="scale the stages' steps to train in about this many seconds "
                             "(default: none, the steps as asked)")
    parser.add_argument("--results", default="results/fid-synthetic.json", help="the results, JSON (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
    for name, row in result["rows"].items():
        print(f"{name:22s} EM {row['em']:6.2f}  {row['qps']:7.2f} q/s  ({row['speedup']}x)")
    print(f"btr / plain EM: {result['btr_over_plain_em_percent']}% (95% interval {result['btr_over_plain_interval_95']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
