"""Answer questions from a BTR index, citing the passages each answer drew on.

    python -m reader.answer "who directed 2001: A Space Odyssey?" [--index DIR] [--k 5] [--mode btr] [--json] [--device cuda]
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
from collections.abc import Iterator
from pathlib import Path

# Light imports only: ``--help`` and a bad flag answer at once. The query path (torch, the index's
# reader family, faiss) lives in reader.query, imported by main() once the flags are parsed.
from .config import MODES
from .device import add_device_arguments

DEFAULT_INDEX = "indexes/wikipedia-sample"
DEFAULT_K = 5
DEFAULT_MAX_K = 100  # the most passages one question may read, here and in reader.serve (memory grows with k)
DAMAGED_INDEX = 3  # exit status: the index is damaged (2 is the user's bad input)
# what ``from reader.answer import Answerer`` finds in reader.query (imported on first use)
QUERY_NAMES = {"Answerer", "Lookup", "bad_input_errors", "snippet", "timed"}


def __getattr__(name: str):
    """The query path's names, from reader.query when first asked for (this module stays light)."""
    if name in QUERY_NAMES:
        from . import query

        return getattr(query, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def question_lines(path: str) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, question, error) for each non-blank line of a questions JSONL file (or - for stdin)."""
    from .inputs import read_json  # torch comes with it: imported when a file is read, not for --help

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


def build_parser() -> argparse.ArgumentParser:
    """The command's flags (no heavy import: ``--help`` answers at once)."""
    parser = argparse.ArgumentParser(prog="python -m reader.answer", description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", help="the question (or use --questions)")
    parser.add_argument("--questions",
                        help='JSONL file of {"question": ...} lines (- for stdin); one JSON answer per line '
                             "(default: the one question given)")
    parser.add_argument("--index", default=DEFAULT_INDEX, help="index folder (default: %(default)s)")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="passages to read (default: %(default)s)")
    parser.add_argument(
        "--max-k", type=int, default=DEFAULT_MAX_K,
        help="the most --k may ask for; memory grows with k: 10,033 passages took over 10 GB (default: %(default)s)",
    )
    parser.add_argument("--mode", choices=MODES, default="btr",
                        help="btr: passages from the index's 1-bit tokens; split: their text through the lower layers at "
                             "question time, no bits; baseline: the unsplit reader over question + passage text "
                             "(default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (default: off, text)")
    add_device_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.question is None) == (args.questions is None):
        parser.error("give a question or --questions FILE, not both")
    from storage.shard import DamagedIndex  # the query path, now that the flags are good

    from .inputs import ReaderInputError, is_blank
    from .load import quiet_library_logs
    from .query import Answerer, bad_input_errors

    quiet_library_logs()
    errors = bad_input_errors()
    try:
        if args.question is not None and is_blank(args.question):
            raise ReaderInputError("the question is empty")
        if args.questions not in (None, "-") and not Path(args.questions).is_file():
            raise FileNotFoundError(f"questions file {args.questions} does not exist")
        answerer = Answerer(args.index, device=args.device, dtype=args.dtype)
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
