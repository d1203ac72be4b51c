"""The figures the pages repeat come from one place (docs/figures.json, bench.figures): the pages agree with it."""

from __future__ import annotations

import json

from bench import figures


def test_every_page_says_what_figures_json_says():
    values = figures.figure_values()
    assert not figures.disagreements(values), "run `python -m bench.figures --write` after changing docs/figures.json"
    quoted = sum(page.read_text().count("<!--fig:") for page in figures.pages())
    assert quoted >= 10 and {"reader_speedup", "make_test", "demo_answer", "nq_test_em"} <= set(values)


def test_a_page_that_disagrees_is_named_and_write_mends_it(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "em.json").write_text(json.dumps({"sets": {"nq": {"em": 7.666}}}))
    spec = tmp_path / "docs" / "figures.json"
    spec.write_text(json.dumps({
        "speed": {"value": "4.18x"},
        "em": {"from": "results/em.json", "key": "sets.nq.em", "format": "{:.1f}"},
        "answer": {"value": "Stanley Kubrick", "after": "==> ask", "line": "answer: {}"},
    }))
    readme = tmp_path / "README.md"
    readme.write_text("fast: <!--fig:speed-->4.18x<!--/fig-->, EM <!--fig:em-->7.3<!--/fig-->\n```\n==> ask\nanswer: Kubrick\n```\n")
    (tmp_path / "docs" / "a.md").write_text("again <!--fig:speed-->4.2x<!--/fig--> and <!--fig:gone-->1<!--/fig-->\n")
    values = figures.figure_values(spec, tmp_path)
    assert values == {"speed": "4.18x", "em": "7.7", "answer": "Stanley Kubrick"}
    rules = figures.load(spec)
    found = figures.disagreements(values, tmp_path, rules)
    assert sorted(found) == sorted([
        "README.md: em says '7.3', figures.json '7.7'",
        "README.md: answer says 'answer: Kubrick', figures.json 'answer: Stanley Kubrick'",
        "docs/a.md: speed says '4.2x', figures.json '4.18x'",
        "docs/a.md: gone is not in figures.json",
    ])
    figures.write(values, tmp_path, rules)
    assert figures.disagreements(values, tmp_path, rules) == ["docs/a.md: gone is not in figures.json"]
    assert "answer: Stanley Kubrick" in readme.read_text() and "<!--fig:em-->7.7<!--/fig-->" in readme.read_text()
