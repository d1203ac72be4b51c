"""A synthetic open-domain QA task a small reader learns from scratch: people, facts, distractors.

    python -m flows.synthetic_qa --out data/synthetic [--people 1600] [--passages 4] [--values open|typed]
                                 [--train-questions 40000]

Each person (first name + last name from fixed lists) has one value for each of six relations
(birthplace, job, instrument, pet, colour, graduation year). Their passage (title: the name) states
three of the six, in random order. A question asks one relation of one person; its answer is a
span of that person's passage. The other passages of a question are people of the same type:
one shares the first name, one the last name, the rest are random, and each states the asked
relation with another value, so the reader must match the whole name and read the passage.
People are split into train and dev (no person in both). Lines are the training JSONL of
``flows.train_reader``.

Reading must be the only way to lower the loss, so by default (``--values open``) a value is any of
about 3,000 single-token words of the tokenizer's vocabulary per relation, not a short typed list
(the earlier task, ``--values typed``: a reader that guesses a relation's common value scores about 1
in ``passages`` and its loss sits on that floor, where every small T5 trained so far stayed), and
every training question draws its people's facts afresh (``--train-questions N``; 0: one question per
stated fact, facts fixed per person, so that train facts can be memorised).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

FIRST = """john mary james anna peter laura david emma paul sarah mark lucy george alice henry clara frank helen
oscar nora victor rosa simon julia martin ella hugo ruth felix irene leo diana arthur maria edward sofia louis grace
ivan olga""".split()
LAST = """smith brown miller wilson moore taylor clark lewis walker hall young king wright price ross adams nelson
carter mitchell roberts turner phillips campbell parker evans edwards collins stewart morris murphy cook rogers morgan
cooper peterson reed bailey bell kelly howard""".split()
# relation -> (passage sentence, question, values); {e} is the person, {v} the value
RELATIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "birthplace": ("{e} was born in {v}.", "where was {e} born?", tuple(
        "paris london berlin madrid rome vienna prague warsaw dublin lisbon athens oslo stockholm helsinki moscow "
        "cairo tokyo beijing delhi sydney toronto chicago boston denver seattle".split())),
    "job": ("{e} works as a {v}.", "what does {e} work as?", tuple(
        "teacher doctor lawyer farmer baker pilot nurse painter writer singer dancer chef sailor soldier engineer "
        "architect journalist banker carpenter plumber".split())),
    "instrument": ("{e} plays the {v}.", "which instrument does {e} play?", tuple(
        "piano violin guitar drums flute cello trumpet harp organ clarinet saxophone banjo".split())),
    "pet": ("{e} owns a {v}.", "what pet does {e} own?", tuple(
        "dog cat horse rabbit parrot goat hamster turtle snake pony".split())),
    "colour": ("the favourite colour of {e} is {v}.", "what is the favourite colour of {e}?", tuple(
        "red blue green yellow purple orange black white pink grey silver gold".split())),
    "year": ("{e} graduated in {v}.", "when did {e} graduate?", tuple(str(y) for y in range(1950, 2011))),
}
STATED = 3  # relations a passage states
TYPED = {relation: values for relation, (_, _, values) in RELATIONS.items()}


def open_values(tokenizer_folder: str | Path, per_relation: int = 3000) -> dict[str, tuple[str, ...]]:
    """Each relation's values: ``per_relation`` whole-word tokens of the folder's ``tokenizer.json``
    (lower-case letters, 4-12 long, none a name or a word of the templates), disjoint across relations."""
    vocab = json.loads((Path(tokenizer_folder) / "tokenizer.json").read_text())["model"]["vocab"]
    taken = set(FIRST) | set(LAST) | {w.strip(".?") for sentence, question, _ in RELATIONS.values()
                                       for w in f"{sentence} {question}".split()}
    words = sorted(w for w in vocab if w.isascii() and w.isalpha() and w.islower() and 4 <= len(w) <= 12 and w not in taken)
    if len(words) < per_relation * len(RELATIONS):
        raise ValueError(f"{tokenizer_folder}: {len(words)} usable words, {per_relation * len(RELATIONS)} wanted")
    random.Random(0).shuffle(words)
    return {r: tuple(words[i * per_relation:(i + 1) * per_relation]) for i, r in enumerate(RELATIONS)}


def facts(values: dict[str, tuple[str, ...]], rng: random.Random, asked: str | None = None, avoid: str | None = None) -> dict:
    """A value per relation and the relations a passage states (``asked`` among them, not valued ``avoid``)."""
    drawn = {r: rng.choice(choices) for r, choices in values.items()}
    while asked is not None and drawn[asked] == avoid:
        drawn[asked] = rng.choice(values[asked])
    stated = rng.sample(list(values), STATED)
    if asked is not None and asked not in stated:
        stated[rng.randrange(STATED)] = asked
    return {"facts": drawn, "stated": stated}


def people(count: int, rng: random.Random, values: dict[str, tuple[str, ...]] = TYPED) -> list[dict]:
    """``count`` distinct people, each with a value per relation and the relations their passage states."""
    names = [f"{f} {last}" for f in FIRST for last in LAST]
    if count > len(names):
        raise ValueError(f"at most {len(names)} people (names are first x last), asked for {count}")
    return [{"name": name} | facts(values, rng) for name in rng.sample(names, count)]


def passage(person: dict, rng: random.Random, must_state: str | None = None) -> dict:
    """The person's passage: their stated relations (``must_state`` swapped in if missing), shuffled."""
    stated = list(person["stated"])
    if must_state is not None and must_state not in stated:
        stated[rng.randrange(len(stated))] = must_state
    rng.shuffle(stated)
    text = " ".join(RELATIONS[r][0].format(e=person["name"], v=person["facts"][r]) for r in stated)
    return {"id": person["name"].replace(" ", "_"), "title": person["name"], "text": text}


def distractors(
    target: dict, pool: Sequence[dict], relation: str, count: int, rng: random.Random, namesakes: bool = True
) -> list[dict]:
    """``count`` other people stating ``relation`` with another value: a namesake by first, one by last name
    (unless not ``namesakes``: then no one sharing either name), then any."""
    value = target["facts"][relation]
    first, last = target["name"].split()
    others = [p for p in pool if p["name"] != target["name"] and p["facts"][relation] != value]
    if not namesakes:
        others = [p for p in others if not {first, last} & set(p["name"].split())]
    picked: list[dict] = []
    for match in (lambda p: p["name"].split()[0] == first, lambda p: p["name"].split()[1] == last) if namesakes else ():
        found = [p for p in others if match(p) and p not in picked]
        if found and len(picked) < count:
            picked.append(rng.choice(found))
    while len(picked) < count:
        candidate = rng.choice(others)
        if candidate not in picked:
            picked.append(candidate)
    return picked


def record(person: dict, relation: str, others: Sequence[dict], rng: random.Random) -> dict:
    """The question about ``person``'s ``relation``: their passage and the others' (stating it), shuffled."""
    passages = [passage(person, rng)] + [passage(other, rng, must_state=relation) for other in others]
    rng.shuffle(passages)  # the answer's passage anywhere among them
    return {"question": RELATIONS[relation][1].format(e=person["name"]), "answers": [person["facts"][relation]],
            "passages": passages, "relation": relation}


def questions(
    group: Sequence[dict], per_question: int, rng: random.Random, namesakes: bool = True,
    count: int = 0, values: dict[str, tuple[str, ...]] = TYPED,
) -> list[dict]:
    """Questions over ``group``, distractors drawn from ``group``. ``count`` 0: one per stated relation of every
    person, with their facts; else ``count`` questions about random people and relations, every person in a
    question (asked or distractor) given fresh facts from ``values``."""
    if not count:
        records = [record(person, relation, distractors(person, group, relation, per_question - 1, rng, namesakes), rng)
                   for person in group for relation in person["stated"]]
    else:
        records = []
        for _ in range(count):
            relation = rng.choice(list(values))
            person = {"name": rng.choice(group)["name"]} | facts(values, rng, relation)
            value = person["facts"][relation]
            others = [{"name": other["name"]} | facts(values, rng, relation, avoid=value)
                      for other in distractors(person, group, relation, per_question - 1, rng, namesakes)]
            records.append(record(person, relation, others, rng))
            for p in records[-1]["passages"]:  # a passage id names one text
                p["id"] += f"_{len(records)}"
    rng.shuffle(records)
    return records


LESSONS = ("sentence", "passage")  # a curriculum's easier questions, easiest first


def lesson(record: dict, level: str) -> dict:
    """``record`` made easier, for a curriculum: the asked person's passage alone ("passage": which of
    the three stated relations is asked), or cut to its sentence stating the answer ("sentence": copy
    the value). A randomly initialised T5 learns to copy from one sentence in a few hundred steps, and
    stays on its plateau for thousands when it must also choose the value among several (docs/fid.md)."""
    if level not in LESSONS:
        raise ValueError(f"unknown lesson {level!r}; expected one of {', '.join(LESSONS)}")
    asked = f" {record['question'].rstrip('?')} "
    owners = [p for p in record["passages"] if f" {p['title']} " in asked]
    if len(owners) != 1:
        raise ValueError(f"{record['question']!r}: {len(owners)} passages are titled with the asked name, not 1")
    [own] = owners
    if level == "sentence":
        own = own | {"text": RELATIONS[record["relation"]][0].format(e=own["title"], v=record["answers"][0])}
    return record | {"passages": [own]}


def generate(
    out: Path, people_count: int = 1600, per_question: int = 4, dev_share: float = 0.1, seed: int = 0, namesakes: bool = True,
    values: str = "typed", train_questions: int = 0, tokenizer: str | Path | None = None,
) -> dict:
    """Write train.jsonl and dev.jsonl under ``out``; returns their sizes. ``values``: "typed" (each relation's
    short list) or "open" (words of ``tokenizer``'s vocabulary, default the bundled all-MiniLM-L6-v2's);
    ``train_questions``: see ``questions``' ``count`` (dev always has one question per stated fact of each person)."""
    if per_question < 2:
        raise ValueError("a question needs its passage and at least one distractor (--passages >= 2)")
    if values not in ("typed", "open"):
        raise ValueError(f"values must be typed or open, not {values!r}")
    if values == "open":
        from reader.assets import minilm_path

        pools = open_values(tokenizer or minilm_path())
    else:
        pools = TYPED
    rng = random.Random(seed)
    everyone = people(people_count, rng, pools)
    split = int(len(everyone) * (1 - dev_share))
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, group, count in (("train", everyone[:split], train_questions), ("dev", everyone[split:], 0)):
        records = questions(group, per_question, rng, namesakes, count, pools)
        with open(out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        sizes[name] = len(records)
    summary = {"people": people_count, "passages_per_question": per_question, "questions": sizes, "seed": seed,
               "namesakes": namesakes, "values": values, "train_questions": train_questions,
               "fresh_facts": bool(train_questions)}
    (out / "task.json").write_text(json.dumps(summary) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m flows.synthetic_qa", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/synthetic",
                        help="folder for train.jsonl and dev.jsonl (default: %(default)s)")
    parser.add_argument("--people", type=int, default=1600,
                        help=f"people, split into train and dev (at most {len(FIRST) * len(LAST)}) (default: %(default)s)")
    parser.add_argument("--passages", type=int, default=4,
                        help="passages per question, the answer's and distractors (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of people, facts and questions (default: %(default)s)")
    parser.add_argument("--values", choices=("open", "typed"), default="open",
                        help="open: ~3,000 vocabulary words per relation; typed: each relation's short list, the earlier "
                             "task (default: %(default)s)")
    parser.add_argument("--train-questions", type=int, default=40000,
                        help="training questions, each with fresh facts; 0: one per stated fact, facts fixed per person "
                             "(default: %(default)s)")
    parser.add_argument("--tokenizer", help="folder whose tokenizer.json gives the open values (default: the bundled one)")
    parser.add_argument("--no-namesakes", action="store_true",
                        help="distractors share neither name with the person asked about, an easier task: half the name "
                             "tells (default: off)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(json.dumps(generate(Path(args.out), args.people, args.passages, seed=args.seed, namesakes=not args.no_namesakes,
                                  values=args.values, train_questions=args.train_questions, tokenizer=args.tokenizer)))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
