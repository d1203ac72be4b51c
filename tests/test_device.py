"""--device and --dtype: float32 on the CPU answers as before; bfloat16 (what a GPU runs by default) within a stated tolerance.

The GPU itself is not here: the same code path runs on the CPU in each dtype (bench/gpu_run.sh
measures it on a lent GPU). Checked with the trained default reader, whose answers have margins
(a tiny random reader's span scores are near ties that any rounding flips).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reader.answer import main as answer_main
from reader.assets import wikipedia_sample
from reader.device import DeviceUnavailable, resolve
from reader.load import ReaderSpec, load_reader
from reader.query import Answerer, run_reader
from reader.retriever import Encoder, build_faiss, passage_text, record_retriever
from workers.build import build_index

PASSAGES = wikipedia_sample(60, min_words=30)
QUESTIONS = [f"Who wrote {p.title}?" if i % 2 else f"What is {p.title}?" for i, p in enumerate(PASSAGES[:36:3])]
# bfloat16 keeps 8 bits of mantissa: over 24 questions of a 200-passage index a span's score (33 to 81)
# moved by at most 0.11% (btr) and 0.35% (baseline); 1% leaves room for another CPU's kernels.
SCORE_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Path:
    """60 sample passages indexed by the trained default reader, with the default retriever."""
    root = tmp_path_factory.mktemp("device") / "index"
    spec = ReaderSpec()
    build_index(root, load_reader(spec), PASSAGES, shard_size=32, extra={"reader_spec": spec.to_dict()})
    encoder = Encoder()
    build_faiss([encoder.embed([passage_text(p) for p in PASSAGES])], root, encoder.identity())
    record_retriever(root)
    return root


@pytest.fixture(scope="module")
def answerers(index) -> dict[str, Answerer]:
    return {dtype: Answerer(index, device="cpu", dtype=dtype) for dtype in ("float32", "bfloat16")}


def spans(answerer: Answerer, mode: str) -> list:
    """The reader's spans (passage, tokens, score) for every question, one pass each."""
    lookups = [answerer.lookup(q, 5) for q in QUESTIONS]
    groups = [[s.tokens if mode == "btr" else s.passage for s in answerer.index.decode(l.raw, [h.row for h in l.hits])]
              for l in lookups]
    return [run_reader(answerer.reader, [l.question], [g], [[h.score for h in l.hits]], mode, {})[0]
            for l, g in zip(lookups, groups)]


def test_auto_is_the_cpu_in_float32_here_and_a_missing_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: auto picks it")
    assert resolve("auto", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(DeviceUnavailable, match="torch sees no CUDA GPU here"):
        resolve("cuda:1")


def test_cuda_asked_for_and_absent_is_exit_2_before_any_loading(index, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert answer_main([QUESTIONS[0], "--index", str(index), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda: torch sees no CUDA GPU here") and len(err.splitlines()) == 1


def test_cpu_float32_answers_exactly_as_the_default(index, capsys):
    default = Answerer(index)  # the class's default: the CPU, float32, as before the flags existed
    assert (default.reader.device, default.reader.dtype) == (torch.device("cpu"), torch.float32)
    for question in QUESTIONS[:3]:
        assert answer_main([question, "--index", str(index), "--k", "5", "--json", "--device", "cpu", "--dtype", "float32"]) == 0
        flagged, alone = json.loads(capsys.readouterr().out), default.answer(question, 5)
        keys = ("answer", "source", "span", "passages")
        assert [flagged[k] for k in keys] == json.loads(json.dumps([alone[k] for k in keys]))


@pytest.mark.parametrize("mode", ["btr", "baseline"])
def test_bfloat16_gives_the_same_answers_and_scores_within_tolerance(answerers, mode):
    assert answerers["bfloat16"].reader.dtype == torch.bfloat16
    assert answerers["bfloat16"].identity == answerers["float32"].identity  # the index's check is made before the cast
    full, half = spans(answerers["float32"], mode), spans(answerers["bfloat16"], mode)
    assert [(s.passage, s.start, s.end, s.text) for s in half] == [(s.passage, s.start, s.end, s.text) for s in full]
    for f, h in zip(full, half):
        assert abs(h.score - f.score) <= SCORE_TOLERANCE * max(1.0, abs(f.score)), (f.score, h.score)
    # the answers users see are the same
    assert [answerers["bfloat16"].answer(q, 5, mode)["answer"] for q in QUESTIONS[:4]] == [
        answerers["float32"].answer(q, 5, mode)["answer"] for q in QUESTIONS[:4]]


def test_bench_reader_times_the_extractive_query_path_batched_on_the_device_asked(capsys):
    from bench.reader import main as bench_main

    bench_main(["--json", "--family", "extractive", "--queries", "4", "--passages", "2", "--passage-tokens", "64",
                "--rounds", "1", "--batch", "2", "--device", "cpu", "--dtype", "bfloat16", "--threads", "1"])
    result = json.loads(capsys.readouterr().out)
    assert set(result["latency_ms"]) == {"baseline", "split", "btr"}  # no run-time merging in an extractive reader
    assert all(0 < v["p50"] <= v["p99"] for v in result["latency_ms"].values())
    assert (result["config"]["family"], result["config"]["batch"], result["config"]["dtype"]) == ("extractive", 2, "bfloat16")
    assert result["btr_qps"] > 0 and "decoder_memory_tokens" not in result
    if not torch.cuda.is_available():  # refused before the reader loads
        assert bench_main(["--family", "extractive", "--queries", "2", "--device", "cuda"]) == 2
        assert capsys.readouterr().err.startswith("error: --device cuda: torch sees no CUDA GPU here")


def test_evaluate_reports_the_device_and_dtype_it_measured_on(index, tmp_path, capsys):
    from reader.evaluate import main as evaluate_main

    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answers": [p.title]}) + "\n" for q, p in zip(QUESTIONS[:3], PASSAGES[::3])))
    assert evaluate_main(["--index", str(index), "--questions", str(path), "--json", "--device", "cpu", "--dtype", "bfloat16"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["device"] == "cpu bfloat16" and summary["n"] == 3
