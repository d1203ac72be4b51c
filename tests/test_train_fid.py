"""Training the FiD reader through the three stages on a tiny random T5, and the synthetic task."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import reader.train as train_module
from flows.synthetic_qa import RELATIONS, generate, lesson, open_values, people, questions
from reader.assets import minilm_path
from reader.config import BTRConfig
from reader.inputs import Passage
from reader.load import ReaderSpec, load_reader
from reader.normalize import has_answer
from reader.supervision import TrainingDataError, targets, to_example
from reader.losses import recovery_loss
from reader.train import Stage, stage_losses, train_stage

CONFIG = BTRConfig(split_layer=2, max_passage_tokens=48)


def records(count: int = 24, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return questions(people(count, rng), 3, rng)


@pytest.fixture
def data(make_fid):
    kept, _ = targets(make_fid(CONFIG), [to_example(r) for r in records()], 3, 1)
    return kept[:16]


def test_synthetic_questions_need_the_whole_name_and_the_passage(tmp_path):
    summary = generate(tmp_path, people_count=300, per_question=4)
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    dev = [json.loads(line) for line in (tmp_path / "dev.jsonl").read_text().splitlines()]
    assert summary["questions"] == {"train": len(train), "dev": len(dev)} and len(dev) == 30 * 3
    assert not {r["passages"][0]["title"] for r in train} & {p["title"] for r in dev for p in r["passages"]}
    namesakes = 0
    for record in train[:200]:
        name = next(p["title"] for p in record["passages"] if p["title"] in record["question"])
        holding = [p["title"] for p in record["passages"] if has_answer([p["text"]], record["answers"])]
        assert holding == [name]  # only the asked person's passage holds the answer
        stating = RELATIONS[record["relation"]][0].split("{v}")[0]
        assert all(stating.format(e=p["title"]) in p["text"] for p in record["passages"])  # every distractor too
        first, last = name.split()
        others = [p["title"] for p in record["passages"] if p["title"] != name]
        assert len(others) == 3 and name not in others
        namesakes += {o.split()[0] for o in others} >= {first} and {o.split()[1] for o in others} >= {last}
    assert namesakes > 150  # most questions have a distractor sharing each half of the name
    with pytest.raises(ValueError, match="at most 1600 people"):
        generate(tmp_path, people_count=5000)
    # the easier variant: no distractor shares either half of the name, and the answer is still in one passage only
    generate(tmp_path / "easy", people_count=300, per_question=4, namesakes=False)
    for record in [json.loads(line) for line in (tmp_path / "easy" / "train.jsonl").read_text().splitlines()][:200]:
        name = next(p["title"] for p in record["passages"] if p["title"] in record["question"])
        others = {word for p in record["passages"] if p["title"] != name for word in p["title"].split()}
        assert len(record["passages"]) == 4 and not others & set(name.split())
        assert [p["title"] for p in record["passages"] if has_answer([p["text"]], record["answers"])] == [name]


def test_open_values_and_fresh_facts_leave_reading_the_only_way(tmp_path):
    summary = generate(tmp_path, people_count=300, per_question=4, values="open", train_questions=600)
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    dev = [json.loads(line) for line in (tmp_path / "dev.jsonl").read_text().splitlines()]
    assert summary["questions"] == {"train": 600, "dev": 30 * 3} and summary["fresh_facts"]
    assert not {p["title"] for r in train for p in r["passages"]} & {p["title"] for r in dev for p in r["passages"]}
    pools = open_values(minilm_path())
    assert all(len(v) == 3000 for v in pools.values()) and len(set().union(*pools.values())) == 6 * 3000
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    told: dict[tuple[str, str], set[str]] = {}
    for record in train:
        [answer] = record["answers"]
        assert answer in pools[record["relation"]] and len(tokenizer.tokenize(answer)) == 1
        name = next(p["title"] for p in record["passages"] if p["title"] in record["question"])
        assert [p["title"] for p in record["passages"] if has_answer([p["text"]], record["answers"])] == [name]
        told.setdefault((name, record["relation"]), set()).add(answer)
    asked_twice = [answers for answers in told.values() if len(answers) > 1]
    assert len(asked_twice) > 20  # the same person's fact differs between questions: nothing to memorise
    assert len({p["id"] for r in train for p in r["passages"]}) == 4 * len(train)  # an id names one text
    with pytest.raises(ValueError, match="typed or open"):
        generate(tmp_path, values="closed")


def test_lessons_keep_the_asked_persons_passage_or_its_answer_sentence(tmp_path):
    generate(tmp_path, people_count=300, per_question=4, values="open", train_questions=300)
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    for record in train:
        [holder] = [p for p in record["passages"] if has_answer([p["text"]], record["answers"])]  # the reference
        [whole] = lesson(record, "passage")["passages"]
        [sentence] = lesson(record, "sentence")["passages"]
        assert whole == holder and len(record["passages"]) == 4  # the record itself is left as it was
        assert sentence["title"] == holder["title"] and sentence["text"] in holder["text"]
        assert sentence["text"].count(".") == 1 and has_answer([sentence["text"]], record["answers"])
    with pytest.raises(ValueError, match="unknown lesson 'chapter'"):
        lesson(train[0], "chapter")
    with pytest.raises(ValueError, match="0 passages are titled with the asked name"):
        lesson(train[0] | {"passages": [p for p in train[0]["passages"] if p["title"] not in train[0]["question"]]}, "passage")


def test_the_warm_up_trains_each_lesson_from_the_one_before_on_one_passage(make_fid, tmp_path):
    import argparse

    from flows.fid_synthetic import questions_needed, train_lessons, warm_up

    assert questions_needed(5000, 32) == 160_000 and questions_needed(2500, 32) == 100_000  # each drawn once by the plain stage

    assert warm_up("sentence:400,passage:750") == [("sentence", 400), ("passage", 750)] and warm_up("none") == []
    for wrong in ("chapter:3", "sentence", "sentence:0", "passage:x"):
        with pytest.raises(argparse.ArgumentTypeError, match="lesson:steps"):
            warm_up(wrong)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(12)))
    base = make_fid(CONFIG)
    base.model.save_pretrained(tmp_path / "base")
    base.tokenizer.save_pretrained(tmp_path / "base")
    stage = Stage("plain", steps=99, batch_size=2, learning_rate=1e-2, max_positives=1, optimizer="adafactor")
    last = train_lessons([("sentence", 3), ("passage", 2)], stage, str(tmp_path / "base"), data, tmp_path / "out", 2)
    assert Path(last) == tmp_path / "out" / "lesson-passage" / "plain"
    for name, steps in (("sentence", 3), ("passage", 2)):
        lines = (data / f"train-{name}.jsonl").read_text().splitlines()
        assert len(lines) == len(records(12)) and all(len(json.loads(line)["passages"]) == 1 for line in lines)
        trained = json.loads((tmp_path / "out" / f"lesson-{name}" / "plain" / "btr.json").read_text())["training"]
        assert trained["stage"]["steps"] == steps and trained["stage"]["optimizer"] == "adafactor"
    sentence = load_reader(ReaderSpec("fid", str(tmp_path / "out" / "lesson-sentence" / "plain"))).model.shared.weight
    assert not torch.equal(sentence, base.model.shared.weight)
    # the reference: the passage lesson trained by hand from the sentence lesson's checkpoint
    from reader.train_chain import train_chain

    reference = train_chain([replace(stage, steps=2)], str(tmp_path / "out" / "lesson-sentence" / "plain"),
                            str(data / "train-passage.jsonl"), str(tmp_path / "reference"), 1, 64, 2, family="fid")
    expected = load_reader(ReaderSpec("fid", reference)).model.state_dict()
    for name, value in load_reader(ReaderSpec("fid", last)).model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_answer_loss_is_teacher_forced_cross_entropy_over_all_passages(make_fid, data):
    reader = make_fid(CONFIG)
    chosen = data[:2]
    batch = reader.prepare([t.example.question for t in chosen], [t.passages for t in chosen])
    pairs = reader.encode_pairs(batch, "baseline")
    labels = reader.answer_labels([t.example.answers[0] for t in chosen])
    assert (labels[labels != -100][-1] == reader.tokenizer.sep_token_id) and labels.shape[0] == 2
    # the library's own forward over the fused memory, with the same labels
    memory = pairs.flatten_groups(batch.per_query)
    library = reader.model(encoder_outputs=(memory.hidden,), attention_mask=memory.size.bool(), labels=labels).loss
    assert torch.allclose(stage_losses(reader, Stage("plain"), chosen)["task"], library, atol=1e-5)


def test_teacher_states_and_attention_line_up_with_the_split_reader(make_fid, data):
    reader = make_fid(BTRConfig(split_layer=0, max_passage_tokens=48))
    reader.model.set_attn_implementation("eager")
    batch = reader.prepare([t.example.question for t in data[:2]], [t.passages for t in data[:2]])
    with torch.no_grad():
        split = reader.encode_pairs(batch, "split")
        taught, attention = reader._encode_unsplit(batch, attention_from=0)
    # k = 0: the split reader is the unsplit one, so every real token's state matches in place
    real = taught.size > 0
    assert torch.equal(real, split.size > 0)
    assert torch.allclose(split.hidden[real], taught.hidden[real], atol=1e-5)
    assert attention.shape == (6, split.hidden.shape[1], split.hidden.shape[1])
    rows = (attention * real[:, None, :]).sum(-1)[real]  # over the real tokens, each row is a distribution
    assert torch.allclose(rows, torch.ones(int(real.sum())), atol=1e-4)


def test_eager_attention_reaches_the_encoder_stack_and_sdpa_is_refused_by_name(make_fid, data):
    reader = make_fid(BTRConfig(split_layer=1, max_passage_tokens=48))
    reader.model.set_attn_implementation("sdpa")  # as a Hub checkpoint loads; sdpa returns no attention weights
    batch = reader.prepare([t.example.question for t in data[:2]], [t.passages for t in data[:2]])
    with torch.no_grad(), pytest.raises(RuntimeError, match="no attention weights"):
        reader._encode_unsplit(batch, attention_from=1)
    train_module.eager_attention(reader.model)
    # every stack's own config, not only the top one: transformers 5.17 kept T5's encoder on sdpa when only
    # the top model was set (5.24, installed here, propagates it, so that half fails only on 5.17)
    assert {m.config._attn_implementation for m in reader.model.modules() if hasattr(m, "set_attn_implementation")} == {"eager"}
    with torch.no_grad():
        _, attention = reader._encode_unsplit(batch, attention_from=1)
    assert attention.shape[0] == 2 * batch.per_query


def test_each_stage_lowers_its_loss_writes_its_checkpoint_and_the_bits_reach_the_lower_layers(make_fid, data, tmp_path):
    reader = make_fid(CONFIG, d_model=64).train()
    teacher = make_fid(CONFIG, d_model=64, seed=1)
    teacher.model.set_attn_implementation("eager")
    summaries = {}
    for stage in (Stage("plain", steps=15, batch_size=8, learning_rate=3e-3),
                  Stage("split", steps=15, batch_size=8, learning_rate=3e-3),
                  Stage("bits", steps=15, batch_size=8, learning_rate=3e-3)):
        taught = teacher if stage.kind == "split" else None
        projection = torch.nn.Linear(64, 64) if stage.kind == "bits" else None
        before = stage_losses(reader.eval(), stage, data[:8], taught, projection)
        assert set(before) == {"plain": {"task", "loss"}, "split": {"task", "distill", "loss"},
                               "bits": {"task", "recovery", "loss"}}[stage.kind]
        summaries[stage.kind] = train_stage(reader, stage, data, tmp_path / stage.name, taught, log=lambda _: None)
        assert summaries[stage.kind]["final_loss"]["task"] < before["task"].item(), stage.kind
        settings = json.loads((tmp_path / stage.name / "btr.json").read_text())
        assert settings["family"] == "FiDReader" and settings["calibration"] == "rms" and settings["split_layer"] == 2
    assert (tmp_path / "bits" / "recovery.pt").exists()
    assert summaries["split"]["final_loss"]["distill"] > 0
    loaded = load_reader(ReaderSpec("fid", str(tmp_path / "bits")))
    assert loaded.split_layer == 2
    for name, value in reader.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[name]), name
    with pytest.raises(ValueError, match="FiDReader checkpoint, not ExtractiveReader"):
        load_reader(ReaderSpec("extractive", str(tmp_path / "bits")))


def test_adafactor_moves_every_weight_by_a_like_share_of_its_scale_where_adamw_does_not(make_fid, data, tmp_path):
    """Why a T5 from scratch trains with Adafactor (docs/fid.md): its weights differ in scale by ~30x here."""
    from reader.train import make_optimizer

    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        Stage("plain", optimizer="sgd")
    spread = {}
    for name in ("adamw", "adafactor"):
        reader = make_fid(CONFIG, d_model=64).train()
        stage = Stage("plain", learning_rate=1e-2 if name == "adafactor" else 1e-3, optimizer=name)
        weights = {"embeddings": reader.model.shared.weight,
                   "query": reader.model.encoder.block[1].layer[0].SelfAttention.q.weight}
        before = {k: w.detach().clone() for k, w in weights.items()}
        optimizer = make_optimizer(stage, [{"params": list(reader.parameters())}], reader.device)
        stage_losses(reader, stage, data[:8])["loss"].backward()
        optimizer.step()
        share = {k: ((w.detach() - before[k]).pow(2).mean().sqrt() / before[k].pow(2).mean().sqrt()).item()
                 for k, w in weights.items()}
        spread[name] = share["query"] / share["embeddings"]
    assert spread["adamw"] > 10 and spread["adafactor"] < 3, spread
    # a stage trains with it, and its checkpoint records it
    reader = make_fid(CONFIG, d_model=64).train()
    stage = Stage("plain", steps=15, batch_size=8, learning_rate=1e-2, optimizer="adafactor")
    before = stage_losses(reader.eval(), stage, data[:8])["task"].item()
    summary = train_stage(reader, stage, data, tmp_path / "plain", log=lambda _: None)
    assert summary["final_loss"]["task"] < before
    assert json.loads((tmp_path / "plain" / "btr.json").read_text())["training"]["stage"]["optimizer"] == "adafactor"


@pytest.mark.parametrize("schedule, last", [("constant", 1e-2), ("linear", 0.0)])
def test_the_rate_after_warm_up_stays_at_its_peak_or_decays_as_the_stage_says(schedule, last, make_fid, data, tmp_path):
    """A T5 from scratch trains at a constant rate (T5's own); the pretrained readers decay linearly."""
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        Stage("plain", schedule="cosine")
    stage = Stage("plain", steps=40, batch_size=4, learning_rate=1e-2, optimizer="adafactor", schedule=schedule)
    train_stage(make_fid(CONFIG, d_model=64).train(), stage, data, tmp_path / "plain", log=lambda _: None)
    rates = [json.loads(line)["lr"] for line in (tmp_path / "plain" / "loss.jsonl").read_text().splitlines()]
    assert rates[0] < 1e-2 and max(rates) == pytest.approx(1e-2)  # the warm-up: 4 of 40 steps
    assert rates[-1] == pytest.approx(last, abs=1e-12)
    assert (rates[20] == pytest.approx(1e-2)) == (schedule == "constant")


def test_recovery_under_rms_calibration_targets_the_scale_free_state(make_fid, data):
    reader = make_fid(CONFIG, d_model=64)
    batch = reader.prepare([data[0].example.question], [data[0].passages])
    states = reader.lower(*train_module.pad(batch.passage_ids, reader.layout.pad_id))
    states.hidden = states.hidden * 300  # pretrained T5's residuals are in the hundreds
    _, signs = reader.binarized(states)
    projection = torch.nn.Linear(64, 64)
    assert recovery_loss(projection, signs, states, "rms") < 10
    assert recovery_loss(projection, signs, states, "mean_abs") > 1000  # what the BERT reader keeps


@pytest.mark.parametrize("kind", ["plain", "bits"])
def test_a_fid_stage_resumes_to_bit_identical_weights_with_dropout_on(kind, make_fid, data, tmp_path, monkeypatch):
    """Dropout 0.1 on every T5 layer: the resumed steps must draw the straight run's dropout masks, so the
    weights are equal, not close."""
    stage = Stage(kind, steps=8, batch_size=4, learning_rate=1e-3)
    build = lambda seed=0: make_fid(CONFIG, seed=seed, dropout=0.1).train()  # noqa: E731
    straight = build()
    train_stage(straight, stage, data, tmp_path / "straight", log=lambda _: None)
    calls = []

    def failing_losses(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return stage_losses(*args, **kwargs)

    monkeypatch.setattr(train_module, "stage_losses", failing_losses)
    with pytest.raises(KeyboardInterrupt):
        train_stage(build(), stage, data, tmp_path / "resumed", save_every=2, log=lambda _: None)
    monkeypatch.setattr(train_module, "stage_losses", stage_losses)
    torch.manual_seed(123), random.seed(123)  # a new process: other generator states
    again, messages = build(seed=7), []
    train_stage(again, stage, data, tmp_path / "resumed", save_every=2, log=messages.append)
    assert messages[0] == f"{kind}: resuming at step 4 of 8"
    assert again.model.config.dropout_rate == 0.1
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[name]), name
    if kind == "bits":
        recovered = [torch.load(tmp_path / run / "recovery.pt") for run in ("straight", "resumed")]
        assert recovered[0]["weight"].shape == (32, 32)
        assert all(torch.equal(recovered[0][k], recovered[1][k]) for k in recovered[0])


def test_train_reader_flow_trains_fid_and_refuses_a_missing_base(tmp_path, make_fid):
    from prefect.testing.utilities import prefect_test_harness

    from flows.fid_synthetic import evaluate
    from flows.train_reader import main, train_reader

    base = make_fid(CONFIG)
    base.model.save_pretrained(tmp_path / "base")
    base.tokenizer.save_pretrained(tmp_path / "base")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records(12)))
    out = tmp_path / "checkpoints"
    with prefect_test_harness(server_startup_timeout=120):
        last = train_reader(str(train), str(out), str(tmp_path / "base"), steps=2, batch_size=2, passages_per_question=3,
                            max_passage_tokens=48, split_layer=2, family="fid")
        assert Path(last) == out / "plain+split+bits"
        stamp = (out / "plain" / "model.safetensors").stat().st_mtime_ns
        train_reader(str(train), str(out), str(tmp_path / "base"), steps=2, batch_size=2, passages_per_question=3,
                     max_passage_tokens=48, split_layer=2, family="fid")  # a rerun reuses every stage
        assert (out / "plain" / "model.safetensors").stat().st_mtime_ns == stamp
        missing = ["--family", "fid", "--base", str(tmp_path / "missing"), "--train", str(train), "--out", str(tmp_path / "o")]
        assert main(missing) == 2 and not (tmp_path / "o" / "plain" / "btr.json").exists()  # one line, nothing trained
        with pytest.raises(TrainingDataError, match="other settings"):
            train_reader(str(train), str(out), str(tmp_path / "base"), steps=3, batch_size=2, passages_per_question=3,
                         max_passage_tokens=48, split_layer=2, family="fid")
    for stage in ("plain", "plain+split", "plain+split+bits"):
        assert json.loads((out / stage / "btr.json").read_text())["family"] == "FiDReader"
    # the synthetic run's table: every variant on the same questions, EM and QPS side by side
    figures = evaluate(out, train, 5, (0.2,))
    rows = figures["rows"]
    assert list(rows) == ["plain", "split", "btr", "btr_merge_0.2", "btr_encoder_merge_0.2", "btr_decoder_merge_0.2"]
    assert figures["questions"] == 5 and all(len(row["exact"]) == 5 and row["qps"] > 0 for row in rows.values())
    assert rows["btr_merge_0.2"]["decoder_ratio"] == 0.2 and rows["plain"]["speedup"] == 1.0
    sides = [(rows[name]["encoder_ratio"], rows[name]["decoder_ratio"]) for name in ("btr_encoder_merge_0.2", "btr_decoder_merge_0.2")]
    assert sides == [(0.2, 0.0), (0.0, 0.2)]
    passage = Passage(**records(12)[0]["passages"][0])
    answers = load_reader(ReaderSpec("fid", last)).answer(["where was john smith born?"], [[passage]])
    assert isinstance(answers[0], str)
    with pytest.raises(SystemExit):
        main(["--family", "fid", "--train", str(train)])  # no --base: a usage error, nothing trained
