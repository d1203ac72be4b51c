"""Corpus readers: every format, every reason a record is rejected, the normalized parquet."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers.corpus import CorpusError, Reject, normalize, read_corpus, read_rows
from workers.wikitext import split_words, strip_markup

DUMP = Path(__file__).parent / "fixtures" / "enwiki-excerpt.xml.bz2"


def test_wikipedia_dump_excerpt_becomes_clean_100_word_passages(tmp_path):
    items = list(read_corpus(DUMP, "wikixml"))
    passages = [p for p in items if not isinstance(p, Reject)]
    titles = {p.title for p in passages}
    assert len(titles) == 106 and len(passages) > 4000
    assert "Anarchism" in titles and "AccessibleComputing" not in titles  # redirects are skipped
    assert all(len(p.text.split()) <= 100 for p in passages)
    for marker in ("[[", "]]", "<ref", "</", "'''", "&nbsp;"):
        assert not any(marker in p.text for p in passages), marker
    # Templates whose arguments hold literal braces (the ASCII table) are the one known leftover.
    leftovers = {p.title for p in passages if "{{" in p.text or "{|" in p.text}
    assert leftovers <= {"ASCII"}
    first = next(p for p in passages if p.title == "Anarchism")
    assert first.id == "12-0" and first.text.startswith("Anarchism is a political philosophy")


def test_markup_rules():
    text = strip_markup(
        "'''Paris''' is the [[capital city|capital]] of [[France]].{{Infobox|a={{nested}}}}<ref>cite</ref> "
        "[[File:Paris.jpg|thumb|A [[view]]]] See [http://example.org the site].\n== History ==\n* Founded.\n"
        "== References ==\n* a reference"
    )
    assert text == "Paris is the capital of France. See the site. History. Founded."
    assert split_words("a b c d e", 2) == ["a b", "c d", "e"]


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_dpr_tsv_with_every_kind_of_bad_record(tmp_path):
    path = write_lines(
        tmp_path / "psgs.tsv",
        [
            b"id\ttext\ttitle",
            b'1\t"Aaron is a prophet, high priest."\tAaron',
            b"2\tonly two fields",
            b"3\t\tEmpty",
            b"4\t\xff\xfe broken utf-8\tBroken",
            b"5\t" + b"x" * 30000 + b"\tHuge",
            b"6\tThe Nile is a river.\tNile",
        ],
    )
    summary = normalize(path, "dpr", tmp_path / "out")
    assert (summary.passages, summary.rejects) == (2, 4)
    rejects = [json.loads(line) for line in open(summary.rejects_path)]
    assert [r["where"] for r in rejects] == ["line 3", "line 4", "line 5", "line 6"]
    assert "expected 3" in rejects[0]["reason"] and rejects[1]["reason"] == "empty text"
    assert rejects[2]["reason"] == "invalid UTF-8" and "limit" in rejects[3]["reason"]
    passages = read_rows(summary.path, 0, 2)
    assert [(p.id, p.title, p.text) for p in passages] == [
        ("1", "Aaron", "Aaron is a prophet, high priest."), ("6", "Nile", "The Nile is a river.")
    ]


def test_jsonl_rejects(tmp_path):
    path = write_lines(
        tmp_path / "c.jsonl",
        [
            json.dumps({"id": "a", "title": "A", "text": "Alpha text."}).encode(),
            b"{not json",
            b"[1, 2]",
            json.dumps({"id": "b", "title": "B"}).encode(),
            json.dumps({"id": 7, "title": "C", "text": "Seven."}).encode(),
        ],
    )
    items = list(read_corpus(path, "jsonl"))
    assert [getattr(i, "id", None) for i in items] == ["a", None, None, None, "7"]
    assert [i.reason for i in items if isinstance(i, Reject)] == [
        "not JSON (Expecting property name enclosed in double quotes)", "not a JSON object", "missing field 'text'"
    ]


def test_parquet_in_the_wikipedia_dump_layout(tmp_path):
    table = pa.table({
        "id": pa.array([12, 25, 39]),
        "url": ["u1", "u2", "u3"],
        "title": ["Anarchism", "Autism", "Albedo"],
        "text": ["Anarchism is a philosophy.", None, "Albedo is reflectance."],
    })
    pq.write_table(table, tmp_path / "wiki.parquet")
    items = list(read_corpus(tmp_path / "wiki.parquet", "parquet"))
    assert [i.id if not isinstance(i, Reject) else i.reason for i in items] == ["12", "missing field 'text'", "39"]
    pq.write_table(table.drop(["title"]), tmp_path / "bad.parquet")
    with pytest.raises(CorpusError, match="no column title"):
        list(read_corpus(tmp_path / "bad.parquet", "parquet"))


def test_bundled_sample_and_row_ranges_across_row_groups(tmp_path):
    summary = normalize(None, "sample", tmp_path, row_group=1000)
    assert (summary.passages, summary.rejects) == (10033, 0)
    rows = read_rows(summary.path, 995, 1005)
    everything = pq.read_table(summary.path).slice(995, 10).to_pylist()
    assert [p.id for p in rows] == [r["id"] for r in everything]
    assert read_rows(summary.path, 10030, 10040)[-1].title == "Zoroastrianism"


def test_normalizing_is_deterministic(tmp_path):
    a = normalize(DUMP, "wikixml", tmp_path / "a")
    b = normalize(DUMP, "wikixml", tmp_path / "b")
    assert pq.read_table(a.path).equals(pq.read_table(b.path))


def test_whole_corpus_errors(tmp_path):
    with pytest.raises(CorpusError, match="unknown corpus format"):
        read_corpus(tmp_path, "csv")
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus(tmp_path / "missing.tsv", "dpr")


def test_an_index_folder_refuses_to_resume_a_build_of_something_else(tmp_path):
    from flows.index_wikipedia import check_plan

    plan = {"corpus": "/data/a.tsv", "corpus_format": "dpr", "shard_size": 1000}
    check_plan(tmp_path, plan)
    check_plan(tmp_path, dict(plan))  # the same build resumes
    with pytest.raises(ValueError, match="corpus, shard_size differ"):
        check_plan(tmp_path, {**plan, "corpus": "/data/b.tsv", "shard_size": 500})


def test_every_flag_of_the_index_command_says_what_it_does_and_its_default(monkeypatch):
    """`--help` of flows.index_wikipedia: text and a default for every flag, and --corpus-format lists the formats
    the corpus reader knows (the parser spells them out, so that --help imports neither pyarrow nor torch)."""
    from flows.index_wikipedia import build_parser
    from workers.corpus import FORMATS

    parser = build_parser()
    flags = [a for a in parser._actions if a.dest != "help"]
    assert len(flags) == 17
    for action in flags:
        assert action.help and ("%(default)s" in action.help or "(default: " in action.help), action.option_strings
    [fmt] = [a for a in flags if a.dest == "corpus_format"]
    assert fmt.choices == ("auto", *FORMATS) and all(f"{name}:" in fmt.help for name in fmt.choices)
    monkeypatch.setenv("COLUMNS", "1000")  # no word wrapped inside a default
    options = parser.format_help().split("\noptions:\n")[1]
    said = {block.split()[0]: " ".join(block.split()) for block in options.split("\n  --")}
    assert said["index"].endswith("(default: indexes/wikipedia-sample)")
    assert said["offline-merge"].endswith("(default: 0.2)") and said["update"].endswith("(default: off)")
    assert said["compact"].endswith("(default: off)") and said["compact-threshold"].endswith("(default: 0.1)")


def test_the_default_format_comes_from_the_corpus_file_name(tmp_path):
    """--corpus-format auto (the default): a user's `--corpus x.jsonl` is read as JSONL, not as the sample's JSON
    (which refused it, "not the sample's JSON", for want of a second flag); a name that says nothing is refused
    with the flag to use."""
    from workers.corpus import CorpusError, corpus_format, read_corpus

    expected = {"a.jsonl": "jsonl", "A.JSONL": "jsonl", "w.parquet": "parquet", "psgs_w100.tsv": "dpr",
                "dump.xml": "wikixml", "enwiki-pages.xml.bz2": "wikixml", "summaries.json": "sample"}
    assert {name: corpus_format(tmp_path / name) for name in expected} == expected
    assert corpus_format(None) == "sample" and corpus_format("a.jsonl", "dpr") == "dpr"  # a named format wins
    with pytest.raises(CorpusError, match="--corpus-format"):
        corpus_format(tmp_path / "corpus.txt")
    path = tmp_path / "mine.jsonl"
    path.write_text('{"id": "d", "title": "Danube", "text": "The Danube flows into the Black Sea."}\n')
    [passage] = list(read_corpus(path, "auto"))
    assert (passage.id, passage.title) == ("d", "Danube")
