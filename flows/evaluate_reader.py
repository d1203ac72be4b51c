"""The README's accuracy table in one command: baseline / split / btr and the two ablations.

    python -m flows.evaluate_reader [--checkpoints checkpoints/minilm-btr] [--questions data/qa/dev.jsonl]
                                    [--corpus data/qa/corpus.jsonl] [--k 5] [--out results/accuracy.json]

Rows (each stage checkpoint from ``python -m flows.train_reader``, with and without the ablations):
- baseline: the plain stage-1 reader, unsplit, re-encoding passage text;
- split: the stage-2 reader, continuous lower-layer states;
- btr: the stage-3 reader reading bits from its index (offline merge on, as ``make demo`` builds);
- btr without recovery loss / without distillation: the ablation chains, same way.
Every btr row needs an index built by its own reader: they are built (by the ``index-wikipedia``
flow) over the evaluation corpus under ``indexes/eval-<chain>`` and reused when already there. All
rows retrieve with the same retriever over the same corpus, so they read the same passages.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reader.answer import Answerer
from reader.evaluate import evaluate, load_questions

from .index_wikipedia import index_wikipedia

ROWS = (  # label, stage folder, mode
    ("baseline", "plain", "baseline"),
    ("split", "plain+split", "split"),
    ("btr", "plain+split+bits", "btr"),
    ("btr, no recovery loss", "plain+split+bits-norecovery", "btr"),
    ("btr, no distillation", "plain+split-nodistill+bits", "btr"),
)


def eval_index(checkpoint: Path, corpus: str, root: Path) -> Path:
    """The evaluation corpus indexed by ``checkpoint`` (built once, then reused)."""
    folder = root / f"eval-{checkpoint.name}"
    if not (folder / "manifest.json").exists():
        index_wikipedia(index=str(folder), corpus=corpus, corpus_format="jsonl", reader_checkpoint=str(checkpoint))
    return folder


def table(results: list[dict]) -> str:
    """A markdown table of the rows, with btr's EM relative to the baseline's."""
    baseline = next(r for r in results if r["row"] == "baseline")["em"]
    lines = [
        "| reader | mode | EM | F1 | EM vs baseline | recall@k | QPS | p50 ms | p95 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        relative = f"{100 * r['em'] / baseline:.1f}%" if baseline else "n/a"
        lines.append(
            f"| {r['row']} | {r['mode']} | {r['em']:.1f} | {r['f1']:.1f} | {relative} | {r['recall_at_k']:.1f} "
            f"| {r['qps']:.2f} | {r['latency_p50_ms']:.0f} | {r['latency_p95_ms']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.evaluate_reader", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default="checkpoints/minilm-btr", help="train-reader output folder")
    parser.add_argument("--questions", default="data/qa/dev.jsonl")
    parser.add_argument("--corpus", default="data/qa/corpus.jsonl")
    parser.add_argument("--indexes", default="indexes", help="where the evaluation indexes go")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--limit", type=int, help="only the first N questions")
    parser.add_argument("--out", default="results/accuracy.json")
    args = parser.parse_args(argv)
    root, questions = Path(args.checkpoints), load_questions(args.questions, args.limit)
    missing = [stage for _, stage, _ in ROWS if not (root / stage / "btr.json").exists()]
    if missing:
        print(f"error: {root} lacks {', '.join(missing)}; run python -m flows.train_reader (and --no-recovery, "
              "--no-distill) first", file=sys.stderr)
        return 2
    # The text rows read through the btr index's retriever, so every row sees the same passages.
    shared = eval_index(root / "plain+split+bits", args.corpus, Path(args.indexes))
    results = []
    for label, stage, mode in ROWS:
        if mode == "btr":
            answerer = Answerer(eval_index(root / stage, args.corpus, Path(args.indexes)))
        else:
            answerer = Answerer(shared, text_reader=str(root / stage))
        summary = evaluate(answerer, questions, mode, args.k)
        results.append({"row": label, "checkpoint": stage} | summary)
        print(json.dumps(results[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"questions": args.questions, "corpus": args.corpus, "rows": results}, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
