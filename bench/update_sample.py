"""An update of the demo index against a full rebuild of the same new corpus, one sitting (issue 42's targets).

    python -m bench.update_sample --index indexes/wikipedia-sample --out results/update-sample.json

The new corpus is the bundled sample with 1% changed (``flows.update_corpus``: 50 edited, 30 added,
20 deleted, seed 0). Timed, one after the other, as a user runs them: a full build of the new corpus
(``python -m flows.index_wikipedia``) and ``--update`` of a copy of ``--index`` (built from the
sample) to it. Then, on questions people wrote (the held-out NQ-open and TriviaQA *dev* sets whose
answer is in the sample) and on the changed passages themselves:

- the same answers: questions whose top-k before the update holds no passage the update touched,
  and after it no new one, answered by the index before and after (answer, its span, the cited
  passage, the passages in order; their scores may move in the 4th decimal: the updated retriever
  searches with deleted rows filtered out, which rounds differently, and the largest change is kept);
- recall@k of the updated index against the rebuild (a passage holds a gold answer);
- deleted passages: never among the hits of a search for their own old text, never fetched;
- edited and added passages: found first by a search for their new text, fetched with it;
- bytes per token of the shards (records: ids, bits, scales, text), updated against rebuilt, and of
  the update's new shards alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEV = ("nq-dev-heldout-in-sample", "trivia-dev-heldout-in-sample")


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags (no heavy import: ``--help`` answers at once)."""
    parser = argparse.ArgumentParser(prog="python -m bench.update_sample", description=__doc__.splitlines()[0])
    parser.add_argument("--index", default="indexes/wikipedia-sample",
                        help="an index of the bundled sample, copied and updated (default: %(default)s)")
    parser.add_argument("--qa", default="data/qa", help="where `make data` wrote the question sets (default: %(default)s)")
    parser.add_argument("--k", type=int, default=5, help="passages per question (default: %(default)s)")
    parser.add_argument("--work", default=None, help="keep the new corpus and both indexes here (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="also write the JSON here (default: stdout only)")
    parser.add_argument("--reuse", action="store_true",
                        help="with --work: measure again on the indexes and timings an earlier run left there (default: off)")
    return parser


def timed(command: list[str], log: Path) -> float:
    """Run a command as a user would, its output to ``log``; its wall time in seconds."""
    began = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}); see {log}")
    return round(time.perf_counter() - began, 1)


def bytes_per_token(shards) -> float:
    return round(sum(s.bytes for s in shards) / max(sum(s.tokens for s in shards), 1), 2)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from reader.api import open_index
    from reader.evaluate import load_questions
    from reader.inputs import clean_text
    from reader.load import quiet_library_logs
    from reader.normalize import has_answer
    from reader.retriever import passage_text
    from storage.index import Index
    from storage.record import Passage
    from storage.verify import main as verify

    quiet_library_logs()
    work = Path(args.work or tempfile.mkdtemp(prefix="btr-update-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    updated, rebuilt, timings = work / "updated", work / "rebuilt", work / "timings.json"
    if not (args.reuse and timings.exists()):
        subprocess.run([py, "-m", "flows.update_corpus", "--out", str(work / "new.jsonl")], check=True, stdout=subprocess.DEVNULL)
        for folder in (updated, rebuilt):
            shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(args.index, updated, ignore=shutil.ignore_patterns(".work"))
        command = [py, "-m", "flows.index_wikipedia", "--corpus", str(work / "new.jsonl")]
        took = {"full_build_s": timed([*command, "--index", str(rebuilt)], work / "build.log"),
                "update_s": timed([*command, "--index", str(updated), "--update"], work / "update.log")}
        timings.write_text(json.dumps(took))
    changes = json.loads((work / "new.changes.json").read_text())
    result = {"index": args.index, "k": args.k, "corpus": {k: len(v) for k, v in changes.items()}}
    result |= json.loads(timings.read_text())
    result["update_over_build"] = round(result["update_s"] / result["full_build_s"], 3)
    result["verify"] = {name: verify([str(path)]) == 0 for name, path in (("updated", updated), ("rebuilt", rebuilt))}

    before, after, rebuild = (open_index(path, device="cpu") for path in (args.index, updated, rebuilt))
    touched = set(changes["deleted"]) | set(changes["edited"])
    new_ids = set(changes["edited"]) | set(changes["added"])
    same = {"questions": 0, "identical": 0, "differ": [], "largest_score_change": 0.0}
    recall = {"updated": 0, "rebuilt": 0, "before": 0, "questions": 0}
    for name in DEV:
        records = load_questions(Path(args.qa) / f"{name}.jsonl")
        questions = [r["question"] for r in records]
        answered = {label: index.answer_many(questions, k=args.k) for label, index in
                    (("before", before), ("updated", after), ("rebuilt", rebuild))}
        for i, record in enumerate(records):
            recall["questions"] += 1
            for label, index in (("before", before), ("updated", after), ("rebuilt", rebuild)):
                texts = [f"{p['title']} {p['text']}" for p in index.retrieve(record["question"], args.k)]
                recall[label] += has_answer(texts, record["answers"])
            a, b = answered["before"][i], answered["updated"][i]
            if {p["id"] for p in a["passages"]} & touched or {p["id"] for p in b["passages"]} & new_ids:
                continue
            same["questions"] += 1
            ids = [[p["id"] for p in x["passages"]] for x in (a, b)]
            if (a["answer"], a["source"], a["span"], ids[0]) == (b["answer"], b["source"], b["span"], ids[1]):
                same["identical"] += 1
                # the same passages, scored by a filtered search (deleted rows skipped): other float rounding
                change = max(abs(p["score"] - q["score"]) for p, q in zip(a["passages"], b["passages"]))
                same["largest_score_change"] = max(same["largest_score_change"], round(change, 6))
            else:
                same["differ"].append(record["question"])
    n = recall.pop("questions")
    result["recall_at_k_dev"] = {label: round(100 * hits / n, 2) for label, hits in recall.items()} | {"questions": n}
    result["unchanged_questions"] = same

    stored = Index.open(updated)
    old = {p.id: p for p in _sample()}
    deleted_hits = 0
    for pid in changes["deleted"]:
        hits = after.retrieve(passage_text(old[pid]), args.k)
        deleted_hits += any(h["id"] == pid for h in hits)
    refused = 0
    for row in stored.deleted.tolist():
        try:
            stored.fetch([row])
        except IndexError:
            refused += 1
    found = 0
    for pid, text in [*changes["edited"].items(), *changes["added"].items()]:
        title = old[pid].title if pid in old else None
        top = after.retrieve(passage_text(Passage(title or "", text, pid)) if title else text, 1)[0]
        found += top["id"] == pid and top["text"] == clean_text(text)
    result["deleted"] = {"passages": len(changes["deleted"]), "found_by_their_old_text": deleted_hits,
                         "deleted_rows": len(stored.deleted), "fetch_refused": refused}
    result["new_text_found_first"] = {"passages": len(new_ids), "found": found}
    first_new = len(Index.open(args.index))
    result["bytes_per_token"] = {
        "updated": bytes_per_token(stored.manifest.shards), "rebuilt": bytes_per_token(Index.open(rebuilt).manifest.shards),
        "update_new_shards": bytes_per_token([s for s in stored.manifest.shards if s.first_row >= first_new]),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _sample():
    from workers.corpus import Reject, read_corpus

    return [p for p in read_corpus(None, "sample") if not isinstance(p, Reject)]


if __name__ == "__main__":
    sys.exit(main())
