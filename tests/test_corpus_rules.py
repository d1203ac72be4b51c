"""Corpus rules (issue 44): no malformed record stops a run, in any format; one text rule for questions and passages.

Each test failed before its fix: one malformed record (an id over 65,535 bytes, a lone surrogate, a
number over 4,300 digits, a line nested 100,000 deep, a DPR field over csv's 131,072 characters)
failed the whole normalize step; duplicate ids were indexed; a passage of control characters was
indexed though the same string was refused as a question.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reader.assets import wikipedia_sample
from reader.inputs import clean_text, is_blank
from storage.verify import main as verify_main
from workers.corpus import MAX_TEXT_CHARS, normalize, read_corpus, read_rows

GOOD = wikipedia_sample(200, min_words=30)


def good_records() -> list[dict]:
    return [{"id": f"p{i}", "title": p.title, "text": p.text} for i, p in enumerate(GOOD)]


# What every format can hold, the reason each gives (the same in every format: the rules are written once).
BAD = [
    ({"id": "x" * 70_000, "title": "Long id", "text": "An id past what a record stores."}, "id is 70,000 UTF-8 bytes; the limit is 1,000"),
    ({"id": "t1", "title": "T" * 5_000, "text": "A five-thousand-character title."}, "title is 5,000 characters; the limit is 1,000"),
    ({"id": "c1", "title": "Control", "text": "\x01\u200b\x7f\u2028"}, "empty text"),
    ({"id": "e1", "title": "Emoji", "text": "\U0001f600 \u0301\u0301 \ue000 !?"}, "empty text"),
    ({"id": "h1", "title": "Huge", "text": "word " * 5_000}, f"text is 24,999 characters; the limit is {MAX_TEXT_CHARS:,}"),
    ({"id": "p3", "title": "Again", "text": "A second passage under an id already used."}, "duplicate id 'p3': the first record with this id is kept"),
]


def reasons(summary) -> list[str]:
    return [json.loads(line)["reason"] for line in open(summary.rejects_path)]


def test_a_jsonl_corpus_with_one_of_each_bad_record_among_200_normalizes_to_the_200(tmp_path):
    lines = [json.dumps(r).encode() for r in good_records()]
    special = [  # what only JSON lines can hold, and the reason each gives
        (json.dumps({"id": "s1", "title": "Surrogate", "text": "half \ud800 a pair"}).encode(),
         "field 'text' is not valid Unicode (a lone surrogate at character 5)"),
        (b'{"id": ' + b"7" * 5_000 + b', "title": "Digits", "text": "A long number."}',
         "not JSON this reads (Exceeds the limit (4300 digits) for integer string conversion)"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON this reads (nested too deeply)"),
    ]
    bad = [(json.dumps(r).encode(), reason) for r, reason in BAD] + special
    for n, (line, _) in enumerate(bad):  # spread among the good lines
        lines.insert(10 + 17 * n, line)
    (tmp_path / "corpus.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    summary = normalize(tmp_path / "corpus.jsonl", "jsonl", tmp_path / "out")
    assert (summary.passages, summary.rejects) == (200, len(bad))
    assert reasons(summary) == [reason for _, reason in bad]
    wheres = [json.loads(line)["where"] for line in open(summary.rejects_path)]
    assert wheres == [f"line {11 + 17 * n}" for n in range(len(bad))]
    passages = read_rows(summary.path, 0, 200)
    assert [p.id for p in passages] == [f"p{i}" for i in range(200)]
    assert passages[3].text == clean_text(GOOD[3].text)  # the first p3 is kept


def test_the_200_good_records_index_and_verify(tmp_path, answering_index):
    records = good_records() + [r for r, _ in BAD]
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    summary = normalize(tmp_path / "corpus.jsonl", "jsonl", tmp_path / "out")
    assert (summary.passages, summary.rejects) == (200, len(BAD))
    answering_index(tmp_path / "index", read_rows(summary.path, 0, summary.passages))
    assert verify_main([str(tmp_path / "index")]) == 0


def write_dpr(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("id\ttext\ttitle\n")
        for r in records:
            f.write(f"{r['id']}\t{r['text']}\t{r['title']}\n")


def write_parquet(path: Path, records: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(records), path)


def write_sample(path: Path, records: list[dict]) -> None:  # the bundled sample's layout: id -> {title, extract}
    pairs = [f"{json.dumps(r['id'])}: {json.dumps({'title': r['title'], 'extract': r['text']})}" for r in records]
    path.write_text("{" + ", ".join(pairs) + "}")  # written by hand: a dict would drop the duplicate key


@pytest.mark.parametrize("fmt, write", [("dpr", write_dpr), ("parquet", write_parquet), ("sample", write_sample)])
def test_every_format_applies_the_same_rules(tmp_path, fmt, write):
    write(tmp_path / "corpus", good_records()[:20] + [r for r, _ in BAD])
    summary = normalize(tmp_path / "corpus", fmt, tmp_path / "out")
    assert (summary.passages, reasons(summary)) == (20, [reason for _, reason in BAD])


def test_a_dpr_field_past_csvs_limit_is_a_reject_by_the_text_rule(tmp_path):
    records = good_records()[:5] + [{"id": "big", "title": "Big", "text": "y" * 140_000}]
    write_dpr(tmp_path / "psgs.tsv", records)
    (tmp_path / "psgs.tsv").open("a").write("nul\t\x00\x00\tOnly NULs\n")
    summary = normalize(tmp_path / "psgs.tsv", "dpr", tmp_path / "out")
    assert summary.passages == 5
    assert reasons(summary) == [f"text is 140,000 characters; the limit is {MAX_TEXT_CHARS:,}", "empty text"]


def test_a_wikixml_page_title_past_the_limit_is_rejected(tmp_path):
    page = "<page><title>{title}</title><ns>0</ns><id>{id}</id><revision><text>{text}</text></revision></page>"
    pages = [page.format(title="Nile", id=1, text="The Nile is a river in Africa."),
             page.format(title="N" * 2_000, id=2, text="A page with a title too long.")]
    (tmp_path / "dump.xml").write_text(f"<mediawiki>{''.join(pages)}</mediawiki>")
    items = list(read_corpus(tmp_path / "dump.xml", "wikixml"))
    assert [getattr(i, "id", None) or i.reason for i in items] == ["1-0", "title is 2,000 characters; the limit is 1,000"]


def test_one_rule_for_empty_and_one_form_for_questions_and_passages():
    assert clean_text("\u3000ｗｈｏ ｗｒｏｔｅ ｄｒａｃｕｌａ？ ") == "who wrote dracula?"
    assert clean_text("ﬁsh\u00a0and\u2009chips") == "fish and chips"
    for blank in ("", " \t", "\x00\x00", "\u200b\u2028", "\U0001f600\U0001f4a9", "\u0301\u0308", "\ue000\uf8ff", "?!-"):
        assert is_blank(blank), repr(blank)
    for text in ("a", "7", "\U0001f600 why", "Éire", "北京", "x\u0301"):
        assert not is_blank(text), repr(text)
