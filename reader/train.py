"""Training a BTR reader (extractive or FiD): one stage of the paper's three, resumable.

1. ``plain``: the unsplit reader on the task loss;
2. ``split``: the split reader (continuous lower states) from stage 1, task loss + query-aware
   passage token distillation: MSE to the frozen stage-1 reader's last-layer passage states, on the
   top half of each passage's tokens ranked by the teacher's query-to-passage attention (averaged
   over the upper layers and heads);
3. ``bits``: binarization on (straight-through sign), task loss + passage representation recovery:
   a linear map W b + c of the bits trained to give back h_k (MSE averaged over d; h_k detached, so
   the loss shapes the lower layers through the bits).

The stage machinery is the same for both families; each supplies its task loss (``reader.losses``). FiD:
teacher-forced cross-entropy of the answer with the decoder reading all of a question's passages.
The extractive task loss fits distant supervision (Clark & Gardner 2018; the DPR reader): shared
normalization, the start (and end) logits of all the passages of a question form one softmax, so
spans in passages without the answer learn to score low; and a marginal likelihood over every
occurrence of every answer in the positive passages, -log of the summed probability of all gold
starts (and of all gold ends), not a pick of one occurrence. The examples and their gold spans
come from ``reader.supervision``.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

from .extractive import ExtractiveReader
from .heads import ReaderHeads
from .inputs import pad
from .split import SplitReader
from .losses import TASK_LOSSES, distillation_loss, recovery_loss, relevance_loss, span_distillation_loss
from .supervision import Target, TrainingDataError, batch_order, example_tokens

STAGES = ("plain", "split", "bits")
OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("linear", "constant")
HEADS_LR_SCALE = 10  # the match vector and relevance head start at zero; the encoder is pretrained
ANSWER_SETTINGS = ("relevance_weight", "retrieval_weight")  # the answer rule, kept in btr.json
SETTINGS_FILE = "btr.json"


@dataclass(frozen=True)
class Stage:
    """One training stage: which mode it trains, its extra losses, and its optimisation settings."""

    kind: str  # plain | split | bits
    distill: bool = True  # split stage only
    span_distill: float = 0.0  # split stage, extractive: weight of the KL to the plain reader's span distributions
    recovery: bool = True  # bits stage only
    steps: int = 200
    batch_size: int = 8
    learning_rate: float = 5e-5
    seed: int = 0
    heads: bool = False  # question-word match + passage relevance (reader.heads), added at the first stage
    max_positives: int = 2  # passages holding an answer per question (reader.supervision.targets)
    question_word: bool = False  # a positive must share a content word with the question
    optimizer: str = "adamw"  # or "adafactor": T5's own, steps relative to each weight's scale (a T5 from scratch)
    schedule: str = "linear"  # the rate after the warm-up (10% of the steps): "linear" decay to 0, or "constant"

    def __post_init__(self) -> None:
        if self.kind not in STAGES:
            raise ValueError(f"unknown stage {self.kind!r}; expected one of {', '.join(STAGES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")

    @property
    def mode(self) -> str:
        return {"plain": "baseline", "split": "split", "bits": "btr"}[self.kind]

    @property
    def name(self) -> str:
        """The stage's folder name; the switched-off loss is part of it so ablations never collide."""
        suffix = {"split": ("" if self.distill else "-nodistill") + (f"-spans{self.span_distill:g}" if self.span_distill else ""),
                  "bits": "" if self.recovery else "-norecovery"}
        return self.kind + suffix.get(self.kind, "")


def stage_losses(reader, stage: Stage, chosen: Sequence[Target], teacher=None, projection=None) -> dict[str, torch.Tensor]:
    """The losses of one training step (``loss`` is their sum)."""
    batch = reader.prepare([t.example.question for t in chosen], [t.passages for t in chosen])
    losses: dict[str, torch.Tensor] = {}
    if stage.kind == "plain":
        pairs = reader.encode_pairs(batch, "baseline")
    elif stage.kind == "split":
        pairs = reader.encode_pairs(batch, "split")
        if teacher is not None:
            with torch.no_grad():
                taught, attention = teacher._encode_unsplit(batch, attention_from=reader.split_layer)
            if stage.distill:
                losses["distill"] = distillation_loss(pairs, taught, attention, batch.passage_width)
            if stage.span_distill:
                if not isinstance(reader, ExtractiveReader):
                    raise TrainingDataError("span_distill needs an extractive reader (FiD answers by generating, not by spans)")
                losses["spans"] = stage.span_distill * span_distillation_loss(reader, teacher, batch, pairs, taught)
    else:
        states = reader.lower(*pad(batch.passage_ids, reader.layout.pad_id))
        restored, signs = reader.binarized(states)
        pairs = reader.encode_pairs(batch, "btr", passages=restored)
        if projection is not None:
            losses["recovery"] = recovery_loss(projection, signs, states, reader.calibration)
    losses["task"] = TASK_LOSSES[type(reader)](reader, batch, chosen, pairs, stage.mode)
    if reader.heads is not None:
        losses["relevance"] = relevance_loss(reader, batch, chosen, pairs)
    losses["loss"] = sum(losses.values())
    return losses


def eager_attention(model: torch.nn.Module) -> None:
    """Attention weights the distillation can read: eager attention in ``model`` and in every pretrained
    module inside it. Setting it on the top model alone left T5's encoder stack on sdpa in transformers
    5.17 (its config is its own), and sdpa returns no weights: the FiD split stage failed on a GPU."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.set_attn_implementation("eager")


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _random_state(device: torch.device) -> dict:
    """Every generator a step may draw from (dropout, stage code), so a resumed stage draws the same."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_random_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def stage_done(folder: Path, stage: Stage) -> bool:
    """Whether a stage folder holds this stage's finished checkpoint (another stage's is an error)."""
    path = folder / SETTINGS_FILE
    if not path.exists():
        return False
    trained = json.loads(path.read_text()).get("training", {}).get("stage", {})
    if trained:  # a setting added after the stage was trained: it trained at that setting's default
        trained = {f.name: f.default for f in fields(Stage) if f.name not in trained} | trained
    wanted = asdict(stage) | {"name": stage.name, "mode": stage.mode}
    if trained != wanted:
        changed = sorted(k for k in wanted if trained.get(k) != wanted[k])
        raise TrainingDataError(
            f"{folder} holds a stage trained with other settings ({', '.join(changed)} differ); "
            "train into another folder or delete it"
        )
    return True


def rate_factor(stage: Stage, step: int) -> float:
    """The stage's rate at ``step`` as a fraction of its peak: a linear warm-up over the first 10% of the
    steps, then linear decay to 0 or, for a T5 trained from scratch (T5's own schedule), constant."""
    warmup = max(1, stage.steps // 10)
    after = 1.0 if stage.schedule == "constant" else max(0.0, (stage.steps - step) / max(1, stage.steps - warmup))
    return min((step + 1) / warmup, after)


def make_optimizer(stage: Stage, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """The stage's optimizer over parameter ``groups`` (the stage's schedule scales its rate).

    AdamW moves every weight by about the same absolute step. A randomly initialised T5's weights
    differ in scale by 100x (embeddings 1.0, query projections (d_model x d_kv)^-1/2: 0.008 at d = 256),
    so at a rate that moves its embeddings at all, AdamW rewrites a wide T5's attention every step.
    Adafactor, which T5 was pretrained with, scales each step by the weight's own RMS
    (``scale_parameter``): the same relative change everywhere. The synthetic FiD task was learned with
    AdamW at 1e-3 by the d = 64 shape (query projections 0.03), not yet with either at d = 256 (docs/fid.md).
    """
    if stage.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=stage.learning_rate, scale_parameter=True, relative_step=False, warmup_init=False)
    # fused: one kernel per step on a GPU for AdamW's update instead of several per parameter group
    return torch.optim.AdamW(groups, lr=stage.learning_rate, weight_decay=0.01, fused=device.type == "cuda")


def train_stage(
    reader: SplitReader,
    stage: Stage,
    data: Sequence[Target],
    out: Path,
    teacher: SplitReader | None = None,
    save_every: int = 25,
    log: Callable[[str], None] = print,
    bf16: bool | None = None,
) -> dict:
    """Train ``reader`` in place for one stage, checkpointing to ``out`` and resuming from it.

    ``bf16``: autocast the forward pass to bfloat16 (weights and optimizer stay fp32); None = on a
    GPU only. On a CPU with AVX-512 BF16 it is also faster (about 2x per step at 128-token passages).
    """
    if not data:
        raise TrainingDataError("no usable training examples (every answer cut off by truncation, or too few passages)")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(stage.seed)
    np.random.seed(stage.seed)
    random.seed(stage.seed)
    if stage.heads and reader.heads is None:
        reader.attach_heads(ReaderHeads(reader.hidden_size))
    projection = None
    if stage.kind == "bits" and stage.recovery:
        projection = torch.nn.Linear(reader.hidden_size, reader.hidden_size).to(reader.device)
    parameters = list(reader.parameters()) + (list(projection.parameters()) if projection else [])
    heads = {id(p) for p in reader.heads.parameters()} if reader.heads is not None else set()
    groups = [{"params": [p for p in parameters if id(p) not in heads]}]
    if heads:  # fresh, zero-initialised heads learn at HEADS_LR_SCALE x the stage's rate
        groups.append({"params": list(reader.heads.parameters()), "lr": stage.learning_rate * HEADS_LR_SCALE})
    optimizer = make_optimizer(stage, groups, reader.device)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(rate_factor, stage))
    first = 0
    resume = out / "resume.pt"
    if resume.exists():
        state = torch.load(resume, map_location=reader.device, weights_only=False)
        reader.model.load_state_dict(state["model"])
        if reader.heads is not None:
            reader.heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if projection is not None:
            projection.load_state_dict(state["projection"])
        first = state["step"]
        if "random" in state:
            _restore_random_state(state["random"], reader.device)
        else:  # saved before resume.pt kept it: hours of steps are worth more than bit-identical dropout masks
            log(f"{stage.name}: {resume} holds no random state; the resumed steps draw other dropout masks")
        log(f"{stage.name}: resuming at step {first} of {stage.steps}")
    curve = out / "loss.jsonl"
    kept = [line for line in curve.read_text().splitlines() if json.loads(line)["step"] <= first] if curve.exists() else []
    curve.write_text("".join(line + "\n" for line in kept))
    if teacher is not None:
        eager_attention(teacher.model)
        teacher.eval().requires_grad_(False)
    reader.train()
    bf16 = reader.device.type == "cuda" if bf16 is None else bf16
    lengths = [example_tokens(reader, t) for t in data]
    batches = batch_order(len(data), stage.steps, stage.batch_size, stage.seed, lengths)
    began, recent = time.perf_counter(), []
    for step in range(first, stage.steps):
        with torch.autocast(reader.device.type, dtype=torch.bfloat16, enabled=bf16):
            losses = stage_losses(reader, stage, [data[i] for i in batches[step]], teacher, projection)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        values = {name: round(value.item(), 5) for name, value in losses.items()}
        recent.append(values["loss"])
        with open(curve, "a") as f:
            f.write(json.dumps({"step": step + 1, **values, "lr": schedule.get_last_lr()[0]}) + "\n")
        if (step + 1) % 10 == 0 or step + 1 == stage.steps:
            rate = (step + 1 - first) / (time.perf_counter() - began)
            log(f"{stage.name}: step {step + 1}/{stage.steps} loss {sum(recent) / len(recent):.4f} "
                + " ".join(f"{k} {v:.4f}" for k, v in values.items() if k != "loss") + f" ({rate:.2f} steps/s)")
            recent = []
        if (step + 1) % save_every == 0 and step + 1 < stage.steps:
            state = {"model": reader.model.state_dict(), "optimizer": optimizer.state_dict(),
                     "schedule": schedule.state_dict(), "step": step + 1, "random": _random_state(reader.device)}
            if projection is not None:
                state["projection"] = projection.state_dict()
            if reader.heads is not None:
                state["heads"] = reader.heads.state_dict()
            _atomic_save(state, resume)
    reader.eval()
    final = [json.loads(line) for line in curve.read_text().splitlines()[-10:]]
    summary = {
        "stage": asdict(stage) | {"name": stage.name, "mode": stage.mode},
        "examples": len(data),
        "final_loss": {k: round(sum(r[k] for r in final) / len(final), 4) for k in final[-1] if k not in ("step", "lr")},
    }
    save_checkpoint(reader, out, summary)
    if projection is not None:
        torch.save(projection.state_dict(), out / "recovery.pt")
    resume.unlink(missing_ok=True)
    return summary


def save_checkpoint(reader: SplitReader, out: Path, training: dict, dtype: torch.dtype | None = None) -> None:
    """``save_pretrained`` (model + tokenizer) plus btr.json: the split an index records and the reader checks."""
    model = reader.model if dtype is None else copy.deepcopy(reader.model).to(dtype)
    model.save_pretrained(out)
    reader.tokenizer.save_pretrained(out)
    if reader.heads is not None:
        reader.heads.save(out, dtype)
    settings = {
        "family": type(reader).__name__,
        "split_layer": reader.split_layer,
        "calibration": reader.calibration,
        "hidden_size": reader.hidden_size,
        "max_query_tokens": reader.config.max_query_tokens,
        "training": training,
        "answer": {name: getattr(reader, name) for name in ANSWER_SETTINGS if hasattr(reader, name)},
        "done": True,
    }
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")


LEARNING_RATES = {"plain": 1e-4, "split": 2e-4, "bits": 1e-4}


def chain(
    distill: bool = True,
    recovery: bool = True,
    learning_rate: float | None = None,
    steps: int = 200,
    split_steps: int | None = None,
    bits_steps: int | None = None,
    span_distill: float = 0.0,
    **settings,
) -> list[Stage]:
    """The three stages with the ablation switches; ``settings`` (batch_size, seed) apply to all.

    ``steps`` is every stage's length unless ``split_steps`` / ``bits_steps`` say otherwise.
    Without a learning rate each stage takes its own from LEARNING_RATES: the plain stage trains a
    fresh span head; the split stage must teach three layers the query-passage matching the lower
    layers no longer do, and learns it faster at 2e-4 than at 5e-5 (150 steps without distillation:
    14.7 against 9.3 EM on the first 150 development questions).
    """
    lengths = {"plain": steps, "split": split_steps or steps, "bits": bits_steps or steps}
    stages = [Stage("plain", **settings), Stage("split", distill=distill, span_distill=span_distill, **settings),
              Stage("bits", recovery=recovery, **settings)]
    return [replace(s, steps=lengths[s.kind], learning_rate=learning_rate or LEARNING_RATES[s.kind]) for s in stages]


def stage_folder(root: Path, stages: Sequence[Stage], index: int) -> Path:
    """Folder of stage ``index`` in a chain: named by every stage up to it, so ablations share prefixes."""
    return root / "+".join(s.name for s in stages[: index + 1])
