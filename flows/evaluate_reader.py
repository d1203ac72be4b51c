"""The README's accuracy table in one command: baseline / split / btr and the two ablations.

    python -m flows.evaluate_reader [--checkpoints checkpoints/minilm-btr] [--questions data/qa/dev.jsonl]
                                    [--corpus data/qa/corpus.jsonl] [--k 5] [--out results/accuracy.json]

Rows (each stage checkpoint from ``python -m flows.train_reader``, with and without the ablations):
- baseline: the plain stage-1 reader, unsplit, re-encoding passage text;
- baseline, continued unsplit (control): stage 1 trained on, unsplit (``train_reader --control-steps``;
  ``make train`` gives it as many steps as the split and bits stages together), when that folder exists;
- split: the stage-2 reader, continuous lower-layer states;
- btr: the stage-3 reader reading bits from its index (lossless: no offline merge);
- btr without recovery loss / without distillation: the ablation chains, same way;
- split without distillation: the stage-2 reader of the no-distillation chain, when that folder exists.
Every btr row needs an index built by its own reader: they are built over the evaluation corpus
under ``indexes/eval-<checkpoints folder>-<chain>`` and reused when already there. All
rows retrieve with the same retriever over the same corpus, so they read the same passages.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reader.answer import Answerer
from reader.evaluate import evaluate, load_questions, paired_ratio_interval
from reader.inputs import Passage
from reader.load import ReaderSpec, load_reader, quiet_library_logs
from reader.retriever import Encoder, build_faiss, passage_text
from storage.build import build_index
from storage.codec import file_digest

from .corpus import read_jsonl

ROWS = (  # label, stage folder, mode, required (an optional row is measured when its folder exists)
    ("baseline", "plain", "baseline", True),
    ("baseline, continued unsplit (control)", "plain+plain", "baseline", False),
    ("split", "plain+split", "split", True),
    ("btr", "plain+split+bits", "btr", True),
    ("btr, no recovery loss", "plain+split+bits-norecovery", "btr", True),
    ("btr, no distillation", "plain+split-nodistill+bits", "btr", True),
    ("split, no distillation", "plain+split-nodistill", "split", False),
)


def eval_index(checkpoint: Path, corpus: str, root: Path) -> Path:
    """The evaluation corpus indexed by ``checkpoint`` (built once, then reused).

    Built in this process with the same writer the pipeline uses (``storage.build``), lossless (no
    offline merge), with the default retriever: a few thousand passages need no Ray, and the
    accuracy rows then measure the reader, not the lossy storage pass.
    """
    folder = root / f"eval-{checkpoint.parent.name}-{checkpoint.name}"
    if (folder / "manifest.json").exists():
        return folder  # Answerer refuses it if its reader has changed since
    passages = [p for p in read_jsonl(Path(corpus)) if isinstance(p, Passage)]
    spec = ReaderSpec(checkpoint=str(checkpoint))
    build_index(folder, load_reader(spec), passages, extra={"reader_spec": spec.to_dict(), "corpus": corpus})
    encoder = Encoder()
    build_faiss([encoder.embed([passage_text(p) for p in passages])], folder, encoder.identity())
    return folder


def relative_em(row: dict, reference: dict) -> str:
    """EM of ``row`` as a share of ``reference``'s, with its paired-bootstrap 95% interval where both
    rows kept their per-question outcomes (rows measured before they were kept show the share alone)."""
    if not reference["em"]:
        return "n/a"
    share = f"{100 * row['em'] / reference['em']:.1f}%"
    if row is reference or not (row.get("exact") and reference.get("exact")):
        return share
    low, high = paired_ratio_interval(row["exact"], reference["exact"])
    return f"{share} ({low:.1f}-{high:.1f})"


def table(results: list[dict]) -> str:
    """A markdown table of the rows, EM relative to the baseline (and to the control, when measured)."""
    references = [r for r in results if r["row"].startswith("baseline")]
    header = ["reader", "mode", "EM", "F1"]
    header += ["EM vs control" if "control" in r["row"] else "EM vs baseline" for r in references]
    header += ["recall@k", "QPS", "p50 ms", "p95 ms"]
    lines = [" | ".join(header), " | ".join(["---"] * len(header))]
    for r in results:
        cells = [r["row"], r["mode"], f"{r['em']:.1f}", f"{r['f1']:.1f}"]
        cells += [relative_em(r, ref) for ref in references]
        cells += [f"{r['recall_at_k']:.1f}", f"{r['qps']:.2f}", f"{r['latency_p50_ms']:.0f}", f"{r['latency_p95_ms']:.0f}"]
        lines.append(" | ".join(cells))
    return "\n".join(f"| {line} |" for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.evaluate_reader", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default="checkpoints/minilm-btr", help="train-reader output folder")
    parser.add_argument("--questions", default="data/qa/dev.jsonl")
    parser.add_argument("--corpus", default="data/qa/corpus.jsonl")
    parser.add_argument("--indexes", default="indexes", help="where the evaluation indexes go")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--limit", type=int, help="only the first N questions")
    parser.add_argument("--out", default="results/accuracy.json")
    parser.add_argument("--skip-missing", action="store_true", help="measure the rows that can be (a partial table)")
    args = parser.parse_args(argv)
    quiet_library_logs()
    root, questions = Path(args.checkpoints), load_questions(args.questions, args.limit)
    missing = [stage for _, stage, _, _ in ROWS if not (root / stage / "btr.json").exists()]
    required = [stage for _, stage, _, needed in ROWS if needed and stage in missing]
    if required and not args.skip_missing:
        print(f"error: {root} lacks {', '.join(required)}; run python -m flows.train_reader (and --no-recovery, "
              "--no-distill) first", file=sys.stderr)
        return 2
    out = Path(args.out)
    # Rows already measured with the same checkpoint, questions and k are kept (the slow part).
    earlier = {r["row"]: r for r in json.loads(out.read_text())["rows"]} if out.exists() else {}
    built = [stage for _, stage, mode, _ in ROWS if mode == "btr" and stage not in missing]
    if not built:
        print(f"error: {root} has no bits stage (plain+split+bits or an ablation) to index the corpus with",
              file=sys.stderr)
        return 2
    # The text rows read through a btr index's retriever, so every row sees the same passages. Every
    # evaluation index holds the same corpus under the same retriever, so any of them will do: a
    # folder holding only an ablation chain can be measured with --skip-missing.
    shared = eval_index(root / built[0], args.corpus, Path(args.indexes))
    results = []
    for label, stage, mode, _ in ROWS:
        if stage in missing:
            continue
        key = {"weights": file_digest(root / stage / "model.safetensors"), "questions": args.questions,
               "n": len(questions), "k": args.k, "corpus": args.corpus}
        if earlier.get(label, {}).get("key") == key:
            results.append(earlier[label])
            continue
        if mode == "btr":
            answerer = Answerer(eval_index(root / stage, args.corpus, Path(args.indexes)))
        else:
            answerer = Answerer(shared, text_reader=str(root / stage))
        results.append({"row": label, "checkpoint": stage} | evaluate(answerer, questions, mode, args.k) | {"key": key})
        print(json.dumps(results[-1]), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"questions": args.questions, "corpus": args.corpus, "rows": results}, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
