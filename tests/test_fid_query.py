"""A FiD checkpoint on the query path: generated answers cite the passage with the most cross-attention."""

from __future__ import annotations

import random

import torch

from flows.synthetic_qa import people, questions
from reader.config import NO_MERGE, BTRConfig
from reader.fid import Generated
from reader.inputs import Passage
from reader.load import ReaderSpec, load_reader
from tests.conftest import PASSAGES, QUESTIONS


def test_passage_attention_is_the_library_cross_attention_summed_per_passage(make_fid):
    reader = make_fid(BTRConfig(split_layer=2))
    reader.model.set_attn_implementation("eager")
    batch = reader.prepare(QUESTIONS, PASSAGES)
    with torch.no_grad():
        memory = reader.encode_pairs(batch, "split").flatten_groups(batch.per_query)
        ids = reader.generate(memory, NO_MERGE, max_new_tokens=4, stop_at_eos=False)
        shares = reader.passage_attention(memory, ids, batch.per_query)
        start = torch.zeros_like(ids[:, :1])
        library = reader.model(
            encoder_outputs=(memory.hidden,), attention_mask=memory.size.bool(),
            decoder_input_ids=torch.cat([start, ids[:, :-1]], 1), output_attentions=True,
        ).cross_attentions[-1]  # [B, heads, T, M]
    end = reader.tokenizer.sep_token_id
    expected = []
    for row in range(2):  # positions up to the one that predicted the end token
        stop = (ids[row] == end).nonzero()
        live = int(stop[0]) + 1 if len(stop) else ids.shape[1]
        received = library[row].mean(0)[:live].sum(0).reshape(3, -1).sum(-1)
        expected.append(received / received.sum())
    assert torch.allclose(shares, torch.stack(expected), atol=1e-5)
    outputs = reader.read_out(batch, reader.encode_pairs(batch, "split"), "split", max_new_tokens=4)
    assert all(isinstance(o, Generated) and o.passage == max(range(3), key=o.attention.__getitem__) for o in outputs)


def test_a_fid_index_answers_with_a_cited_passage_and_evaluates(tmp_path, make_fid):
    from reader.answer import Answerer
    from reader.evaluate import evaluate
    from reader.retriever import Encoder, build_faiss, passage_text
    from workers.build import build_index

    folder = tmp_path / "reader"
    tiny = make_fid(BTRConfig(split_layer=2, max_passage_tokens=48))
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    rng = random.Random(0)
    records = questions(people(20, rng), 3, rng)
    passages = list({p["id"]: Passage(p["title"], p["text"], p["id"]) for r in records for p in r["passages"]}.values())
    spec = ReaderSpec("fid", str(folder), 2, 48)
    build_index(tmp_path / "index", load_reader(spec), passages, shard_size=16, extra={"reader_spec": spec.to_dict()})
    encoder = Encoder()
    build_faiss([encoder.embed([passage_text(p) for p in passages])], tmp_path / "index", encoder.identity())
    answerer = Answerer(tmp_path / "index")
    for mode in ("btr", "split", "baseline"):
        result = answerer.answer(records[0]["question"], 3, mode)
        assert isinstance(result["answer"], str) and result["source"] in range(3)
        cited = result["passages"][result["source"]]["id"]
        assert result["context"].endswith(next(p.text for p in passages if p.id == cited))
    summary = evaluate(answerer, records[:6], "btr", k=3)
    assert summary["n"] == 6 and sum(summary["cited_rank"]) == 6 - summary["refused"]
    # the service answers from the same FiD index as reader.answer does: generated answer, cited passage, no span
    from starlette.testclient import TestClient

    from reader.serve import create_app

    direct = answerer.answer(records[1]["question"], 3, "btr")
    with TestClient(create_app(answerer)) as client:
        served = client.post("/answer", json={"question": records[1]["question"], "k": 3})
        assert served.status_code == 200, served.text
        body = served.json()
        assert (body["answer"], body["source"], body["context"]) == (direct["answer"], direct["source"], direct["context"])
        assert body["span"] is None and client.get("/health").json()["status"] == "ok"
