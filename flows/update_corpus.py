"""A changed copy of a corpus, to try `--update` on: some passages edited, some added, some deleted (seeded).

    python -m flows.update_corpus --out data/sample-changed.jsonl                # the bundled sample, 1% changed
    python -m flows.update_corpus --corpus C --corpus-format jsonl --out NEW.jsonl --edited 50 --added 30 --deleted 20

Reads the corpus as the index flow does (same ids), writes the new one as JSONL and, beside it,
``NEW.changes.json``: the ids edited (with their new text), added and deleted, for checking an update.
An edited passage gets one sentence appended; an added one is a new id whose text joins sentences of
two passages that stay.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from storage.record import Passage
from workers.corpus import Reject, read_corpus


def changed_corpus(passages: list[Passage], edited: int, added: int, deleted: int, seed: int = 0) -> tuple[list[Passage], dict]:
    """The new corpus (corpus order kept, additions at the end) and what changed."""
    rng = random.Random(seed)
    picked = rng.sample(range(len(passages)), edited + deleted)
    edit, drop = set(picked[:edited]), set(picked[edited:])
    out, changes = [], {"edited": {}, "added": {}, "deleted": sorted(passages[i].id for i in drop)}
    for i, passage in enumerate(passages):
        if i in drop:
            continue
        if i in edit:
            text = f"{passage.text} In the revised edition, {passage.title} is listed under catalogue number {rng.randrange(10**6)}."
            passage = Passage(passage.title, text, passage.id)
            changes["edited"][passage.id] = text
        out.append(passage)
    kept = [p for i, p in enumerate(passages) if i not in drop]
    for n in range(added):
        a, b = rng.sample(kept, 2)
        text = f"{a.text.split('. ')[0]}. {b.text.split('. ')[0]}."
        passage = Passage(f"{a.title} and {b.title}", text, f"added-{seed}-{n}")
        changes["added"][passage.id] = text
        out.append(passage)
    return out, changes


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m flows.update_corpus", description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=None, help="the corpus (default: the bundled sample)")
    parser.add_argument("--corpus-format", default="auto",
                        help="how --corpus is read (workers.corpus): sample, jsonl, dpr, parquet, wikixml, or auto: the "
                             "bundled sample without --corpus, else from the file's name (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N passages, for an index built of a slice (default: all)")
    parser.add_argument("--out", type=Path, required=True,
                        help="the new corpus, JSONL; NEW.changes.json is written beside it (required)")
    parser.add_argument("--edited", type=int, default=50,
                        help="passages edited: a sentence appended (default: %(default)s)")
    parser.add_argument("--added", type=int, default=30,
                        help="passages added, each joining sentences of two passages that stay (default: %(default)s)")
    parser.add_argument("--deleted", type=int, default=20, help="passages deleted (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random choice of passages (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    passages = [p for p in read_corpus(args.corpus, args.corpus_format) if not isinstance(p, Reject)][: args.limit]
    new, changes = changed_corpus(passages, args.edited, args.added, args.deleted, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for p in new:
            f.write(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n")
    args.out.with_suffix(".changes.json").write_text(json.dumps(changes, indent=1))
    print(f"{args.out}: {len(new)} passages ({len(changes['edited'])} edited, {len(changes['added'])} added, "
          f"{len(changes['deleted'])} deleted of {len(passages)})")


if __name__ == "__main__":
    main()
