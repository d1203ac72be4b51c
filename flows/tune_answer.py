"""Choose the answer rule on held-out dev: how much passage relevance and the retriever's score weigh.

    python -m flows.tune_answer --index INDEX [--sets nq-dev-heldout-in-sample,trivia-dev-heldout-in-sample]
                                [--relevance 0,0.5,1,2] [--retrieval 0,5,10,20] [--k 5] [--write] [--out FILE]

Each span's score is start + end logit (normalized over all of a question's passages) plus
``relevance_weight`` x the log-softmax of the passage's relevance over the question's passages, plus
``retrieval_weight`` x the retriever's score of the passage. The reader runs once per question (btr
mode, over the index's bits); every grid point then re-scores the same logits, so the grid costs
little. EM, the cited passage's rank and the share of title answers are reported per point; with
``--write`` the best point (summed EM over the sets; ties go to the smaller weights) goes into the
btr.json of the index's reader checkpoint and of the training stages beside it, which ``reader.load``
applies. Only dev sets may be named:
test files are for reporting, never for choosing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from pathlib import Path

from reader.answer import DEFAULT_K, Answerer
from reader.evaluate import load_questions
from reader.load import DEFAULT_CHECKPOINT, SETTINGS_FILE, quiet_library_logs
from reader.answer_rule import question_logits, score

DEV_SETS = ("nq-dev-heldout-in-sample", "trivia-dev-heldout-in-sample")


def read_logits(answerer: Answerer, questions: list[dict], k: int) -> list[dict]:
    """Per question, what re-scoring needs (``reader.answer_rule.question_logits``), over the index's bits."""
    cached = []
    for record in questions:
        lookup = answerer.lookup(record["question"], k)
        stored = answerer.index.decode(lookup.raw, [h.row for h in lookup.hits])
        scores = [h.score for h in lookup.hits]
        cached.append(question_logits(answerer.reader, record, stored, scores, "btr", [s.tokens for s in stored]))
    return cached


# A train-reader stage folder: plain, plain+split, plain+split-nodistill+bits, plain+plain, ...
_STAGE_FOLDER = re.compile(r"^(plain|split|bits)(-\w+)?(\+(plain|split|bits)(-\w+)?)*$")


def write_rule(folder: Path, rule: dict) -> list[Path]:
    """Put the answer rule in ``folder``'s btr.json and, when ``folder`` is a train-reader stage, in those
    of the stages beside it (``plain``, ``plain+plain``, ...), so every row of the accuracy table reads
    with one rule. Other folders beside a checkpoint are never touched."""
    if not (folder / SETTINGS_FILE).exists():
        raise FileNotFoundError(f"{folder} has no {SETTINGS_FILE} to write the answer rule into (not a trained checkpoint)")
    paths = {folder / SETTINGS_FILE}
    if _STAGE_FOLDER.match(folder.name):
        paths |= {p for p in folder.parent.glob(f"*/{SETTINGS_FILE}") if _STAGE_FOLDER.match(p.parent.name)}
    written = []
    for path in sorted(paths):
        settings = json.loads(path.read_text())
        if settings.get("family") != "ExtractiveReader":
            continue
        settings["answer"] = rule
        path.write_text(json.dumps(settings, indent=2) + "\n")
        written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m flows.tune_answer", description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True, help="an index built by the reader to tune (required)")
    parser.add_argument("--data", default="data/qa",
                        help="folder of the question sets, DATA/NAME.jsonl (default: %(default)s)")
    parser.add_argument("--sets", default=",".join(DEV_SETS),
                        help="comma-separated dev set names; test sets are refused (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="the first N questions of each set (default: all)")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="passages read per question (default: %(default)s)")
    parser.add_argument("--relevance", default="0,0.5,1,2",
                        help="comma-separated relevance_weight values of the grid (default: %(default)s)")
    parser.add_argument("--retrieval", default="0,5,10,20,40",
                        help="comma-separated retrieval_weight values of the grid (default: %(default)s)")
    parser.add_argument("--write", action="store_true",
                        help="write the best point into the btr.json of the index's reader and the training stages "
                             "beside it (default: off, only print)")
    parser.add_argument("--out", help="also save every point as JSON here (default: not saved)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_library_logs()
    names = [n for n in args.sets.split(",") if n]
    if any("-test" in n for n in names):
        print("error: the answer rule is chosen on dev sets only; test sets are for reporting", file=sys.stderr)
        return 2
    answerer = Answerer(args.index)
    cached = {n: read_logits(answerer, load_questions(Path(args.data) / f"{n}.jsonl", args.limit), args.k) for n in names}
    grid = itertools.product((float(x) for x in args.relevance.split(",")), (float(x) for x in args.retrieval.split(",")))
    points = []
    for relevance_weight, retrieval_weight in grid:
        sets = {n: score(answerer.reader, c, relevance_weight, retrieval_weight) for n, c in cached.items()}
        points.append({"relevance_weight": relevance_weight, "retrieval_weight": retrieval_weight, "sets": sets})
        print(f"relevance {relevance_weight:g} retrieval {retrieval_weight:g}: " + "; ".join(
            f"{n} EM {s['em']:.2f} ranks {s['cited_rank']} titles {s['answer_is_title']:.0f}% when recalled "
            f"{s['em_when_recalled']:.1f} (reading the answer's passages {s['em_when_recalled_reading_answer_passages']:.1f})"
            for n, s in sets.items()),
            flush=True)
    best = max(points, key=lambda p: (sum(s["em"] for s in p["sets"].values()), -p["relevance_weight"] - p["retrieval_weight"]))
    print(f"best: relevance_weight {best['relevance_weight']:g}, retrieval_weight {best['retrieval_weight']:g}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"index": args.index, "k": args.k, "limit": args.limit, "points": points}, indent=2) + "\n")
    if args.write:
        spec = answerer.index.manifest.extra["reader_spec"]
        folder = Path(spec["checkpoint"]) if spec.get("checkpoint") else DEFAULT_CHECKPOINT
        rule = {"relevance_weight": best["relevance_weight"], "retrieval_weight": best["retrieval_weight"]}
        for path in write_rule(folder, rule):
            print(f"wrote the answer rule into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
