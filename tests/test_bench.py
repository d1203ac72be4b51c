"""The benchmark runs the product's code path end to end (tiny shapes here; full size: make bench)."""

import json

import pytest

from bench.reader import main


def test_bench_prints_one_json_object_with_the_promised_keys(capsys):
    main(["--json", "--shape", "tiny", "--queries", "2", "--passages", "2", "--rounds", "1", "--answer-tokens", "2"])
    result = json.loads(capsys.readouterr().out)
    for key in ("baseline_qps", "split_qps", "btr_qps", "speedup", "config"):
        assert key in result
    assert all(result[k] > 0 for k in ("baseline_qps", "split_qps", "btr_qps"))
    assert result["config"]["split_layer"] == 3 and result["config"]["passages_per_query"] == 2
    tokens = result["decoder_memory_tokens"]
    assert tokens["btr"]["last_layer"] < tokens["btr"]["input"] == tokens["baseline"]["input"]


@pytest.mark.parametrize("layer", ["7", "-1"])
def test_bench_rejects_a_split_layer_beyond_the_encoder(layer, capsys):
    """The project's own refusal (argparse's exit 2 with its message), not any SystemExit: a bad flag name
    or an unparsable value also exits 2, so the message is what shows the bound was checked."""
    with pytest.raises(SystemExit) as exit:
        main(["--shape", "tiny", "--split-layer", layer])
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m bench.reader: error: --split-layer {layer} exceeds the tiny encoder's layers")


def test_storage_bench_measures_the_default_readers_bits(capsys):
    from bench.storage import main as storage_bench

    storage_bench(["--json", "--passages", "40", "--shard-size", "16", "--fetch", "8", "--repeats", "2"])
    result = json.loads(capsys.readouterr().out)
    bits = result["bits_per_dim"]
    assert set(bits) >= {"packed", "zstd", "lossless", "merged_0.2"}
    # The prototype XOR codec beats plain zstd, and merging beats lossless, even on 40 passages.
    assert bits["merged_0.2"] < bits["lossless"] < bits["zstd"] <= 1.01
    assert result["fetch_decode_ms_40"] > 0 and result["raw_read_ms_40"] > 0
    assert result["config"]["split_layer"] == 3 and result["config"]["passages"] == 40


def test_heldout_token_dim_costs_what_the_token_predicts():
    import numpy as np
    import torch

    from bench.storage import count_bits, entropy_given_token_dim, heldout_token_dim
    from storage.bits import BinaryTokens

    rng = np.random.default_rng(0)
    table = rng.integers(0, 256, size=(20, 8), dtype=np.uint8)  # each token's fixed bits, d = 64

    def passages(bits_of) -> list[BinaryTokens]:
        out = []
        for _ in range(50):
            ids = rng.integers(0, 20, size=30)
            out.append(BinaryTokens(torch.from_numpy(ids).int(), torch.from_numpy(bits_of(ids)),
                                    torch.ones(30, dtype=torch.float16), 3, 64, "mean_abs"))
        return out

    fixed = passages(lambda ids: table[ids])
    noise = passages(lambda ids: rng.integers(0, 256, size=(len(ids), 8), dtype=np.uint8))
    assert heldout_token_dim(fixed, count_bits(fixed, 20, 64)) < 0.05  # the token id says it all
    noisy = count_bits(noise, 20, 64)
    # Coin flips: nothing to learn, and the in-sample entropy flatters (it fits the noise), held out does not.
    assert entropy_given_token_dim(noisy) < heldout_token_dim(noise, noisy)
    assert 0.98 < heldout_token_dim(noise, noisy) < 1.05
