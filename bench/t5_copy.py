"""Does a randomly initialised small T5 learn to copy an answer out of one passage? The optimizer decides.

    python -m bench.t5_copy --optimizer adamw --learning-rate 1e-3 --steps 1500
    python -m bench.t5_copy --optimizer adafactor --steps 1500

A control for docs/fid.md that uses none of the project's training code: the synthetic task's
questions (``flows.synthetic_qa``, open values) each with only the asked person's passage, fed to
``T5ForConditionalGeneration`` ("question [SEP] title [SEP] passage" -> answer) at ``reader.t5_shapes``'
small shape, batch 16, one thread, no schedule. Copying the asked relation's value brings the answer
loss from about 4 (one of 3,000 values per relation, per token of answer + end) towards 0. Prints
the loss every 25 steps and the mean of each 250-step window; ``--json`` prints the windows only.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from flows.synthetic_qa import generate, lesson
from reader.assets import minilm_path
from reader.t5_shapes import random_t5


def one_passage_questions(count: int) -> list[dict]:
    """``count`` training questions of the synthetic task, each with the asked person's passage alone."""
    with tempfile.TemporaryDirectory() as folder:
        generate(Path(folder), values="open", train_questions=count)
        return [lesson(json.loads(line), "passage") for line in (Path(folder) / "train.jsonl").read_text().splitlines()]


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m bench.t5_copy", description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", choices=("adamw", "adafactor"), default="adafactor",
                        help="adafactor: T5's own, relative steps; adamw: a fixed rate, --learning-rate "
                             "(default: %(default)s)")
    parser.add_argument("--learning-rate", type=float,
                        help="AdamW's rate; Adafactor uses its relative step (default: 1e-3)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps of 16 questions (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print only the mean loss of each 250-step window, indented "
                             "(default: off: the loss every 25 steps too)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    model = random_t5("small", tokenizer, dropout_rate=0.0)
    if args.optimizer == "adafactor":  # T5's own: steps relative to each weight's scale, 1e-2 until step 10,000
        from transformers.optimization import Adafactor

        optimizer = Adafactor(model.parameters(), lr=None, scale_parameter=True, relative_step=True, warmup_init=False)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate or 1e-3)
    records, rng, losses, began = one_passage_questions(20_000), random.Random(0), [], time.perf_counter()
    for step in range(args.steps):
        batch = rng.sample(records, 16)
        source = tokenizer([f"{r['question']} [SEP] {r['passages'][0]['title']} [SEP] {r['passages'][0]['text']}" for r in batch],
                           padding=True, truncation=True, max_length=80, return_tensors="pt")
        target = tokenizer([r["answers"][0] for r in batch], padding=True, add_special_tokens=False, return_tensors="pt")
        labels = torch.cat([target.input_ids, torch.full((len(batch), 1), tokenizer.sep_token_id)], 1)
        labels[torch.cat([target.attention_mask, torch.ones(len(batch), 1, dtype=torch.long)], 1) == 0] = -100
        loss = model(input_ids=source.input_ids, attention_mask=source.attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 25 == 0 and not args.json:
            print(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - began:.0f} s)", flush=True)
    windows = {f"{i}-{min(i + 250, len(losses)) - 1}": round(sum(losses[i:i + 250]) / len(losses[i:i + 250]), 3)
               for i in range(0, len(losses), 250)}
    print(json.dumps({"optimizer": args.optimizer, "steps": args.steps, "mean_loss_by_window": windows}, indent=1 if args.json else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
