"""Answer questions from a BTR index, citing the passages each answer drew on.

    python -m reader.answer "who directed 2001: A Space Odyssey?" [--index DIR] [--k 5] [--mode btr] [--json]
    python -m reader.answer --questions questions.jsonl [--index DIR] ...   (one JSON answer per line)

Retrieves passages with the index's faiss retriever, reads their records from LMDB, decodes the
bits, runs the upper layers and extracts (or generates) the answer. Bad input is one line on
stderr and exit status 2; in a questions file a bad line gets an ``{"line", "error"}`` object in
its place, the others are answered, and the exit status is 2. A damaged index (a shard truncated or
missing, a corrupt record, a damaged manifest, codec or retriever) is the index's fault, not the
question's: one line on stderr and exit status 3 (``DAMAGED_INDEX``), in a questions file too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import TypeAdapter, ValidationError

from storage.bits import IncompatibleRepresentation
from storage.identity import IncompatibleIndex
from storage.index import Index, Manifest
from storage.record import CorruptRecord
from storage.shard import DamagedIndex, repair_hint

from .config import MODES, check_mode
from .fid import Generated
from .inputs import ReaderInputError, clean_text, is_blank, passage_string, read_json
from .load import ReaderSpec, load_reader, quiet_library_logs
from .retriever import Hit, Retriever

DEFAULT_INDEX = "indexes/wikipedia-sample"
DEFAULT_K = 5
DEFAULT_MAX_K = 100  # the most passages one question may read, here and in reader.serve (memory grows with k)
DAMAGED_INDEX = 3  # exit status: the index is damaged (2 is the user's bad input)


def bad_input_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean bad input (question, index, options), reported without a traceback."""
    return ReaderInputError, IncompatibleIndex, IncompatibleRepresentation, CorruptRecord, FileNotFoundError, ValueError


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall time of the block to ``timings[stage]`` (milliseconds)."""
    start = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + 1000 * (time.perf_counter() - start)


@dataclass
class Lookup:
    """A question with its retrieved hits and their raw records: the part of a query that is I/O."""

    question: str
    hits: list[Hit]
    raw: list[tuple[str, bytes]]
    timings: dict[str, float] = field(default_factory=dict)
    passages: list = field(default_factory=list)  # the decoded StoredPassages, once read() ran


class Answerer:
    """An index, its retriever and its reader, loaded once to answer many questions.

    ``lookup`` (retrieve + LMDB read) is safe to call from many threads at once; ``read`` runs the
    model over a batch of lookups, so a server can batch concurrent questions through it.
    """

    def __init__(self, index: Path | str, text_reader: str | None = None, pool: int | None = None) -> None:
        """Load the index and the reader that built it.

        ``text_reader``: another checkpoint of the same family to read passage *text* with (baseline
        and split modes only; the index's bits belong to the reader that built it). ``pool``: the
        extractive reader's answer pool (spans weighed per answer string; 1 = the single best span),
        instead of its default.
        """
        manifest = Manifest.load(Path(index))
        spec = manifest.extra.get("reader_spec")
        if spec is None:
            raise IncompatibleIndex(f"{index}: the manifest does not say which reader built it (no reader_spec)")
        try:
            spec = TypeAdapter(ReaderSpec).validate_python(spec)
        except ValidationError as error:
            raise DamagedIndex(
                f"{Path(index) / 'manifest.json'} is damaged (extra.reader_spec"
                f"{''.join(f'.{part}' for part in error.errors()[0]['loc'])}: {error.errors()[0]['msg']}); "
                f"the shards may be intact: rerun the index flow on {index}"
            ) from None
        self.text_only = text_reader is not None
        if self.text_only:
            spec = ReaderSpec(spec.family, text_reader, None, spec.max_passage_tokens)
        self.reader = load_reader(spec)
        if pool is not None:
            if not hasattr(self.reader, "pool"):
                raise ValueError(f"--pool applies to extractive readers; {spec.family} generates its answers")
            self.reader.pool = pool  # checked by the reader
        self.index = Index.open(index, expect=None if self.text_only else self.reader.identity())
        try:
            self.retriever = Retriever(index, store=self.index)  # the version self.index opened
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:  # faiss raises RuntimeError
            raise DamagedIndex(
                f"the retriever in {index} is missing or damaged ({str(error).splitlines()[0]}). {repair_hint(index)}"
            ) from None
        if self.retriever.index.ntotal != len(self.index):  # rows would point at other passages
            raise DamagedIndex(
                f"the retriever in {index} holds {self.retriever.index.ntotal} passages, the manifest "
                f"{len(self.index)} (a rebuild stopped half-way?). {repair_hint(index)}"
            )

    def check(self, question: str, k: int, mode: str, max_k: int | None = None, flag: str = "the service's --max-k") -> None:
        """Raise ReaderInputError / ValueError for a question, k or mode this answerer cannot take.

        ``max_k``: a caller's own bound on k (a service's, the command line's), below the index's
        passages; ``flag`` names it in the refusal.
        """
        if not isinstance(question, str):
            raise ReaderInputError("the question must be a string")
        try:
            question.encode("utf-8")
        except UnicodeEncodeError:
            raise ReaderInputError("the question is not valid UTF-8 text") from None
        self.reader.question_ids(question)  # an empty question fails here, before any work
        top, why = len(self.index), "the index's passages"
        if max_k is not None and max_k < top:
            top, why = max_k, flag
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= top:
            raise ValueError(f"k must be a whole number from 1 to {top} ({why}), got {k!r}")
        check_mode(mode)
        if mode == "btr" and self.text_only:
            raise ValueError("btr mode reads the index's bits, so it needs the reader that built the index")

    def lookup(self, question: str, k: int = DEFAULT_K) -> Lookup:
        """Retrieve the top-k passages of one question and read their records (undecoded)."""
        timings: dict[str, float] = {}
        retriever = self.retriever  # one index version for the whole lookup (reader.reload may move to another)
        with timed(timings, "retrieve"):
            hits = retriever.search([clean_text(question)], k)[0]  # the form the reader reads too
        with timed(timings, "fetch"):
            raw = retriever.store.read([h.row for h in hits])
        return Lookup(question, hits, raw, timings)

    def read(self, lookups: Sequence[Lookup], mode: str = "btr") -> list[dict]:
        """Answers for a batch of lookups (all with the same k), one model pass for all of them."""
        reader, timings = self.reader, {}
        with timed(timings, "decode"):
            stored = [self.index.decode(l.raw, [h.row for h in l.hits]) for l in lookups]
            for lookup, group in zip(lookups, stored):
                lookup.passages = group
            groups = [[s.tokens if mode == "btr" else s.passage for s in group] for group in stored]
            scores = [[h.score for h in l.hits] for l in lookups]
            batch = reader.prepare([l.question for l in lookups], groups, scores)
            with torch.inference_mode():
                states = reader.passage_states(batch, mode) if mode == "btr" else None
        with torch.inference_mode():
            if mode == "split":  # continuous lower states, computed now from the passage text
                with timed(timings, "lower"):
                    states = reader.passage_states(batch, mode)
            with timed(timings, "upper"):
                pairs = reader.encode_pairs(batch, mode, reader.encoder_merge_ratio(mode), passages=states)
            with timed(timings, "extract" if hasattr(reader, "best_spans") else "generate"):
                outputs = reader.read_out(batch, pairs, mode)
        results = []
        for lookup, group, output in zip(lookups, stored, outputs):
            source = context = span = None
            if isinstance(output, Generated):  # FiD: cite the passage the answer attended to most
                text, source = output.text, output.passage
                context = passage_string(group[source].passage)
            else:  # a span: slice the text the reader read of the cited passage
                source, passage = output.passage, group[output.passage].passage
                context, span = passage_string(passage), reader.span_offsets(passage, output.start, output.end)
                text = context[span[0] : span[1]]
            stages = lookup.timings | timings
            results.append(
                {
                    "question": lookup.question,
                    "answer": text,
                    "source": source,
                    "context": context,  # the cited passage as the reader read it (title included)
                    "span": span,  # the answer's [start, end) characters in ``context``
                    "mode": mode,
                    # a question longer than the reader's limit is read without its tail: say so
                    "question_tokens_cut": reader.question_overflow(lookup.question),
                    "passages": [
                        {"id": s.pid, "title": s.title, "score": round(h.score, 4), "snippet": snippet(s.text)}
                        for s, h in zip(group, lookup.hits)
                    ],
                    "timings_ms": {stage: round(ms, 2) for stage, ms in stages.items()}
                    | {"total": round(sum(stages.values()), 2), "batch": len(lookups)},
                }
            )
        return results

    def answer(self, question: str, k: int = DEFAULT_K, mode: str = "btr", max_k: int | None = None) -> dict:
        """One question: checked (k within ``max_k``, reader.answer's flag), looked up and read."""
        self.check(question, k, mode, max_k, "reader.answer's --max-k")
        return self.read([self.lookup(question, k)], mode)[0]


def snippet(text: str, width: int = 160) -> str:
    """The start of a passage, cut at a word boundary."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width].rsplit(" ", 1)[0] + " ..."


def question_lines(path: str) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, question, error) for each non-blank line of a questions JSONL file (or - for stdin)."""
    stream = sys.stdin.buffer if path == "-" else open(path, "rb")
    with stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                record = read_json(line.decode("utf-8"))
            except UnicodeDecodeError:
                yield number, None, "not valid UTF-8"
                continue
            except ValueError as error:  # a 5,000-digit number or deep nesting too: this line's error, not the run's
                yield number, None, str(error)
                continue
            question = record.get("question") if isinstance(record, dict) else None
            if not isinstance(question, str):
                yield number, None, 'needs a "question" string'
                continue
            yield number, question, None


def print_text(result: dict) -> None:
    if result.get("question_tokens_cut"):
        print(f"note: the question is longer than the reader takes; its last {result['question_tokens_cut']} "
              "tokens were not read")
    print(f"answer: {result['answer']}")
    for i, p in enumerate(result["passages"], 1):
        mark = "*" if result["source"] == i - 1 else " "
        print(f" {mark}[{i}] {p['title']} ({p['score']:.3f}): {p['snippet'][:110]}")
    print("  time (ms): " + ", ".join(f"{stage} {ms}" for stage, ms in result["timings_ms"].items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reader.answer", description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", help="the question (or use --questions)")
    parser.add_argument("--questions", help='JSONL file of {"question": ...} lines (- for stdin); one JSON answer per line')
    parser.add_argument("--index", default=DEFAULT_INDEX, help=f"index folder (default {DEFAULT_INDEX})")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help=f"passages to read (default {DEFAULT_K})")
    parser.add_argument(
        "--max-k", type=int, default=DEFAULT_MAX_K,
        help=f"the most --k may ask for (default {DEFAULT_MAX_K}; memory grows with k: 10,033 passages took over 10 GB)",
    )
    parser.add_argument("--mode", choices=MODES, default="btr")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    quiet_library_logs()
    if (args.question is None) == (args.questions is None):
        parser.error("give a question or --questions FILE, not both")
    errors = bad_input_errors()
    try:
        if args.question is not None and is_blank(args.question):
            raise ReaderInputError("the question is empty")
        if args.questions not in (None, "-") and not Path(args.questions).is_file():
            raise FileNotFoundError(f"questions file {args.questions} does not exist")
        answerer = Answerer(args.index)
        if args.question is not None:
            result = answerer.answer(args.question, args.k, args.mode, args.max_k)
            if args.json:
                print(json.dumps(result, ensure_ascii=False))
            else:
                print_text(result)
            return 0
    except DamagedIndex as error:  # before ``errors``: a corrupt record is also a ValueError
        print(f"error: {error}", file=sys.stderr)
        return DAMAGED_INDEX
    except errors as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed, damaged = 0, 0
    for number, question, problem in question_lines(args.questions):
        try:
            if problem:
                raise ReaderInputError(problem)
            result = answerer.answer(question, args.k, args.mode, args.max_k)
        except (DamagedIndex, *errors) as error:
            failed, damaged = failed + 1, damaged + isinstance(error, DamagedIndex)
            result = {"line": number, "error": str(error)}
            print(f"error: line {number}: {error}", file=sys.stderr)
        print(json.dumps(result, ensure_ascii=False), flush=True)
    return DAMAGED_INDEX if damaged else 2 if failed else 0


def run(argv: list[str] | None = None) -> int:
    """``main``, ended quietly when the reader of its output goes away (``| head``): exit status 141, as for SIGPIPE."""
    try:
        return main(argv)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or the interpreter's last flush fails again
        return 141


if __name__ == "__main__":
    sys.exit(run())
