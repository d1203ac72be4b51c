"""MediaWiki markup to text: workers.wikitext (regular expressions) against mwparserfromhell's strip_code.

    python -m bench.wikitext --json        # the gensim excerpt of tests/fixtures (206 pages, 2016)

Both run on the same articles (``workers.corpus.wiki_articles``: redirects and other namespaces
skipped) cut at the same trailing reference sections (``article_body``), so what differs is the
markup removal alone. Speed: the best of ``--repeat`` passes over every article. Quality, with no
hand-made reference text to hand: words kept, and markup left in the text (per 1,000 words, by kind),
which a passage's reader reads as noise. mwparserfromhell is not a dependency of the project: this
needs ``pip install mwparserfromhell``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from workers.corpus import wiki_articles
from workers.wikitext import article_body, strip_markup

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "enwiki-excerpt.xml.bz2"
# Markup a reader should never see in a passage, by kind.
RESIDUE = {
    "links [[ ]]": re.compile(r"\[\[|\]\]"),
    "templates {{ }}": re.compile(r"\{\{|\}\}"),
    "tables {| |} |-": re.compile(r"\{\||\|\}|\|-"),
    "pipes |": re.compile(r"\|"),
    "tags < >": re.compile(r"<[^>]{0,40}>"),
    "emphasis ''": re.compile(r"''"),
    "headings ==": re.compile(r"=="),
    "image options (thumb, 200px)": re.compile(r"\bthumb(?:nail)?\b|\b\d+px\b"),
    "namespaces (File:, Category:)": re.compile(r"\b(?:File|Image|Category):"),
    "attributes (style=, align=)": re.compile(r"\b(?:style|class|align|width|colspan|rowspan|bgcolor)\s*="),
    "entities (&amp;)": re.compile(r"&[a-z]+;|&#\d+;"),
}


def strip_code(wikitext: str) -> str:
    """mwparserfromhell's plain text of the same article body, whitespace collapsed as ours."""
    import mwparserfromhell

    text = mwparserfromhell.parse(article_body(wikitext)).strip_code(normalize=True, collapse=True)
    return " ".join(text.split())


def measure(articles: list[str], strip: Callable[[str], str], repeat: int) -> dict:
    """Seconds (best pass), throughput, words kept and markup residue of one stripper."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        texts = [strip(a) for a in articles]
        best = min(best, time.perf_counter() - start)
    joined = "\n".join(texts)
    words = len(joined.split())
    residue = {kind: len(pattern.findall(joined)) for kind, pattern in RESIDUE.items()}
    megabytes = sum(len(a.encode()) for a in articles) / 1e6
    return {
        "seconds": round(best, 3), "pages_per_s": round(len(articles) / best, 1), "mb_per_s": round(megabytes / best, 2),
        "words": words, "residue_per_1000_words": round(1000 * sum(residue.values()) / max(words, 1), 2),
        "residue": residue, "empty_pages": sum(not t for t in texts),
    }


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m bench.wikitext", description=__doc__.splitlines()[0])
    parser.add_argument("--dump", type=Path, default=FIXTURE,
                        help="a MediaWiki XML dump, .xml or .xml.bz2 "
                             "(default: tests/fixtures/enwiki-excerpt.xml.bz2, 206 pages)")
    parser.add_argument("--repeat", type=int, default=3, help="passes timed; the best counts (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (default: off, a summary)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import mwparserfromhell
    except ImportError:
        print("error: this comparison needs mwparserfromhell (pip install mwparserfromhell)", file=sys.stderr)
        return 2
    articles = [wikitext for _, _, wikitext in wiki_articles(args.dump)]
    result = {
        "dump": args.dump.name, "articles": len(articles), "megabytes": round(sum(len(a.encode()) for a in articles) / 1e6, 2),
        "regex": measure(articles, strip_markup, args.repeat),
        "mwparserfromhell": measure(articles, strip_code, args.repeat) | {"version": mwparserfromhell.__version__},
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['articles']} articles, {result['megabytes']} MB of wikitext ({result['dump']})")
    for name in ("regex", "mwparserfromhell"):
        r = result[name]
        print(f"  {name:17s} {r['seconds']:7.2f} s ({r['mb_per_s']} MB/s), {r['words']:,} words, "
              f"{r['residue_per_1000_words']} markup left per 1,000 words")
    print("  markup left, regex / mwparserfromhell:")
    for kind in RESIDUE:
        print(f"    {kind:32s} {result['regex']['residue'][kind]:6d} / {result['mwparserfromhell']['residue'][kind]:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
