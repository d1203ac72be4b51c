"""The query path over a BTR index: retrieve, read the records, decode the bits, run the reader.

``Answerer`` is what every way in shares: ``reader.answer`` (one question or a file of them),
``reader.serve`` (batches concurrent questions through ``lookup`` and ``read``), ``reader.evaluate``
and the Python API (``reader.api``). Loading it imports torch and the index's reader family (and
only that family); the commands import this module after parsing their flags.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from storage.bits import IncompatibleRepresentation
from storage.identity import IncompatibleIndex
from storage.index import Index, Manifest
from storage.record import CorruptRecord
from storage.shard import DamagedIndex, repair_hint

from .answer import DEFAULT_K
from .config import check_mode
from .device import resolve
from .inputs import ReaderInputError, clean_text, passage_string
from .load import ReaderSpec, load_reader
from .model_pass import run_reader, timed
from .retriever import Hit, Retriever
from .spans import whole_name


def bad_input_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean bad input (question, index, options), reported without a traceback."""
    return ReaderInputError, IncompatibleIndex, IncompatibleRepresentation, CorruptRecord, FileNotFoundError, ValueError


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

    def __init__(
        self, index: Path | str, text_reader: str | None = None, pool: int | None = None,
        device: str = "cpu", dtype: str = "auto", whole_names: bool = True, light: bool = True,
    ) -> None:
        """Load the index and the reader that built it.

        ``text_reader``: another checkpoint of the same family to read passage *text* with (baseline
        and split modes only; the index's bits belong to the reader that built it). ``pool``: the
        extractive reader's answer pool (spans weighed per answer string; 1 = the single best span),
        instead of its default. ``device``, ``dtype``: where the reader runs (``reader.device``: auto,
        cpu, cuda[:N]; auto, float32, bfloat16, float16); DeviceUnavailable (a ValueError) for a GPU
        this machine lacks. The commands default to ``auto``; this class to the CPU in float32.
        ``whole_names``: an extracted span is widened to the whole name it stops inside
        (``reader.spans.whole_name``); off: the reader's span as it chose it. ``light``: BERT checkpoints (reader and
        question encoder) read without transformers' model classes (``reader.bert``: the same weights and answers,
        seconds less start-up); False: through transformers, as training and indexing read them.
        """
        device, dtype = resolve(device, dtype)  # before any loading: a missing GPU is refused at once
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
        self.whole_names = whole_names
        if self.text_only:
            spec = ReaderSpec(spec.family, text_reader, None, spec.max_passage_tokens)
        reader = load_reader(spec, light=light)  # float32 on the CPU: the weights an index records the digest of
        if pool is not None:
            if not hasattr(reader, "pool"):
                raise ValueError(f"--pool applies to extractive readers; {spec.family} generates its answers")
            reader.pool = pool  # checked by the reader
        self.identity = reader.identity()  # computed once, before the weights move (the digest covers their dtype)
        self.index = Index.open(index, expect=None if self.text_only else self.identity)
        self.reader = reader.to(device=device, dtype=dtype)  # moved once; the bits are unpacked there too
        try:
            self.retriever = Retriever(index, store=self.index, light=light)  # the version self.index opened
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
        outputs = run_reader(reader, [l.question for l in lookups], groups, scores, mode, timings)
        extracts = hasattr(reader, "span_offsets")  # a span to cite, or (FiD) generated text
        results = []
        for lookup, group, output in zip(lookups, stored, outputs):
            source = context = span = None
            if not extracts:  # FiD: cite the passage the answer attended to most
                text, source = output.text, output.passage
                context = passage_string(group[source].passage)
            else:  # a span: slice the text the reader read of the cited passage, widened to a whole name
                source, passage = output.passage, group[output.passage].passage
                context = passage_string(passage)
                span = reader.span_offsets(passage, output.start, output.end)
                span = whole_name(context, *span) if self.whole_names else span
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
