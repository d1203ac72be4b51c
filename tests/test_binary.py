"""Bits: packing, calibration, the straight-through estimator, record checks."""

import pytest
import torch

from reader.binary import binarize, restore, to_binary_batch, to_binary_tokens, token_scale
from storage.bits import BinaryTokens, IncompatibleRepresentation, pack_bits, unpack_bits


@pytest.mark.parametrize("calibration", ["rms", "mean_abs"])
def test_pack_unpack_calibrate_gives_scaled_signs(calibration):
    torch.manual_seed(0)
    hidden = torch.randn(7, 64) * 50 + 3  # T5-like magnitudes
    record = to_binary_tokens(torch.arange(7), hidden, split_layer=3, calibration=calibration)
    assert record.bits.dtype == torch.uint8 and record.bits.shape == (7, 8)
    assert record.scale.dtype == torch.float16
    signs = unpack_bits(record.bits)
    assert torch.equal(signs, torch.where(hidden >= 0, 1.0, -1.0))
    expected = torch.where(hidden >= 0, 1.0, -1.0) * token_scale(hidden, calibration)
    assert torch.allclose(restore(signs, record.scale[:, None].float()), expected, rtol=1e-3)


def test_rms_calibration_restores_the_norms_variance():
    torch.manual_seed(0)
    hidden = torch.randn(5, 32) * torch.tensor([1.0, 10.0, 100.0, 300.0, 0.1])[:, None]
    signs, scale = binarize(hidden, "rms")
    restored = restore(signs, scale)
    assert torch.allclose(restored.pow(2).mean(-1), hidden.pow(2).mean(-1), rtol=1e-5)


def test_mean_abs_is_the_least_squares_scale():
    torch.manual_seed(0)
    hidden = torch.randn(4, 32)
    signs, scale = binarize(hidden, "mean_abs")
    errors = [((hidden - signs * (scale * f)) ** 2).sum() for f in (0.9, 1.0, 1.1)]
    assert errors[1] < errors[0] and errors[1] < errors[2]


def test_packing_is_little_endian_and_exact():
    signs = torch.tensor([[1, -1, -1, -1, -1, -1, -1, -1, -1, 1, -1, -1, -1, -1, -1, 1]], dtype=torch.float32)
    packed = pack_bits(signs)
    assert packed.tolist() == [[1, 2 + 128]]
    assert torch.equal(unpack_bits(packed), signs)


def test_packing_rejects_sizes_not_divisible_by_eight():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_bits(torch.ones(2, 12))


def test_straight_through_gradient_is_tanh_derivative():
    x = torch.tensor([[-2.0, -0.5, 0.0, 0.3, 4.0, 1.0, -1.0, 0.1]], requires_grad=True)
    signs, scale = binarize(x, "rms")
    (signs * torch.arange(8.0)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # Straight-through part alone: with the scale held fixed, d sign(x/s)/dx = tanh'(x/s) / s.
    y = x.detach().clone().requires_grad_(True)
    s = scale.detach()
    from reader.binary import ste_sign

    (ste_sign(y / s) * torch.arange(8.0)).sum().backward()
    expected = torch.arange(8.0) * (1 - torch.tanh(x.detach() / s) ** 2) / s
    assert torch.allclose(y.grad, expected, atol=1e-6)


def test_record_check_names_what_differs():
    record = to_binary_tokens(torch.arange(3), torch.randn(3, 16), split_layer=2, calibration="rms")
    record.check_compatible(2, 16, "rms")
    with pytest.raises(IncompatibleRepresentation, match="k=2.*k=3"):
        record.check_compatible(3, 16, "rms")
    with pytest.raises(IncompatibleRepresentation, match="hidden size 16.*hidden size 32"):
        record.check_compatible(2, 32, "rms")


def test_inconsistent_record_is_rejected():
    with pytest.raises(ValueError, match="inconsistent"):
        BinaryTokens(torch.arange(3), torch.zeros(2, 2, dtype=torch.uint8), torch.ones(3), 1, 16, "rms")


@pytest.mark.parametrize("calibration", ["rms", "mean_abs"])
def test_a_batch_binarized_at_once_gives_each_passage_its_own_record(calibration):
    torch.manual_seed(1)
    hidden = torch.randn(3, 9, 64) * 20
    hidden[0, 0, :4] = 0.0  # a zero state is a +1 sign, in both paths
    ids = torch.randint(0, 1000, (3, 9))
    lengths = [9, 5, 1]
    batch = to_binary_batch(ids, hidden, lengths, split_layer=2, calibration=calibration)
    for i, n in enumerate(lengths):
        alone = to_binary_tokens(ids[i, :n], hidden[i, :n], split_layer=2, calibration=calibration)
        assert torch.equal(batch[i].token_ids, alone.token_ids) and torch.equal(batch[i].scale, alone.scale)
        assert torch.equal(batch[i].bits, alone.bits)
        # and the bits are those of the straight-through signs the reader trains with
        signs, _ = binarize(hidden[i, :n], calibration)
        assert torch.equal(unpack_bits(batch[i].bits), signs)


def test_numpy_packing_matches_the_bit_order_of_the_tensor_formula():
    signs = torch.where(torch.randn(4, 5, 32) >= 0, 1.0, -1.0)
    weights = 1 << torch.arange(8, dtype=torch.uint8)
    formula = ((signs > 0).to(torch.uint8).reshape(4, 5, 4, 8) * weights).sum(-1, dtype=torch.uint8)
    assert torch.equal(pack_bits(signs), formula)
