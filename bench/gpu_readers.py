"""Issue 25's GPU run: the extractive chain and its control from all-MiniLM-L6-v2, sized to a lent GPU's time.

    python -m bench.gpu_readers prepare [--index indexes/wikipedia-sample] [--out .gpu]    # here, on CPU
    python -m bench.gpu_readers run --data .gpu --out /tmp/extractive --budget-s 300 \\
        --results extractive.json [--export DIR]                                          # on the GPU

``prepare`` writes what the GPU machine lacks and the tree that travels can hold (64 MiB): the base
encoder in fp16, the training JSONL (xz), and each evaluation set with the top-5 passages the
sample's retriever returns and their scores (the retriever is the index's, not the reader's, so the
lookup is done here, once). The sets: NQ and TriviaQA held-out dev (chosen on), and the first 300
NQ-open and TriviaQA test questions whose answer is in the sample (reported, never chosen on).

``run`` times a few plain steps, scales the chain's steps by one factor so that it fits
``--budget-s`` (``reader.train_chain.fit_to_budget``), trains plain, then split -> bits in this
process and the control (plain continued unsplit, ``plain+plain``) in a second one beside it on the
same GPU, in bf16. It then reads every set with each reader (control and plain unsplit, split, btr
with the bits computed from the text: an index's bits before offline merging), scores the answer
rule's retrieval weights over the cached logits, chooses the weight on dev for each reader, and
reports test at that weight, with btr's EM over the control's on dev and its paired interval.
Imports neither Prefect nor faiss (the GPU image has neither).
"""

from __future__ import annotations

import argparse
import json
import lzma
import multiprocessing
import platform
import sys
import time
from pathlib import Path

import torch

from reader.answer_rule import question_logits, score
from reader.inputs import Passage
from reader.load import ReaderSpec, load_reader, quiet_library_logs
from reader.normalize import paired_ratio_interval
from reader.train import chain, save_checkpoint, stage_folder
from reader.train_chain import control_chain, export_chain, fit_to_budget, run_stage, step_seconds

DEV = ("nq-dev-heldout-in-sample", "trivia-dev-heldout-in-sample")
TEST = ("nq-test-in-sample", "trivia-test-in-sample")
WEIGHTS = (0.0, 20.0, 40.0, 80.0, 120.0, 200.0)  # the answer rule's retrieval weights scored
SPLIT_LAYER, PASSAGE_TOKENS, PER_QUESTION = 3, 128, 4  # as `make train`


def prepare(index: str, out: Path, data: Path, test_limit: int, k: int = 5) -> dict:
    """Base encoder (fp16), training data (xz) and the evaluation sets with retrieved passages, under ``out``."""
    from reader.assets import minilm_path
    from reader.evaluate import load_questions
    from reader.retriever import Retriever
    from storage.index import Index

    out.mkdir(parents=True, exist_ok=True)
    reader = load_reader(ReaderSpec("extractive", minilm_path(), SPLIT_LAYER))
    base = out / "base"
    save_checkpoint(reader, base, {"base": "all-MiniLM-L6-v2, stored in fp16 to travel"}, dtype=torch.float16)
    (base / "btr.json").unlink()  # a base encoder, not a trained reader: the stages set k themselves
    (out / "train.jsonl.xz").write_bytes(lzma.compress((data / "real-train.jsonl").read_bytes(), preset=9))
    retriever, stored = Retriever(index), Index.open(index)
    counts = {}
    with lzma.open(out / "eval.jsonl.xz", "wt") as f:
        for name in DEV + TEST:
            questions = load_questions(data / f"{name}.jsonl", test_limit if name in TEST else None)
            for start in range(0, len(questions), 64):
                chunk = questions[start : start + 64]
                for record, hits in zip(chunk, retriever.search([r["question"] for r in chunk], k)):
                    passages = [
                        {"id": s.pid, "title": s.title, "text": s.text, "score": h.score}
                        for s, h in zip(stored.fetch([h.row for h in hits]), hits)
                    ]
                    f.write(json.dumps({"set": name, "question": record["question"], "answers": record["answers"],
                                        "passages": passages}) + "\n")
            counts[name] = len(questions)
    return {"sets": counts, "index": index, "k": k}


def profile_steps(base: str, train_file: str, batch_size: int, split_layer: int, steps: int = 4) -> str:
    """Where a plain step's time goes on this device: torch.profiler over ``step_seconds``' timed steps."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    trace = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
    seconds = step_seconds(base, train_file, PER_QUESTION, PASSAGE_TOKENS, split_layer, batch_size, steps=steps,
                           around=lambda: trace)
    table = trace.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=25)
    return f"profile: {steps} plain steps at batch {batch_size}, {seconds:.3f} s a step (profiler on)\n{table}"


def _control(stages, control_steps, base, train, out, split_layer) -> None:
    """The control, in its own process beside the chain (the GPU has room for both)."""
    quiet_library_logs()
    torch.set_num_threads(4)
    run_stage(control_chain(stages, control_steps), 1, base, train, out, PER_QUESTION, None, PASSAGE_TOKENS,
              split_layer, log=lambda line: print(f"[control] {line}", flush=True))


def train(args: argparse.Namespace) -> dict:
    """Calibrate, fit to the budget, train the chain and the control side by side; the plan and timings."""
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_file = out / "train.jsonl"
    if not train_file.exists():
        train_file.write_bytes(lzma.decompress((data / "train.jsonl.xz").read_bytes()))
    base, began = str(data / "base"), time.perf_counter()
    wanted = chain(learning_rate=args.learning_rate, steps=args.steps, split_steps=args.split_steps, bits_steps=args.bits_steps,
                   batch_size=args.batch_size, span_distill=args.span_distill)
    stages, control_steps, factor, seconds = wanted, args.control_steps, 1.0, 0.0
    if args.budget_s:
        seconds = step_seconds(base, str(train_file), PER_QUESTION, PASSAGE_TOKENS, args.split_layer, args.batch_size)
        stages, control_steps, factor = fit_to_budget(wanted, seconds, args.budget_s, args.control_steps)
    if args.profile:
        print(profile_steps(base, str(train_file), args.batch_size, args.split_layer), flush=True)
    plan = {"seconds_per_plain_step": round(seconds, 4), "factor": round(factor, 3),
            "steps": {s.kind: s.steps for s in stages} | {"control": control_steps}, "batch_size": args.batch_size}
    print(f"plan: {plan}", flush=True)
    log = lambda line: print(line, flush=True)  # noqa: E731
    run_stage(stages, 0, base, str(train_file), str(out), PER_QUESTION, None, PASSAGE_TOKENS, args.split_layer, log=log)
    control = multiprocessing.get_context("spawn").Process(
        target=_control, args=(stages, control_steps, base, str(train_file), str(out), args.split_layer))
    control.start()
    last = None
    for position in (1, 2):
        last = run_stage(stages, position, base, str(train_file), str(out), PER_QUESTION, None, PASSAGE_TOKENS, None, log=log)
    control.join()
    if control.exitcode != 0:
        raise RuntimeError(f"the control's process failed (exit {control.exitcode})")
    if args.export:
        export_chain(str(out), stages, last, args.export, "data/qa/real-train.jsonl")
    plan["train_seconds"] = round(time.perf_counter() - began)
    plan["final_loss"] = {
        folder.name: json.loads((folder / "btr.json").read_text())["training"]["final_loss"]
        for folder in sorted(out.glob("plain*")) if (folder / "btr.json").exists()
    }
    plan["readers"] = chain_readers(stages)
    return plan


def chain_readers(stages=None) -> dict[str, tuple[str, str]]:
    """Each reader of a run: its stage folder (named by the chain, ablations included) and mode."""
    stages = stages or chain()
    folder = lambda i: stage_folder(Path(), stages, i).name  # noqa: E731
    return {"btr": (folder(2), "btr"), "control": ("plain+plain", "baseline"), "split": (folder(1), "split"),
            "plain": (folder(0), "baseline")}


def read_sets(data: Path, sets: tuple[str, ...], limit: int | None) -> list[dict]:
    """The evaluation records of ``sets`` (the first ``limit`` of each), with their retrieved passages."""
    records, seen = [], {}
    for line in lzma.open(data / "eval.jsonl.xz", "rt"):
        record = json.loads(line)
        seen[record["set"]] = seen.get(record["set"], 0) + 1
        if record["set"] in sets and (limit is None or seen[record["set"]] <= limit):
            records.append(record)
    return records


def evaluate_reader(name: str, out: Path, data: Path, sets: tuple[str, ...], limit: int | None, readers: dict | None = None) -> dict:
    """One reader (a stage of the run, or any checkpoint as FOLDER:MODE) on every record: the answer
    rule's weight chosen on dev, every set scored at it."""
    quiet_library_logs()
    readers = readers or chain_readers()
    folder, mode = readers[name] if name in readers else name.rsplit(":", 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reader = load_reader(ReaderSpec("extractive", str(out / folder) if name in readers else folder)).to(device)
    began, cached = time.perf_counter(), {}
    records = read_sets(data, sets, limit)
    for record in records:
        passages = [Passage(p["title"], p["text"], p["id"]) for p in record["passages"]]
        item = question_logits(reader, record, passages, [p["score"] for p in record["passages"]], mode)
        cached.setdefault(record["set"], []).append(item)
    points = {w: {s: score(reader, c, 0.0, w) for s, c in cached.items()} for w in WEIGHTS}
    chosen = max(WEIGHTS, key=lambda w: (sum(points[w][s]["em"] for s in DEV), -w))
    print(f"{name}: weight {chosen:g} " + "; ".join(f"{s} EM {r['em']}" for s, r in points[chosen].items()), flush=True)
    return {"checkpoint": folder, "mode": mode, "retrieval_weight": chosen,
            "questions_per_s": round(len(records) / (time.perf_counter() - began), 1),
            "sets": points[chosen], "dev_grid": {w: {s: points[w][s]["em"] for s in DEV} for w in WEIGHTS}}


def evaluate(
    out: Path, data: Path, limit: int | None = None, done=lambda rows: None, names: tuple[str, ...] = ("btr", "control", "split", "plain"),
    sets: tuple[str, ...] = DEV + TEST, jobs: int = 1, readers: dict | None = None,
) -> dict:
    """Every reader on every set (its first ``limit`` questions); the rule's weight chosen on dev per
    reader, test reported at it. ``jobs`` > 1: readers in that many processes at once (answering is
    one question at a time, bound by the host, so a GPU has room for several). ``done(rows)`` after
    each reader (partial results survive a time limit)."""
    rows = {}
    tasks = [(name, out, data, sets, limit, readers) for name in names]
    if jobs > 1:
        with multiprocessing.get_context("spawn").Pool(min(jobs, len(names))) as pool:
            for name, row in zip(names, pool.imap(_evaluate_task, tasks)):
                rows[name] = row
                done(rows)
    else:
        for task in tasks:
            rows[task[0]] = evaluate_reader(*task)
            done(rows)
    retention = {}
    for name in sets if {"btr", "control"} <= set(names) else ():
        btr, control = rows["btr"]["sets"][name], rows["control"]["sets"][name]
        low, high = paired_ratio_interval(btr["exact"], control["exact"])
        retention[name] = {"btr_over_control_percent": round(100 * btr["em"] / max(control["em"], 1e-9), 1),
                           "interval_95": [round(low, 1), round(high, 1)]}
    return {"readers": rows, "retention": retention}


def _evaluate_task(task: tuple) -> dict:
    torch.set_num_threads(2)
    return evaluate_reader(*task)


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_readers", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ready = commands.add_parser("prepare", help="here: base encoder, training data, retrieved evaluation sets")
    ready.add_argument("--index", default="indexes/wikipedia-sample",
                       help="the index whose retriever picks each question's passages (default: %(default)s)")
    ready.add_argument("--data", default="data/qa",
                       help="make data's folder: the question sets and real-train.jsonl (default: %(default)s)")
    ready.add_argument("--out", default=".gpu",
                       help="folder of what travels to the GPU machine: base encoder, training data, evaluation sets "
                            "(default: %(default)s)")
    ready.add_argument("--test-limit", type=int, default=300,
                       help="the first N questions of each test set (default: %(default)s)")
    again = commands.add_parser("evaluate", help="only evaluate: stages of --out, or any checkpoint as FOLDER:MODE")
    again.add_argument("--data", default=".gpu", help="prepare's folder (default: %(default)s)")
    again.add_argument("--out", default="checkpoints/gpu-extractive",
                       help="the run's stage checkpoints (default: %(default)s)")
    again.add_argument("--readers", default="btr,control,split,plain",
                       help="comma-separated readers evaluated, in this order: btr, control, split, plain (stages of "
                            "--out) or any checkpoint as FOLDER:MODE (default: %(default)s)")
    again.add_argument("--sets", choices=("all", "dev"), default="all",
                       help="all: dev and test; dev: dev only (default: %(default)s)")
    again.add_argument("--eval-limit", type=int, help="only the first N questions of each set (default: all)")
    again.add_argument("--jobs", type=int, default=1,
                       help="readers evaluated at once, each in its own process (default: %(default)s)")
    again.add_argument("--results", required=True, help="write the results here, JSON (required)")
    run = commands.add_parser("run", help="on the GPU: train chain + control within the budget, evaluate")
    run.add_argument("--data", default=".gpu", help="prepare's folder (default: %(default)s)")
    run.add_argument("--out", default="checkpoints/gpu-extractive",
                     help="folder of the stage checkpoints (default: %(default)s)")
    run.add_argument("--budget-s", type=float, default=300,
                     help="training seconds: the steps are scaled to fit; 0: the steps as asked (default: %(default)s)")
    run.add_argument("--learning-rate", type=float, help="every stage's peak rate (default: reader.train.LEARNING_RATES)")
    run.add_argument("--readers", default="btr,control,split,plain",
                     help="comma-separated readers evaluated, in this order: btr, control, split, plain (stages of "
                          "--out) or any checkpoint as FOLDER:MODE (default: %(default)s)")
    run.add_argument("--sets", choices=("all", "dev"), default="all",
                     help="all: dev and test; dev: dev only (default: %(default)s)")
    run.add_argument("--steps", type=int, default=8000,
                     help="plain stage steps wanted, 10x make train's 800 (default: %(default)s)")
    run.add_argument("--split-steps", type=int, default=10000, help="split stage steps wanted (default: %(default)s)")
    run.add_argument("--bits-steps", type=int, default=4000, help="bits stage steps wanted (default: %(default)s)")
    run.add_argument("--control-steps", type=int, default=14000,
                     help="control steps wanted, split + bits as make train (default: %(default)s)")
    run.add_argument("--batch-size", type=int, default=32, help="questions per step (default: %(default)s)")
    run.add_argument("--span-distill", type=float, default=0.0,
                     help="split stage: weight of the KL to plain's span distributions (default: %(default)s)")
    run.add_argument("--split-layer", type=int, default=SPLIT_LAYER,
                     help="k: the encoder layers run offline, of 6 (default: %(default)s)")
    run.add_argument("--profile", action="store_true",
                     help="print torch.profiler's table of a few plain steps first (default: off)")
    run.add_argument("--eval-limit", type=int, help="only the first N questions of each set, a smoke run (default: all)")
    run.add_argument("--jobs", type=int, default=4,
                     help="readers evaluated at once, each in its own process (default: %(default)s)")
    run.add_argument("--export",
                     help="write btr's checkpoint here in fp16, with the weight chosen on dev (default: no export)")
    run.add_argument("--results", default="results/gpu-extractive.json",
                     help="the results, JSON, rewritten as each reader ends (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_library_logs()
    if args.command == "prepare":
        print(json.dumps(prepare(args.index, Path(args.out), Path(args.data), args.test_limit)))
        return 0
    if args.command == "evaluate":
        result = evaluate(Path(args.out), Path(args.data), args.eval_limit, names=tuple(args.readers.split(",")),
                          sets=DEV + TEST if args.sets == "all" else DEV, jobs=args.jobs)
        Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
        return 0
    torch.set_num_threads(4)
    result = {"config": {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.machine(),
                        "torch": torch.__version__, "budget_s": args.budget_s, "split_layer": args.split_layer,
                        "max_passage_tokens": PASSAGE_TOKENS, "passages_per_question": PER_QUESTION}}
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    save = lambda: results.write_text(json.dumps(result, indent=1) + "\n")  # noqa: E731
    result["plan"] = train(args)
    save()
    result |= evaluate(Path(args.out), Path(args.data), args.eval_limit, lambda rows: (result.update(readers=rows), save()),
                       tuple(args.readers.split(",")), DEV + TEST if args.sets == "all" else DEV, args.jobs,
                       result["plan"]["readers"])
    if args.export:
        settings = json.loads((Path(args.export) / "btr.json").read_text())
        settings["answer"] = {"relevance_weight": 0.0, "retrieval_weight": result["readers"]["btr"]["retrieval_weight"]}
        (Path(args.export) / "btr.json").write_text(json.dumps(settings, indent=2) + "\n")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
