"""The whole-name rule measured: EM of the reader's own spans against the same spans widened, per question set.

    python -m bench.answer_spans --index indexes/wikipedia-sample --limit 300 --out results/answer-whole-name.json

One model pass per set (``reader.api``'s ``answer_many``, k = 5, the rule off); each answer is then
widened by ``reader.spans.whole_name`` over the passage it cites, as ``reader.query`` does with the
rule on, so before and after are the same retrieval, the same spans and the same sitting. The
default sets are the held-out dev sets (where the rule was chosen) and the NQ-open and TriviaQA test
sets restricted to the sample (reported only: nothing is chosen on them). Prints one line per set
and, per set, the questions the rule won and lost.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEV = ("nq-dev-heldout-in-sample", "trivia-dev-heldout-in-sample")
TEST = ("nq-test-in-sample", "trivia-test-in-sample")


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m bench.answer_spans", description=__doc__.splitlines()[0])
    parser.add_argument("--index", default="indexes/wikipedia-sample", help="index folder (default: %(default)s)")
    parser.add_argument("--qa", default="data/qa", help="where `make data` wrote the question sets (default: %(default)s)")
    parser.add_argument("--sets", nargs="+", default=[*DEV, *TEST],
                        help=f"question sets, QA/NAME.jsonl (default: dev, then test: {' '.join([*DEV, *TEST])})")
    parser.add_argument("--limit", type=int, default=300, help="first N questions of each set (default: %(default)s)")
    parser.add_argument("--k", type=int, default=5, help="passages per question (default: %(default)s)")
    parser.add_argument("--out", help="also write the JSON, with every changed answer, here (default: not written)")
    return parser


def measure(index, records: list[dict], k: int) -> dict:
    """EM and F1 before and after widening, with every answer the rule changed (won, lost or neither)."""
    from reader.normalize import exact_match, f1_score
    from reader.spans import whole_name

    results = index.answer_many([r["question"] for r in records], k=k)
    before = after = f1_before = f1_after = 0.0
    changes = []
    for record, result in zip(records, results):
        context, (start, end) = result["context"], result["span"]
        read, widened = context[start:end], context[slice(*whole_name(context, start, end))]
        em_read, em_wide = exact_match(read, record["answers"]), exact_match(widened, record["answers"])
        before, after = before + em_read, after + em_wide
        f1_before += f1_score(read, record["answers"])
        f1_after += f1_score(widened, record["answers"])
        if widened != read:
            outcome = "won" if em_wide > em_read else "lost" if em_read > em_wide else "neither"
            changes.append({"question": record["question"], "read": read, "widened": widened, "outcome": outcome,
                            "answers": record["answers"][:3]})
    n = len(records)
    return {
        "questions": n, "em_before": round(100 * before / n, 2), "em_after": round(100 * after / n, 2),
        "f1_before": round(100 * f1_before / n, 2), "f1_after": round(100 * f1_after / n, 2),
        "changed": len(changes), "won": sum(c["outcome"] == "won" for c in changes),
        "lost": sum(c["outcome"] == "lost" for c in changes), "changes": changes,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from reader.api import open_index
    from reader.evaluate import load_questions
    from reader.load import quiet_library_logs

    quiet_library_logs()
    index = open_index(args.index, device="cpu")
    index.answerer.whole_names = False  # the reader's own spans; widened here, as the query path would
    report = {"index": args.index, "k": args.k, "limit": args.limit, "sets": {}}
    for name in args.sets:
        path = Path(args.qa) / f"{name}.jsonl"
        if not path.exists():
            print(f"error: {path} is missing: run `make data` first", file=sys.stderr)
            return 2
        records = load_questions(path, args.limit)
        result = measure(index, records, args.k)
        result["role"] = "test: reported, never chosen on" if "-test" in name else "dev: the rule was chosen here"
        report["sets"][name] = result
        print(f"{name}: EM {result['em_before']} -> {result['em_after']}, F1 {result['f1_before']} -> "
              f"{result['f1_after']} ({result['questions']} questions; {result['changed']} answers widened: "
              f"{result['won']} won, {result['lost']} lost)", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({name: {k: v for k, v in r.items() if k != "changes"} for name, r in report["sets"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
