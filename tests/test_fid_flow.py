"""A BTR-FiD reader through the indexing flow as users run it (Prefect + Ray, the direct command), then
answered from, verified and served: the generative family end to end (slow: under `make bench`)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from flows.synthetic_qa import people, questions
from reader.config import BTRConfig
from workers.quiet import QUIET_ENV

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.bench
def test_a_fid_reader_indexes_through_the_flow_and_answers_from_its_bits(tmp_path, make_fid):
    from reader.answer import Answerer
    from storage.verify import verify

    tiny = make_fid(BTRConfig(split_layer=2, max_passage_tokens=48))
    tiny.model.save_pretrained(tmp_path / "reader")
    tiny.tokenizer.save_pretrained(tmp_path / "reader")
    rng = random.Random(0)
    records = questions(people(30, rng), 3, rng)
    passages = {p["id"]: p for r in records for p in r["passages"]}
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in passages.values()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in QUIET_ENV}
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "flows.index_wikipedia", "--index", str(tmp_path / "index"), "--corpus", str(corpus),
               "--corpus-format", "jsonl", "--reader-family", "fid", "--reader-checkpoint", str(tmp_path / "reader"),
               "--split-layer", "2", "--max-passage-tokens", "48", "--shard-size", "16", "--codec-sample", "40"]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["extra"]["reader_spec"]["family"] == "fid" and manifest["extra"]["offline_merge"]["ratio"] == 0.2
    problems, checked = verify(tmp_path / "index")
    assert problems == [] and checked == len(passages)
    answerer = Answerer(tmp_path / "index")
    result = answerer.answer(records[0]["question"], 3, "btr")
    cited = result["passages"][result["source"]]["id"]
    assert isinstance(result["answer"], str) and result["context"].endswith(passages[cited]["text"])
