"""Training: generated QA data, the three stages' losses, resuming, and the train-reader flow."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np

import pytest
import torch

from flows.qa_data import article_questions, generate, is_dev, sentence_questions
from reader.config import BTRConfig
from reader.load import ReaderSpec, load_reader
from storage.record import Passage
import reader.train as train_module
from reader.supervision import Example, TrainingDataError, answer_spans, batch_order, read_examples, targets, to_example
from reader.merge import Tokens
from reader.losses import distillation_loss, span_distillation_loss, span_loss
from reader.train import Stage, chain, stage_losses, stage_done, train_stage

FACTS = [
    ("Eiffel Tower", "The Eiffel Tower is a tower in Paris. It was completed in 1889 for the World's Fair.", "1889"),
    ("Danube", "The Danube is a river in Europe. It flows through 10 countries into the Black Sea.", "Black Sea"),
    ("Hamlet", "Hamlet is a tragedy written by William Shakespeare. It is set in Denmark.", "William Shakespeare"),
    ("Mount Fuji", "Mount Fuji is a volcano on the island of Honshu. It last erupted in 1707.", "1707"),
]


def examples() -> list[Example]:
    passages = [Passage(title, text, title) for title, text, _ in FACTS]
    questions = ["When was the Eiffel Tower completed?", "Where does the Danube flow?",
                 "Who wrote Hamlet?", "When did Mount Fuji last erupt?"]
    return [
        Example(q, (answer,), (passages[i], passages[(i + 1) % len(passages)]), 1)
        for i, (q, (_, _, answer)) in enumerate(zip(questions, FACTS))
    ]


@pytest.fixture
def reader(make_extractive):
    return make_extractive(BTRConfig(split_layer=2, max_passage_tokens=64), hidden_size=64).train()


def test_sentence_rules_ask_for_years_counts_and_names():
    found = {kind: (q, a) for q, a, kind in sentence_questions("It was completed in 1889 by Gustave Eiffel.", "Eiffel Tower")}
    assert found["year"] == ("Eiffel Tower was completed in what year by Gustave Eiffel?", "1889")
    assert found["name"] == ("Eiffel Tower was completed in 1889 by what?", "Gustave Eiffel")
    [(question, answer, kind)] = sentence_questions("The river flows through 10 countries.", "Danube")
    assert (question, answer, kind) == ("The river flows through how many countries?", "10", "quantity")
    assert not list(sentence_questions("Louis Burt Mayer was a producer.", "Louis B. Mayer"))  # no name tails
    passage = Passage("Danube", FACTS[1][1])
    assert article_questions(passage, 5) == article_questions(passage, 5) and len(article_questions(passage, 1)) == 1


def test_generated_data_is_split_by_article_and_every_answer_is_in_its_passage(tmp_path):
    summary = generate(tmp_path, corpus_size=1200)
    assert summary["questions"]["dev"] >= 500 and summary["questions"]["train"] > 5000
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    dev = [json.loads(line) for line in (tmp_path / "dev.jsonl").read_text().splitlines()]
    assert not {r["passages"][0]["title"] for r in train} & {r["article"] for r in dev}
    assert not any(is_dev(r["passages"][0]["title"], 0.1) for r in train) and all(is_dev(r["article"], 0.1) for r in dev)
    for r in train[:500]:
        positive, negative = r["passages"]
        assert r["answers"][0] in positive["text"] and r["answers"][0] not in negative["text"]
        assert r["question"].endswith("?") and ("what" in r["question"] or "how many" in r["question"])
    corpus = [json.loads(line) for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    assert len(corpus) == 1200 and {r["article"] for r in dev} <= {p["title"] for p in corpus}


def test_answer_spans_point_at_the_answer_tokens(reader):
    for example in examples():
        [(start, end)] = answer_spans(reader, example.passages[0], example.answers)
        ids = reader.passage_ids(example.passages[0])[start : end + 1]
        assert reader.tokenizer.decode(ids).lower() == example.answers[0].lower()
    kept, dropped = targets(reader, [examples()[0], Example(" ", ("1889",), examples()[0].passages, 1)], 2)
    assert len(kept) == 1 and dropped["question_empty"] == 1


def test_every_occurrence_is_a_span_matched_as_whole_words_without_case_or_leading_article(reader):
    passage = Passage("Saint Lawrence River", "The Saint Lawrence River drains the lakes. saint lawrence rivers "
                      "differ; the saint lawrence river meets the ocean.")
    spans = answer_spans(reader, passage, ["the Saint Lawrence River"])
    texts = [reader.tokenizer.decode(reader.passage_ids(passage)[s : e + 1]) for s, e in spans]
    # the title and two in the text ("rivers" is not a whole word), each text one also with its article
    assert sorted(texts) == ["saint lawrence river"] * 3 + ["the saint lawrence river"] * 2
    assert answer_spans(reader, Passage("x", "A fact " * 40 + "about 1889."), ["1889"]) == []  # cut off at 64 tokens


def test_distantly_supervised_examples_put_every_answer_passage_first():
    record = {"question": "where does the danube flow?", "answers": ["Black Sea", "the black sea"],
              "passages": [{"title": t, "text": x} for t, x, _ in FACTS]}
    example = to_example(record)
    assert example.positives == 1 and example.passages[0].title == "Danube"
    assert [p.title for p in example.passages[1:]] == ["Eiffel Tower", "Hamlet", "Mount Fuji"]
    assert to_example({**record, "answers": ["Atlantis"]}) is None
    two = to_example({**record, "answers": ["1889", "1707"]})
    assert two.positives == 2 and [p.title for p in two.passages[:2]] == ["Eiffel Tower", "Mount Fuji"]


def test_span_loss_is_shared_across_passages_and_marginal_over_occurrences(reader):
    question = "when was the tower completed or the volcano erupted?"
    [target], _ = targets(reader, [to_example({"question": question, "answers": ["1889", "1707"],
                                               "passages": [{"title": t, "text": x} for t, x, _ in FACTS]})], 3, 2)
    assert [p.title for p in target.passages] == ["Eiffel Tower", "Mount Fuji", "Danube"]
    assert {p for p, _, _ in target.spans} == {0, 1}  # both positives carry gold spans
    batch = reader.prepare([target.example.question], [target.passages])
    pairs = reader.encode_pairs(batch, "baseline")
    start, end = reader.span_logits(batch, "baseline", pairs)
    width = batch.passage_width
    flat_start, flat_end = start.reshape(-1).log_softmax(-1), end.reshape(-1).log_softmax(-1)
    gold_start = flat_start[[p * width + s for p, s, _ in target.spans]].logsumexp(0)
    gold_end = flat_end[[p * width + e for p, _, e in target.spans]].logsumexp(0)
    expected = -(gold_start + gold_end) / 2  # one softmax over all passages' tokens, summed over the gold spans
    assert torch.allclose(span_loss(reader, batch, [target], pairs, "baseline"), expected, atol=1e-5)


def test_span_loss_of_a_batch_is_the_mean_of_its_questions(reader):
    data, _ = targets(reader, examples(), 2)
    assert len(data) == 4
    reader.eval()  # no dropout: the same states alone and together

    def loss(chosen):
        batch = reader.prepare([t.example.question for t in chosen], [t.passages for t in chosen])
        return span_loss(reader, batch, chosen, reader.encode_pairs(batch, "baseline"), "baseline")

    with torch.no_grad():
        alone = torch.stack([loss([t]) for t in data])
        together = loss(data)
    assert torch.allclose(together, alone.mean(), atol=1e-5)


def test_distillation_keeps_each_passages_most_attended_half():
    torch.manual_seed(0)
    rows, query, width, d = 5, 3, 7, 4
    size = torch.ones(rows, query + width)
    size[1, query + 3 :] = 0  # a short passage: 3 real tokens, ceil(1.5) = 2 kept
    size[2, query + 1 :] = 0  # one real token: kept
    size[0, 1] = 0  # a padded query token sends no attention
    attention = torch.rand(rows, query + width, query + width)
    teacher = Tokens(torch.randn(rows, query + width, d), size, None)
    student = Tokens(torch.randn(rows, query + width, d), size, None)
    # Reference: per row, topk of the attention real query tokens give each real passage token.
    errors = []
    for row in range(rows):
        real = size[row, query:] > 0
        received = (attention[row, :query, query:] * size[row, :query, None]).sum(0)
        top = received.masked_fill(~real, float("-inf")).topk(max(1, -(-int(real.sum()) // 2))).indices
        error = (student.hidden[row, query:] - teacher.hidden[row, query:]).pow(2).mean(-1)
        errors.append(error[top])
    assert torch.allclose(distillation_loss(student, teacher, attention, width), torch.cat(errors).mean())


def test_bad_training_lines_name_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "q", "answers": ["a"]}\n\n{"question": "q", "answers": []}\n')
    with pytest.raises(TrainingDataError, match=r"train.jsonl:3: needs \"answers\""):
        list(read_examples(path))


def test_each_stage_has_its_losses_and_the_bits_stage_trains_lower_layers_through_recovery(reader, make_extractive):
    data, _ = targets(reader, examples(), 2)
    teacher = make_extractive(BTRConfig(split_layer=2, max_passage_tokens=64), hidden_size=64, seed=1)
    teacher.model.base_model.set_attn_implementation("eager")
    assert set(stage_losses(reader, Stage("plain"), data)) == {"task", "loss"}
    split = stage_losses(reader, Stage("split"), data, teacher=teacher)
    assert set(split) == {"task", "distill", "loss"} and split["distill"] > 0
    projection = torch.nn.Linear(64, 64)
    bits = stage_losses(reader, Stage("bits"), data, projection=projection)
    assert set(bits) == {"task", "recovery", "loss"}
    reader.zero_grad()
    bits["recovery"].backward()
    lower = reader.model.base_model.encoder.layer[0].attention.self.query.weight.grad
    upper = reader.model.base_model.encoder.layer[3].attention.self.query.weight.grad
    assert lower is not None and lower.abs().sum() > 0  # through the straight-through sign
    assert upper is None or upper.abs().sum() == 0  # the recovery loss never sees the upper layers


def test_span_distillation_is_the_kl_to_the_unsplit_readers_span_distributions(make_extractive):
    data, _ = targets(make_extractive(BTRConfig(split_layer=2, max_passage_tokens=64), hidden_size=64), examples(), 2)
    teacher = make_extractive(BTRConfig(split_layer=2, max_passage_tokens=64), hidden_size=64, seed=1).eval()
    batch = teacher.prepare([t.example.question for t in data], [t.passages for t in data])
    taught = teacher.encode_pairs(batch, "baseline")
    # The same weights split at k = 0 read exactly as unsplit: nothing to learn.
    same = make_extractive(BTRConfig(split_layer=0, max_passage_tokens=64), hidden_size=64, seed=1).eval()
    same.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        assert span_distillation_loss(same, teacher, batch, same.encode_pairs(batch, "split"), taught).abs() < 1e-5
    # Another reader: the KL of each question's start and end distributions over all its passages.
    student = make_extractive(BTRConfig(split_layer=2, max_passage_tokens=64), hidden_size=64, seed=2).train()
    pairs = student.encode_pairs(batch, "split")
    loss = span_distillation_loss(student, teacher, batch, pairs, taught)
    width, n = batch.passage_width, batch.per_query
    expected = 0
    for mine, theirs in zip(student.span_logits(batch, "split", pairs), teacher.span_logits(batch, "baseline", taught)):
        for row in range(len(data)):
            p, q = (x[row * n : (row + 1) * n].reshape(-1) for x in (theirs, mine))
            real = torch.isfinite(p)
            p, q = p[real].softmax(0), q[real].log_softmax(0)
            expected = expected + (p * (p.log() - q)).sum() / len(data) / 2
    assert loss > 0 and torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert student.model.base_model.encoder.layer[3].attention.self.query.weight.grad.abs().sum() > 0
    teacher.model.base_model.set_attn_implementation("eager")
    losses = stage_losses(student, Stage("split", span_distill=0.5), data, teacher=teacher)
    assert set(losses) == {"task", "distill", "spans", "loss"}
    assert Stage("split", span_distill=0.5).name == "split-spans0.5" and Stage("split").name == "split"


def test_a_stage_trained_before_a_setting_existed_is_reused_at_its_default(tmp_path):
    stage = Stage("split", steps=5)
    old = {k: v for k, v in dataclasses.asdict(stage).items() if k != "span_distill"} | {"name": "split", "mode": "split"}
    (tmp_path / "btr.json").write_text(json.dumps({"training": {"stage": old}}))
    assert stage_done(tmp_path, stage)
    with pytest.raises(TrainingDataError, match="span_distill"):
        stage_done(tmp_path, Stage("split", steps=5, span_distill=1.0))


def test_chain_gives_each_stage_its_steps_learning_rate_and_ablation_name():
    stages = chain(distill=False, steps=150, split_steps=600, bits_steps=250, batch_size=4)
    assert [(s.name, s.steps, s.learning_rate, s.batch_size) for s in stages] == [
        ("plain", 150, 1e-4, 4), ("split-nodistill", 600, 2e-4, 4), ("bits", 250, 1e-4, 4)]
    assert {s.learning_rate for s in chain(learning_rate=3e-5)} == {3e-5}
    assert {s.steps for s in chain(steps=7)} == {7}


def test_length_bucketed_batches_cover_each_epoch_once_and_pad_less():
    lengths = [(i * 37) % 200 + 20 for i in range(400)]
    bucketed = batch_order(400, 100, 8, seed=3, lengths=lengths)
    assert bucketed == batch_order(400, 100, 8, seed=3, lengths=lengths)  # a resumed run sees the same data
    assert all(len(b) == 8 for b in bucketed)
    assert sorted(i for b in bucketed[:50] for i in b) == list(range(400))  # one epoch, each example once
    plain = batch_order(400, 100, 8, seed=3)
    assert sorted(i for b in plain[:50] for i in b) == list(range(400))
    padded = lambda batches: sum(max(lengths[i] for i in b) * len(b) for b in batches)  # noqa: E731
    assert padded(bucketed) < 0.8 * padded(plain)
    assert all(sorted(b) == [0, 1, 2] for b in batch_order(3, 2, 8, seed=0))


def test_training_lowers_the_task_loss_and_logs_every_step(reader, tmp_path):
    data, _ = targets(reader, examples(), 2)
    stage = Stage("plain", steps=12, batch_size=4, learning_rate=1e-3)
    before = stage_losses(reader.eval(), stage, data)["task"].item()
    summary = train_stage(reader, stage, data, tmp_path / "straight", log=lambda _: None)
    assert summary["final_loss"]["task"] < before
    assert (tmp_path / "straight" / "btr.json").exists() and not (tmp_path / "straight" / "resume.pt").exists()
    curve = [json.loads(line) for line in (tmp_path / "straight" / "loss.jsonl").read_text().splitlines()]
    assert [row["step"] for row in curve] == list(range(1, 13))


@pytest.mark.parametrize("kind", ["plain", "split", "bits"])
def test_an_interrupted_stage_resumes_to_bit_identical_weights_with_dropout_on(kind, make_extractive, tmp_path, monkeypatch):
    """Dropout 0.1 as the committed reader trains: resume.pt must carry the torch, numpy and Python
    random state, or the resumed steps draw other dropout masks (and other draws of any stage code)."""
    config = BTRConfig(split_layer=2, max_passage_tokens=64)
    build = lambda seed=0: make_extractive(config, hidden_size=64, seed=seed, dropout=0.1).train()  # noqa: E731
    data, _ = targets(build(), examples(), 2)
    stage = Stage(kind, steps=12, batch_size=4, learning_rate=1e-3, heads=kind == "plain")
    teacher = (lambda: build(seed=1)) if kind == "split" else (lambda: None)
    draws: list[tuple[float, float]] = []  # what stage code drawing from Python's and numpy's generators sees

    def drawing_losses(*args, **kwargs):
        draws.append((random.random(), float(np.random.rand())))
        if len(draws) == stop:
            raise KeyboardInterrupt
        return stage_losses(*args, **kwargs)

    monkeypatch.setattr(train_module, "stage_losses", drawing_losses)
    stop = None
    straight = build()
    train_stage(straight, stage, data, tmp_path / "straight", teacher(), save_every=3, log=lambda _: None)
    straight_draws, draws = draws, []

    stop = 8  # killed during step 8; the last save was after step 6
    with pytest.raises(KeyboardInterrupt):
        train_stage(build(), stage, data, tmp_path / "resumed", teacher(), save_every=3, log=lambda _: None)
    assert torch.load(tmp_path / "resumed" / "resume.pt", weights_only=False)["step"] == 6
    stop, draws = None, []
    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # a new process: other generator states
    again, messages = build(seed=5), []
    train_stage(again, stage, data, tmp_path / "resumed", teacher(), save_every=3, log=messages.append)
    assert messages[0] == f"{stage.name}: resuming at step 6 of 12"
    assert draws == straight_draws[6:]
    weights = lambda r: r.model.state_dict() | ({} if r.heads is None else r.heads.state_dict())  # noqa: E731
    expected, got = weights(straight), weights(again)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(value, got[name]), name
    if kind == "bits":
        recovered = [torch.load(tmp_path / run / "recovery.pt") for run in ("straight", "resumed")]
        assert all(torch.equal(recovered[0][k], recovered[1][k]) for k in recovered[0])
    resumed_curve = (tmp_path / "resumed" / "loss.jsonl").read_text().splitlines()
    assert resumed_curve == (tmp_path / "straight" / "loss.jsonl").read_text().splitlines()


def test_a_resume_file_saved_without_random_state_still_resumes_and_says_so(make_extractive, tmp_path, monkeypatch):
    config = BTRConfig(split_layer=2, max_passage_tokens=64)
    reader = make_extractive(config, hidden_size=64, dropout=0.1).train()
    data, _ = targets(reader, examples(), 2)
    stage = Stage("plain", steps=6, batch_size=4, learning_rate=1e-3)
    calls = []

    def failing_losses(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return stage_losses(*args, **kwargs)

    monkeypatch.setattr(train_module, "stage_losses", failing_losses)
    with pytest.raises(KeyboardInterrupt):
        train_stage(reader, stage, data, tmp_path, save_every=3, log=lambda _: None)
    monkeypatch.setattr(train_module, "stage_losses", stage_losses)
    state = torch.load(tmp_path / "resume.pt", weights_only=False)
    del state["random"]  # as resume.pt was saved before it kept the random state
    torch.save(state, tmp_path / "resume.pt")
    messages = []
    train_stage(make_extractive(config, hidden_size=64, dropout=0.1).train(), stage, data, tmp_path, log=messages.append)
    assert messages[0].endswith("holds no random state; the resumed steps draw other dropout masks")
    assert messages[1] == "plain: resuming at step 3 of 6" and (tmp_path / "btr.json").exists()


def test_train_reader_flow_runs_resumes_and_exports(tmp_path, make_extractive):
    from prefect.testing.utilities import prefect_test_harness

    from flows.train_reader import train_reader

    base = make_extractive(BTRConfig(split_layer=2, max_passage_tokens=64), hidden_size=64)
    base.model.save_pretrained(tmp_path / "base")
    base.tokenizer.save_pretrained(tmp_path / "base")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(
        json.dumps({"question": e.question, "answers": list(e.answers),
                    "passages": [{"title": p.title, "text": p.text, "id": p.id} for p in e.passages]}) + "\n"
        for e in examples()
    ))
    out = tmp_path / "checkpoints"
    with prefect_test_harness(server_startup_timeout=120):
        last = train_reader(str(data), str(out), str(tmp_path / "base"), steps=2, batch_size=2, passages_per_question=2,
                            max_passage_tokens=64, split_layer=2, export=str(tmp_path / "export"))
        assert Path(last) == out / "plain+split+bits"
        for stage in ("plain", "plain+split", "plain+split+bits"):
            settings = json.loads((out / stage / "btr.json").read_text())
            assert settings["done"] and settings["split_layer"] == 2 and settings["calibration"] == "mean_abs"
        stamp = (out / "plain" / "model.safetensors").stat().st_mtime_ns
        # An ablation reuses the stages it shares and trains only the new one.
        train_reader(str(data), str(out), str(tmp_path / "base"), steps=2, batch_size=2, passages_per_question=2,
                     max_passage_tokens=64, split_layer=2, recovery=False, control_steps=3)
        assert (out / "plain" / "model.safetensors").stat().st_mtime_ns == stamp
        assert (out / "plain+split+bits-norecovery" / "btr.json").exists()
        control = json.loads((out / "plain+plain" / "btr.json").read_text())["training"]["stage"]
        assert (control["kind"], control["steps"], control["learning_rate"]) == ("plain", 3, 2e-4)
        with pytest.raises(TrainingDataError, match="other settings"):
            train_reader(str(data), str(out), str(tmp_path / "base"), steps=3, batch_size=2, passages_per_question=2,
                         max_passage_tokens=64, split_layer=2)
    exported = load_reader(ReaderSpec(checkpoint=str(tmp_path / "export")))
    assert exported.split_layer == 2
    final = load_reader(ReaderSpec(checkpoint=last))
    for a, b in zip(exported.model.state_dict().values(), final.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-2, rtol=1e-2)  # fp16 export of the same weights
    with pytest.raises(ValueError, match="trained to split at k=2"):
        load_reader(ReaderSpec(checkpoint=last, split_layer=3))


def test_the_committed_default_reader_loads_offline_with_its_settings():
    from reader.load import DEFAULT_CHECKPOINT

    settings = json.loads((DEFAULT_CHECKPOINT / "btr.json").read_text())
    reader = load_reader(ReaderSpec())
    assert reader.split_layer == settings["split_layer"] == 3 and reader.calibration == settings["calibration"]
    assert reader.dtype == torch.float32 and reader.hidden_size == 384
    # the answer rule chosen on dev rides in btr.json and is applied on load
    assert reader.retrieval_weight == settings["answer"]["retrieval_weight"] > 0 and reader.heads is None
    assert [s["stage"]["name"] for s in settings["training"]["stages"]] == ["plain", "split", "bits"]
    assert (DEFAULT_CHECKPOINT / "model.safetensors").stat().st_size < 50e6
    assert (DEFAULT_CHECKPOINT / "README.md").exists()  # the model card
