"""T5 shapes by name, and a T5 of one with random weights: no T5 checkpoint exists offline, so the
speed benchmark (``bench.reader``) and the synthetic BTR-FiD run (``flows.fid_synthetic``) start from these."""

from __future__ import annotations

import torch
from transformers import T5Config, T5ForConditionalGeneration

SHAPES = {
    "t5-base": dict(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12),
    "t5-large": dict(d_model=1024, d_ff=4096, d_kv=64, num_heads=16, num_layers=24, num_decoder_layers=24),
    "small": dict(d_model=256, d_ff=1024, d_kv=64, num_heads=4, num_layers=4, num_decoder_layers=3),  # the synthetic task's until the sixth session
    "tiny": dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=4, num_decoder_layers=4),  # tests; the synthetic task (docs/fid.md)
}


def random_t5(shape: str, tokenizer, seed: int = 0, **overrides) -> T5ForConditionalGeneration:
    """A T5 of the given shape with random weights over ``tokenizer``'s ids (its separator ends answers)."""
    config = T5Config(
        vocab_size=32128, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, **(SHAPES[shape] | overrides),
    )
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config)
