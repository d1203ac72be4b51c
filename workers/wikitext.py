"""MediaWiki markup to plain text, and DPR-style passages of about 100 words.

Good enough for retrieval passages, not a MediaWiki renderer: templates, tables, references,
files, categories and HTML tags go; links keep their label; emphasis and headings keep their text;
the trailing reference sections (References, External links, ...) are dropped.
"""

from __future__ import annotations

import html
import re

_TRAILING_SECTIONS = re.compile(
    r"^=+\s*(References|External links|See also|Notes|Further reading|Bibliography|Sources|Citations)\s*=+\s*$",
    re.IGNORECASE | re.MULTILINE,
)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
_DROP_TAGS = re.compile(r"<(math|gallery|timeline|score|syntaxhighlight|source|pre)[^>]*>.*?</\1>", re.DOTALL | re.IGNORECASE)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|[^{}]*?\|\}", re.DOTALL)
# Captions may hold [single brackets]; links inside them are resolved before this matches.
_MEDIA_LINK = re.compile(r"\[\[(?:File|Image|Media|Category):(?:[^\[\]]|\[[^\[\]]*\])*\]\]", re.IGNORECASE)
_LABELLED_LINK = re.compile(r"\[\[[^\[\]|]*\|([^\[\]]*)\]\]")
_LINK = re.compile(r"\[\[([^\[\]|]*)\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_EMPHASIS = re.compile(r"'{2,5}")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.MULTILINE)
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.MULTILINE)
_MAGIC = re.compile(r"__[A-Z]+__")
_SPACE = re.compile(r"\s+")


def _remove_nested(pattern: re.Pattern, text: str) -> str:
    """Remove innermost matches until none are left (templates and tables nest)."""
    while True:
        text, count = pattern.subn(" ", text)
        if not count:
            return text


def article_body(wikitext: str) -> str:
    """The article's wikitext before its trailing reference sections (References, External links, ...)."""
    trailing = _TRAILING_SECTIONS.search(wikitext)
    return wikitext[: trailing.start()] if trailing else wikitext


def strip_markup(wikitext: str) -> str:
    """Plain text of an article's wikitext."""
    text = _COMMENT.sub(" ", article_body(wikitext))
    text = _REF.sub(" ", text)
    text = _DROP_TAGS.sub(" ", text)
    text = _remove_nested(_TEMPLATE, text)
    text = _remove_nested(_TABLE, text)
    # Media links may hold ordinary links in their captions: resolve the innermost links first,
    # dropping media links as soon as they have no brackets left inside.
    for _ in range(4):
        text = _MEDIA_LINK.sub(" ", text)
        text = _LINK.sub(r"\1", _LABELLED_LINK.sub(r"\1", text))
    text = _EXTERNAL_LINK.sub(r"\1", text)
    text = _TAG.sub(" ", text)
    text = _EMPHASIS.sub("", text)
    text = _HEADING.sub(r"\1.", text)
    text = _LIST_MARK.sub("", text)
    text = _MAGIC.sub(" ", text)
    text = html.unescape(text).replace("\u00a0", " ")
    return _SPACE.sub(" ", text).strip()


def split_words(text: str, words: int = 100) -> list[str]:
    """Disjoint passages of ``words`` words (the last may be shorter), as DPR built psgs_w100."""
    tokens = text.split()
    return [" ".join(tokens[i : i + words]) for i in range(0, len(tokens), words)]
