"""Answer a question from a BTR index, citing the passages it drew on.

    python -m reader.answer "who directed 2001: A Space Odyssey?" [--index DIR] [--k 10] [--mode btr] [--json]

Retrieves passages with the index's faiss retriever, fetches their bits from LMDB, runs the upper
layers and extracts (or generates) the answer. Bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .binary import IncompatibleRepresentation
from .config import MODES
from .identity import IncompatibleIndex
from .inputs import ReaderInputError
from .load import ReaderSpec, load_reader
from .retriever import Retriever

DEFAULT_INDEX = "indexes/wikipedia-sample"


class Answerer:
    """An index, its retriever and its reader, loaded once to answer many questions."""

    def __init__(self, index: Path | str) -> None:
        from storage.index import Index, Manifest  # storage builds on reader; import it late

        manifest = Manifest.load(Path(index))
        spec = manifest.extra.get("reader_spec")
        if spec is None:
            raise IncompatibleIndex(f"{index}: the manifest does not say which reader built it (no reader_spec)")
        self.reader = load_reader(ReaderSpec(**spec))
        self.index = Index.open(index, expect=self.reader.identity())
        self.retriever = Retriever(index)

    def answer(self, question: str, k: int = 10, mode: str = "btr") -> dict:
        """The answer, its passages (id, title, score, snippet) and the time spent per stage."""
        timings = {}
        start = time.perf_counter()
        self.reader.question_ids(question)  # a bad question fails here, before any work
        hits = self.retriever.search([question], k)[0]
        timings["retrieve"] = time.perf_counter() - start
        start = time.perf_counter()
        stored = self.index.fetch([h.row for h in hits])
        timings["fetch"] = time.perf_counter() - start
        start = time.perf_counter()
        passages = [s.tokens if mode == "btr" else s.passage for s in stored]
        with torch.inference_mode():
            if hasattr(self.reader, "extract"):
                span = self.reader.extract([question], [passages], mode)[0]
                source = stored[span.passage]
                ids = source.tokens.token_ids.tolist()
                text = self.reader.span_text(source.passage, ids, span.start, span.end)
            else:
                text = self.reader.answer([question], [passages], mode)[0]
        timings["read"] = time.perf_counter() - start
        return {
            "answer": text,
            "passages": [
                {"id": s.pid, "title": s.title, "score": round(h.score, 4), "snippet": s.text[:160]}
                for s, h in zip(stored, hits)
            ],
            "timings_ms": {stage: round(1000 * seconds, 2) for stage, seconds in timings.items()},
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reader.answer", description=__doc__.splitlines()[0])
    parser.add_argument("question")
    parser.add_argument("--index", default=DEFAULT_INDEX, help=f"index folder (default {DEFAULT_INDEX})")
    parser.add_argument("--k", type=int, default=10, help="passages to read")
    parser.add_argument("--mode", choices=MODES, default="btr")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        if not args.question.strip():
            raise ReaderInputError("the question is empty")
        result = Answerer(args.index).answer(args.question, args.k, args.mode)
    except (ReaderInputError, IncompatibleIndex, IncompatibleRepresentation, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"answer: {result['answer']}")
    for i, p in enumerate(result["passages"], 1):
        print(f"  [{i}] {p['title']} ({p['score']:.3f}): {p['snippet'][:100]}...")
    print("  time: " + ", ".join(f"{stage} {ms} ms" for stage, ms in result["timings_ms"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
