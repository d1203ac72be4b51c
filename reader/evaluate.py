"""Accuracy and speed of a reader over an index: EM, F1, retrieval recall, QPS, latency.

    python -m reader.evaluate --index INDEX --questions dev.jsonl --mode baseline|split|btr [--k 5] [--pool N] [--json]

Each line of the questions file is ``{"question": ..., "answers": [...]}``. Every mode reads the same
retrieved passages (the retriever does not depend on the mode): baseline re-encodes their text with
the unsplit reader, split computes continuous lower-layer states, btr reads the bits in the index.
EM and F1 use SQuAD's answer normalization (lower case, no punctuation, no articles, single
spaces), maximised over the gold answers. ``recall_at_k``: a retrieved passage contains an answer.
Questions are answered one at a time, so the latencies are those a single user sees. A question
the reader refuses (an empty one) counts as a miss and is reported as ``refused``; one longer than
the reader's limit is read without its tail and counted in ``questions_cut``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

# Light imports only (``--help`` answers at once); the query path is imported once the flags are parsed.
from .answer import DAMAGED_INDEX, DEFAULT_K
from .config import MODES
from .device import add_device_arguments
from .normalize import exact_match, f1_score, has_answer, normalize_answer, paired_ratio_interval  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from .query import Answerer

def evaluate(answerer: Answerer, questions: list[dict], mode: str, k: int = DEFAULT_K) -> dict:
    """Score ``mode`` on ``questions``: the summary, and ``exact``, one "1"/"0" per question in order.

    ``exact`` lets two rows measured on the same questions be compared question by question
    (``paired_ratio_interval``), which says far more than two EM figures side by side.
    """
    from .inputs import ReaderInputError  # loaded with the answerer already

    ems, f1s, recalls, latencies, refused, cut = [], [], [], [], 0, 0
    cited, titles = [0] * k, 0  # rank of the cited passage; answers that are a retrieved passage's title
    started = time.perf_counter()
    for record in questions:
        try:
            answerer.check(record["question"], k, mode)
        except ReaderInputError:  # e.g. an empty question: a miss, counted apart
            refused += 1
            ems.append(0.0)
            f1s.append(0.0)
            recalls.append(0.0)
            continue
        begin = time.perf_counter()
        lookup = answerer.lookup(record["question"], k)
        result = answerer.read([lookup], mode)[0]
        latencies.append(1000 * (time.perf_counter() - begin))
        cut += result["question_tokens_cut"] > 0
        texts = [f"{s.title} {s.text}" for s in lookup.passages]  # a span may come from the title too
        ems.append(exact_match(result["answer"], record["answers"]))
        f1s.append(f1_score(result["answer"], record["answers"]))
        recalls.append(float(has_answer(texts, record["answers"])))
        if result["source"] is not None:
            cited[result["source"]] += 1
        answer = normalize_answer(result["answer"])
        titles += bool(answer) and any(answer == normalize_answer(s.title) for s in lookup.passages)
    elapsed = time.perf_counter() - started
    n = len(questions)
    return {
        "mode": mode,
        "n": n,
        "refused": refused,
        "questions_cut": cut,
        "em": round(100 * float(np.mean(ems)), 2),
        "f1": round(100 * float(np.mean(f1s)), 2),
        "recall_at_k": round(100 * float(np.mean(recalls)), 2),
        # the reader's share of what retrieval made possible: EM over questions whose answer was read
        "em_when_recalled": round(100 * float(np.mean([e for e, r in zip(ems, recalls) if r])), 2) if any(recalls) else None,
        "k": k,
        # How often the answer came from the passage retrieved at rank 1..k: a reader that weighs
        # relevance cites rank 1 far more often than rank k; an even spread means it does not.
        "cited_rank": cited,
        # Answers that are exactly a retrieved passage's title: high means a title prior, not reading.
        "answer_is_title": round(100 * titles / max(1, n - refused), 2),
        "qps": round(len(latencies) / elapsed, 3),
        "latency_p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
        "latency_p95_ms": round(float(np.percentile(latencies, 95)), 1) if latencies else None,
        "exact": "".join("1" if em else "0" for em in ems),
    }


def load_questions(path: Path | str, limit: int | None = None) -> list[dict]:
    """Question records (question, answers) from a JSONL file, the first ``limit`` of them."""
    from .supervision import read_examples  # torch and the extractive family come with it
    records = [record for _, record in read_examples(path)]
    return records[:limit] if limit else records


def build_parser() -> argparse.ArgumentParser:
    """The command's flags (no heavy import: ``--help`` answers at once)."""
    parser = argparse.ArgumentParser(prog="python -m reader.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True, help="index folder (required)")
    parser.add_argument("--questions", required=True, help='JSONL of {"question", "answers"} (required)')
    parser.add_argument("--mode", choices=MODES, default="btr",
                        help="btr: passages from the index's 1-bit tokens; split: their text through the lower layers at "
                             "question time, no bits; baseline: the unsplit reader over question + passage text "
                             "(default: %(default)s)")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="passages per question (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="only the first N questions (default: all)")
    parser.add_argument("--checkpoint",
                        help="read text with this checkpoint instead, in baseline and split modes "
                             "(default: the index's reader)")
    parser.add_argument("--pool", type=int,
                        help="spans weighed per answer string; 1: the single best span (default: the reader's own)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (default: off, one line per figure)")
    add_device_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from storage.shard import DamagedIndex  # the query path, now that the flags are good

    from .load import quiet_library_logs
    from .query import Answerer, bad_input_errors

    quiet_library_logs()
    try:
        questions = load_questions(args.questions, args.limit)
        answerer = Answerer(args.index, args.checkpoint, args.pool, device=args.device, dtype=args.dtype)
        summary = evaluate(answerer, questions, args.mode, args.k)
    except DamagedIndex as error:  # before the bad-input errors: a corrupt record is also a ValueError
        print(f"error: {error}", file=sys.stderr)
        return DAMAGED_INDEX
    except bad_input_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary["index"] = args.index
    summary["device"] = f"{answerer.reader.device} {str(answerer.reader.dtype).removeprefix('torch.')}"  # QPS depends on it
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            if key != "exact":  # one character per question: for --json readers
                print(f"{key:>15}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
