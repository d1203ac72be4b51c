"""The accuracy tables of docs/accuracy.md in one command: readers x question sets, k, and offline merging.

    python -m flows.evaluate_reader [--checkpoints checkpoints/real] [--sets nq-test-in-sample,...]
                                    [--limit 300] [--k 5] [--pool N] [--out results/real-questions.json]
    python -m flows.evaluate_reader --k-curve 1,3,5,10,20 --sets nq-dev-heldout-in-sample,... --out ...
    python -m flows.evaluate_reader --offline 0,0.2,0.4 [--reader reader/checkpoint] --out ...

Question sets are ``<data>/<name>.jsonl`` files from ``python -m flows.qa_data``: by default the
benchmark, NQ-open and TriviaQA test, each as its answer-in-sample subset and (for reference) as
all questions, the first ``--limit`` of each. Choose k and checkpoints on the ``*-dev-heldout-*``
sets only; the test sets are for reporting.

Readers (stage checkpoints from ``python -m flows.train_reader``; a missing optional one is skipped):
- baseline: the plain stage-1 reader, unsplit, re-encoding passage text;
- baseline, continued unsplit (control): stage 1 trained as long as the split and bits stages;
- split: the stage-2 reader, continuous lower-layer states;
- btr: the stage-3 reader reading bits from its own index (lossless: no offline merge);
- btr, no recovery loss / no distillation, and split, no distillation: the ablation chains.
Every btr row reads an index its own reader built over the same corpus (the bundled sample unless
``--corpus``), under ``indexes/eval-<checkpoints folder>-<chain>``, built once and reused; all rows
retrieve with the same retriever, so they read the same passages.

``--k-curve``: EM and latency of the btr row at several k (what picks the default k).
``--offline``: EM of one reader (default: the committed one, what ``make demo`` indexes with) on
copies of its index merged offline at each ratio, with the bits per dimension each stores; the
index ``make demo`` builds is the 0.2 one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from reader.answer import DEFAULT_K, Answerer
from reader.evaluate import evaluate, load_questions, paired_ratio_interval
from reader.extractive import ANSWER_POOL
from reader.inputs import stopword_ids
from reader.load import DEFAULT_CHECKPOINT, ReaderSpec, load_reader, quiet_library_logs
from reader.retriever import Encoder, build_faiss, passage_text, record_retriever
from storage.codec import file_digest
from storage.index import FAISS_FILE, INFO_FILE, Index
from storage.offline import OfflineMerge, merge_index
from storage.record import Passage, section_sizes
from workers.build import build_index
from workers.corpus import read_jsonl, read_sample

ROWS = (  # label, stage folder, mode, required (an optional row is measured when its folder exists)
    ("baseline", "plain", "baseline", True),
    ("baseline, continued unsplit (control)", "plain+plain", "baseline", False),
    ("split", "plain+split", "split", True),
    ("btr", "plain+split+bits", "btr", True),
    ("btr, no recovery loss", "plain+split+bits-norecovery", "btr", False),
    ("btr, no distillation", "plain+split-nodistill+bits", "btr", False),
    ("split, no distillation", "plain+split-nodistill", "split", False),
)
TEST_SETS = ("nq-test-in-sample", "trivia-test-in-sample", "nq-test", "trivia-test")


def corpus_passages(corpus: str | None) -> list[Passage]:
    """The evaluation corpus: the bundled sample (the rows ``make demo`` indexes) or a JSONL file."""
    records = read_sample(None) if corpus is None else read_jsonl(Path(corpus))
    return [p for p in records if isinstance(p, Passage)]


def add_retriever(folder: Path, passages: list[Passage], cached: Path | None) -> None:
    """The default retriever over ``passages`` in ``folder``: copied from ``cached`` (``qa_data``'s,
    over the same rows) when there is one, else embedded here."""
    if cached is not None and (cached / FAISS_FILE).exists():
        for name in (FAISS_FILE, INFO_FILE):
            shutil.copy(cached / name, folder / name)
    else:
        encoder = Encoder()
        build_faiss([encoder.embed([passage_text(p) for p in passages])], folder, encoder.identity())
    record_retriever(folder)  # its digest in the manifest, for storage.verify


def eval_index(checkpoint: Path, passages: list[Passage], root: Path, cached: Path | None, corpus: str | None) -> Path:
    """The corpus indexed by ``checkpoint`` (built once, then reused), lossless.

    Built in this process with the writer the pipeline uses (``workers.build``): ten thousand
    passages need no Ray, and the rows then measure the reader, not the lossy storage pass.
    """
    digest = file_digest(checkpoint / "model.safetensors")[:10]  # a retrained reader gets a new index
    folder = root / f"eval-{checkpoint.parent.name}-{checkpoint.name}-{digest}"
    if (folder / "manifest.json").exists():
        return folder
    spec = ReaderSpec(checkpoint=str(checkpoint))
    build_index(folder, load_reader(spec), passages, extra={"reader_spec": spec.to_dict(), "corpus": corpus or "sample"})
    add_retriever(folder, passages, cached)
    return folder


def bits_per_dimension(index: Path) -> float:
    """Stored bits per dimension per token of an index's bit sections (what offline merging shrinks)."""
    opened = Index.open(index)
    bits = sum(section_sizes(raw)["bits"] for raw in opened.read_raw(range(len(opened))))
    return 8 * bits / (opened.manifest.tokens * opened.manifest.reader.hidden_size)


def relative_em(row: dict, reference: dict) -> str:
    """EM of ``row`` as a share of ``reference``'s, with its paired-bootstrap 95% interval."""
    if not reference["em"]:
        return "n/a"
    share = f"{100 * row['em'] / reference['em']:.1f}%"
    if row is reference or not (row.get("exact") and reference.get("exact")):
        return share
    low, high = paired_ratio_interval(row["exact"], reference["exact"])
    return f"{share} ({low:.1f}-{high:.1f})"


def table(results: list[dict], sets: list[str]) -> str:
    """Markdown: one line per reader; per set EM / F1 / recall@k / EM when recalled, and the cited passage's
    rank (1..k) with the share of title answers; EM vs the control (or baseline) on the first set, QPS."""
    reference_label = next((r["row"] for r in results if "control" in r["row"]), "baseline")
    header = ["reader", "mode"]
    for name in sets:
        header += [f"{name}: EM / F1 / R@k / EM if recalled", f"{name}: cited rank 1..k, title answers"]
    header += [f"EM vs {'control' if 'control' in reference_label else 'baseline'} ({sets[0]})", "QPS", "p50 ms"]
    lines = [" | ".join(header), " | ".join(["---"] * len(header))]
    by_row = {r["row"]: r for r in results}
    for r in results:
        cells = [r["row"], r["mode"]]
        for name in sets:
            s = r["sets"][name]
            recalled = "n/a" if s.get("em_when_recalled") is None else f"{s['em_when_recalled']:.1f}"
            cells.append(f"{s['em']:.1f} / {s['f1']:.1f} / {s['recall_at_k']:.1f} / {recalled}")
            ranks = " / ".join(str(x) for x in s["cited_rank"]) if "cited_rank" in s else "n/a"
            cells.append(f"{ranks}, {s['answer_is_title']:.0f}%" if "answer_is_title" in s else ranks)
        reference = by_row.get(reference_label)
        cells.append(relative_em(r["sets"][sets[0]], reference["sets"][sets[0]]) if reference else "")
        first = r["sets"][sets[0]]
        cells += [f"{first['qps']:.2f}", f"{first['latency_p50_ms']:.0f}"]
        lines.append(" | ".join(cells))
    return "\n".join(f"| {line} |" for line in lines)


def save(out: Path, payload: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")


def readers_table(args, questions: dict[str, list[dict]], passages: list[Passage], cached: Path | None) -> int:
    """Every reader row on every set (rows already in ``--out`` with the same key are kept)."""
    root = Path(args.checkpoints)
    missing = [stage for _, stage, _, _ in ROWS if not (root / stage / "btr.json").exists()]
    required = [stage for _, stage, _, needed in ROWS if needed and stage in missing]
    if required and not args.skip_missing:
        print(f"error: {root} lacks {', '.join(required)}; run python -m flows.train_reader first "
              "(or pass --skip-missing for a partial table)", file=sys.stderr)
        return 2
    built = [stage for _, stage, mode, _ in ROWS if mode == "btr" and stage not in missing]
    if not built:
        print(f"error: {root} has no bits stage to index the corpus with", file=sys.stderr)
        return 2
    out = Path(args.out)
    earlier = {r["row"]: r for r in json.loads(out.read_text()).get("rows", [])} if out.exists() else {}
    shared = eval_index(root / built[0], passages, Path(args.indexes), cached, args.corpus)
    results = []
    for label, stage, mode, _ in ROWS:
        if stage in missing:
            continue
        key = {"weights": file_digest(root / stage / "model.safetensors"), "sets": list(questions),
               "limit": args.limit, "k": args.k, "corpus": args.corpus, "pool": args.pool or ANSWER_POOL}
        if earlier.get(label, {}).get("key") == key:
            results.append(earlier[label])
            continue
        if mode == "btr":
            answerer = Answerer(eval_index(root / stage, passages, Path(args.indexes), cached, args.corpus), pool=args.pool)
        else:
            answerer = Answerer(shared, text_reader=str(root / stage), pool=args.pool)
        sets = {name: evaluate(answerer, qs, mode, args.k) for name, qs in questions.items()}
        results.append({"row": label, "checkpoint": stage, "mode": mode, "sets": sets, "key": key})
        print(json.dumps({"row": label} | {n: {k: v for k, v in s.items() if k != "exact"} for n, s in sets.items()}),
              flush=True)
        save(out, {"kind": "readers", "k": args.k, "limit": args.limit, "rows": results})
    save(out, {"kind": "readers", "k": args.k, "limit": args.limit, "rows": results})  # reused rows after the last measured one too
    print(table(results, list(questions)))
    return 0


def k_curve(args, questions: dict[str, list[dict]], passages: list[Passage], cached: Path | None) -> int:
    """EM, recall and latency of the btr row at each k."""
    stage = Path(args.checkpoints) / "plain+split+bits"
    answerer = Answerer(eval_index(stage, passages, Path(args.indexes), cached, args.corpus), pool=args.pool)
    points = []
    for k in (int(x) for x in args.k_curve.split(",")):
        sets = {name: evaluate(answerer, qs, "btr", k) for name, qs in questions.items()}
        points.append({"k": k, "sets": sets})
        print(f"k={k}: " + "; ".join(f"{n} EM {s['em']:.1f} R@k {s['recall_at_k']:.1f} p50 {s['latency_p50_ms']:.0f} ms"
                                     for n, s in sets.items()), flush=True)
        save(Path(args.out), {"kind": "k-curve", "checkpoint": str(stage), "limit": args.limit, "points": points})
    return 0


def offline_rows(args, questions: dict[str, list[dict]], passages: list[Passage], cached: Path | None) -> int:
    """EM of one reader on its index merged offline at each ratio, with the bits per dimension stored."""
    checkpoint = Path(args.reader) if args.reader else DEFAULT_CHECKPOINT
    lossless = eval_index(checkpoint, passages, Path(args.indexes), cached, args.corpus)
    tokenizer = load_reader(ReaderSpec(checkpoint=str(checkpoint))).tokenizer
    rows = []
    for ratio in (float(x) for x in args.offline.split(",")):
        folder = lossless if ratio == 0 else lossless.parent / f"{lossless.name}-merged-{ratio}"
        if not (folder / "manifest.json").exists():
            merge_index(lossless, folder, stopword_ids(tokenizer), OfflineMerge(ratio))
            add_retriever(folder, passages, lossless)
        answerer = Answerer(folder, pool=args.pool)
        sets = {name: evaluate(answerer, qs, "btr", args.k) for name, qs in questions.items()}
        bits = round(bits_per_dimension(folder), 4)
        rows.append({"offline_merge": ratio, "pool": answerer.reader.pool, "bits_per_dim": bits, "sets": sets})
        print(f"r_o={ratio}: {rows[-1]['bits_per_dim']} bits/dim; "
              + "; ".join(f"{n} EM {s['em']:.1f}" for n, s in sets.items()), flush=True)
        save(Path(args.out), {"kind": "offline", "checkpoint": str(checkpoint), "k": args.k, "limit": args.limit,
                              "rows": rows})
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m flows.evaluate_reader", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default="checkpoints/real",
                        help="flows.train_reader's output folder, one subfolder per stage (default: %(default)s)")
    parser.add_argument("--data", default="data/qa",
                        help="folder of the question sets, from flows.qa_data (default: %(default)s)")
    parser.add_argument("--sets", default=",".join(TEST_SETS),
                        help="comma-separated set names, DATA/NAME.jsonl (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=300, help="the first N questions of each set (default: %(default)s)")
    parser.add_argument("--corpus", help="JSONL corpus to evaluate over (default: the bundled sample)")
    parser.add_argument("--indexes", default="indexes",
                        help="where the evaluation indexes are built and kept (default: %(default)s)")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="passages read per question (default: %(default)s)")
    parser.add_argument("--out", default="results/real-questions.json", help="the results, JSON (default: %(default)s)")
    parser.add_argument("--skip-missing", action="store_true",
                        help="measure the rows that can be, a partial table "
                             "(default: off: a missing required stage is an error)")
    parser.add_argument("--k-curve",
                        help="comma-separated k values: the btr row's EM and latency at each "
                             "(default: off, the readers table)")
    parser.add_argument("--offline",
                        help="comma-separated offline merge ratios: EM and bits/dim of --reader at each "
                             "(default: off, the readers table)")
    parser.add_argument("--reader", help="checkpoint for --offline (default: the committed reader, reader/checkpoint)")
    parser.add_argument("--pool", type=int,
                        help="spans weighed per answer string; 1: the single best span (default: the reader's own)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_library_logs()
    names = [n for n in args.sets.split(",") if n]
    files = {n: Path(args.data) / f"{n}.jsonl" for n in names}
    absent = [str(f) for f in files.values() if not f.exists()]
    if absent:
        print(f"error: {', '.join(absent)} missing; run `make data` (python -m flows.qa_data) first", file=sys.stderr)
        return 2
    questions = {n: load_questions(f, args.limit) for n, f in files.items()}
    passages = corpus_passages(args.corpus)
    cached = Path(args.data) / "retriever" if args.corpus is None else None
    if args.k_curve:
        return k_curve(args, questions, passages, cached)
    if args.offline:
        return offline_rows(args, questions, passages, cached)
    return readers_table(args, questions, passages, cached)


if __name__ == "__main__":
    sys.exit(main())
