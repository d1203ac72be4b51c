"""Bipartite token merging with sizes and padding."""

import pytest
import torch

from reader.merge import Tokens, bipartite_merge, merge_count


def tokens(batch=2, n=10, d=8, pad_from=None, seed=0) -> Tokens:
    torch.manual_seed(seed)
    size = torch.ones(batch, n)
    if pad_from is not None:
        size[:, pad_from:] = 0
    position = torch.arange(n, dtype=torch.float32).expand(batch, -1).clone()
    return Tokens(torch.randn(batch, n, d), size, position)


@pytest.mark.parametrize("ratio,expected", [(0.2, 8), (0.5, 5), (0.1, 9), (0.9, 5)])
def test_counts_shrink_by_the_requested_amount(ratio, expected):
    merged = bipartite_merge(tokens(n=10), ratio)
    assert len(merged) == 10 - merge_count(10, ratio) == expected


def test_sizes_sum_to_the_original_length_through_repeated_merges():
    t = tokens(n=33)
    for _ in range(5):
        t = bipartite_merge(t, 0.2)
        assert torch.allclose(t.size.sum(1), torch.full((2,), 33.0))
    assert len(t) < 33 * 0.8**4


def test_ratio_zero_is_the_identity():
    t = tokens()
    assert bipartite_merge(t, 0.0) is t


def test_merged_token_is_the_size_weighted_mean():
    hidden = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]]])
    t = Tokens(hidden, torch.tensor([[3.0, 1.0, 1.0, 1.0]]), torch.tensor([[0.0, 1.0, 2.0, 3.0]]))
    merged = bipartite_merge(t, 0.25)  # one merge: token 0 (size 3) into its near twin, token 1
    assert len(merged) == 3 and merged.size.sum() == 6
    row = (merged.size == 4).nonzero()[0, 1]
    assert torch.allclose(merged.hidden[0, row], torch.tensor([1.0, 0.025]))
    assert torch.isclose(merged.position[0, row], torch.tensor(0.25))


def test_padding_is_merged_first_and_never_changes_real_tokens():
    t = tokens(n=12, pad_from=8)  # 4 padding tokens per row
    merged = bipartite_merge(t, 1 / 6)  # two merges: both should consume padding
    real = merged.size > 0
    assert real.sum(1).tolist() == [8, 8]
    kept = {tuple(v.tolist()) for v in merged.hidden[0][real[0]]}
    assert kept == {tuple(v.tolist()) for v in t.hidden[0, :8]}


def test_key_bias_masks_padding_and_weights_sizes():
    t = Tokens(torch.zeros(1, 3, 4), torch.tensor([[2.0, 1.0, 0.0]]), torch.zeros(1, 3))
    bias = t.key_bias()[0, 0, 0]
    assert torch.isclose(bias[0], torch.log(torch.tensor(2.0))) and bias[1] == 0
    assert bias[2] <= torch.finfo(torch.float32).min / 2


def test_bad_ratio_is_rejected():
    with pytest.raises(ValueError, match="merge ratio"):
        merge_count(10, 1.0)
