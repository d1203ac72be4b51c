"""The benchmark runs the product's code path end to end (tiny shapes here; full size: make bench)."""

import json

import pytest

from reader.bench import main


def test_bench_prints_one_json_object_with_the_promised_keys(capsys):
    main(["--json", "--shape", "tiny", "--queries", "2", "--passages", "2", "--rounds", "1", "--answer-tokens", "2"])
    result = json.loads(capsys.readouterr().out)
    for key in ("baseline_qps", "split_qps", "btr_qps", "speedup", "config"):
        assert key in result
    assert all(result[k] > 0 for k in ("baseline_qps", "split_qps", "btr_qps"))
    assert result["config"]["split_layer"] == 3 and result["config"]["passages_per_query"] == 2
    tokens = result["decoder_memory_tokens"]
    assert tokens["btr"]["last_layer"] < tokens["btr"]["input"] == tokens["baseline"]["input"]


def test_bench_rejects_a_split_layer_beyond_the_encoder():
    with pytest.raises(SystemExit):
        main(["--shape", "tiny", "--split-layer", "7"])
