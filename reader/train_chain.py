"""A whole training chain without an orchestrator: data, each stage (trained, resumed or reused), export.

``flows.train_reader`` wraps each stage in a Prefect task; ``flows.fid_synthetic`` and
``bench.gpu_readers`` (a lent GPU, whose image has no Prefect) call these directly. Folders, resume
and reuse are the same either way: a stage folder written by one is reused by the other.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import ContextManager
from dataclasses import replace
from pathlib import Path

import torch

from .load import ReaderSpec, load_reader
from .supervision import Example, TrainingDataError, read_examples, targets, to_example
from .train import LEARNING_RATES, Stage, save_checkpoint, stage_done, stage_folder, train_stage


def load_examples(path: Path, index: str | None, retrieve: int = 20) -> tuple[list[Example], dict]:
    """Examples from a QA JSONL file; lines without passages are given retrieved ones from ``index``."""
    records = list(read_examples(path))
    missing = [record for _, record in records if not record.get("passages")]
    if missing:
        if index is None:
            number = next(n for n, r in records if not r.get("passages"))
            raise TrainingDataError(f"{path}:{number}: no \"passages\"; pass --index to retrieve them")
        attach_passages(missing, index, retrieve)
    examples, unanswerable = [], 0
    for _, record in records:
        example = to_example(record)
        if example is None:
            unanswerable += 1
        else:
            examples.append(example)
    return examples, {"lines": len(records), "retrieved": len(missing), "no_positive": unanswerable}


def attach_passages(records: list[dict], index: str, k: int) -> None:
    """Give each record the text of its top-k retrieved passages (in place)."""
    from storage.index import Index

    from .retriever import Retriever

    retriever, stored = Retriever(index), Index.open(index)
    for start in range(0, len(records), 64):
        chunk = records[start : start + 64]
        for record, hits in zip(chunk, retriever.search([r["question"] for r in chunk], k)):
            record["passages"] = [
                {"id": s.pid, "title": s.title, "text": s.text} for s in stored.fetch([h.row for h in hits])
            ]


def run_stage(
    stages: list[Stage],
    position: int,
    base: str,
    train: str,
    out: str,
    per_question: int,
    index: str | None,
    max_passage_tokens: int,
    split_layer: int | None,
    bf16: bool | None = None,
    family: str = "extractive",
    log: Callable[[str], None] | None = None,
) -> str:
    """Train (or resume, or reuse) one stage of a chain; returns its checkpoint folder.

    ``log``: where its lines go; by default ``print``, looked up per call, so that a Prefect task's
    log_prints (which swaps ``print`` while the task runs) sends them to the run's log.
    """
    log = log or print
    root, stage = Path(out), stages[position]
    folder = stage_folder(root, stages, position)
    if stage_done(folder, stage):
        trained_k = json.loads((folder / "btr.json").read_text())["split_layer"]
        if position == 0 and split_layer is not None and trained_k != split_layer:
            raise TrainingDataError(f"{folder} was trained for k={trained_k}, not k={split_layer}; use another --out")
        log(f"{folder.name}: already trained, reusing {folder}")
        return str(folder)
    previous = base if position == 0 else str(stage_folder(root, stages, position - 1))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Later stages take k from the previous stage's btr.json.
    k = split_layer if position == 0 else None
    spec = ReaderSpec(family, previous, k, max_passage_tokens)
    reader = load_reader(spec).to(device)
    teacher = None
    if stage.kind == "split" and (stage.distill or stage.span_distill):
        plain = str(stage_folder(root, stages, 0))
        teacher = load_reader(replace(spec, checkpoint=plain, split_layer=None)).to(device)
    examples, counts = load_examples(Path(train), index)
    data, dropped = targets(reader, examples, per_question, stage.max_positives, stage.question_word)
    log(f"{folder.name}: {len(data)} examples from {train} ({counts | dropped}) on {device}")
    summary = train_stage(reader, stage, data, folder, teacher, log=log, bf16=bf16)
    log(f"{folder.name}: done, final losses {summary['final_loss']}")
    return str(folder)


def control_chain(stages: list[Stage], control_steps: int) -> list[Stage]:
    """The fair baseline: the plain reader continued unsplit ``control_steps`` more steps at the split
    stage's learning rate, on the same batches (stage folder ``plain+plain``)."""
    return [stages[0], replace(stages[0], steps=control_steps, learning_rate=stages[1].learning_rate)]


def export_chain(out: str, stages: list[Stage], checkpoint: str, export: str, train: str, family: str = "extractive") -> None:
    """Write the chain's last stage to ``export`` in fp16, with every stage's training record (how
    reader/checkpoint, the default, is made)."""
    reader = load_reader(ReaderSpec(family, checkpoint))
    folders = [stage_folder(Path(out), stages, i) for i in range(len(stages))]
    training = {
        "chain": Path(checkpoint).name,
        "data": train,
        "stages": [json.loads((folder / "btr.json").read_text())["training"] for folder in folders],
    }
    save_checkpoint(reader, Path(export), training, dtype=torch.float16)


def train_chain(
    stages: list[Stage],
    base: str,
    train: str,
    out: str,
    per_question: int,
    max_passage_tokens: int,
    split_layer: int | None,
    index: str | None = None,
    bf16: bool | None = None,
    family: str = "extractive",
    control_steps: int | None = None,
    log: Callable[[str], None] | None = None,
) -> str:
    """Every stage of ``stages`` in turn (then the control, when ``control_steps``); the last stage's folder."""
    checkpoint = base
    for position in range(len(stages)):
        checkpoint = run_stage(
            stages, position, base, train, out, per_question, index, max_passage_tokens, split_layer, bf16, family, log,
        )
    if control_steps:
        run_stage(
            control_chain(stages, control_steps), 1, base, train, out, per_question, index, max_passage_tokens,
            split_layer, bf16, family, log,
        )
    return checkpoint


# Seconds per step of each stage kind relative to plain: split also runs the frozen teacher and the
# distillation; bits adds the recovery projection (measured on CPU at d = 384: about 1.6x and 1.15x).
STEP_COST = {"plain": 1.0, "split": 1.7, "bits": 1.2}


def step_seconds(
    base: str, train: str, per_question: int, max_passage_tokens: int, split_layer: int | None, batch_size: int,
    family: str = "extractive", steps: int = 30, bf16: bool | None = None, around: Callable[[], ContextManager] = nullcontext,
) -> float:
    """Wall seconds per plain-stage step on this machine, from a throwaway ``steps``-step run after an
    untimed warm-up; how ``fit_to_budget`` sizes a run to the time a lent GPU allows. (Timing the
    warm-up too made a GPU's step look 4x slower than it was: 0.56 s against 0.145 s.) ``around``: a
    context the timed steps run in (``bench.gpu_readers`` passes torch.profiler's)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reader = load_reader(ReaderSpec(family, base, split_layer, max_passage_tokens)).to(device)
    examples, _ = load_examples(Path(train), None)
    stage = Stage("plain", steps=steps, batch_size=batch_size, learning_rate=LEARNING_RATES["plain"])
    data, _ = targets(reader, examples[: 64 * batch_size], per_question, stage.max_positives, stage.question_word)
    quiet = lambda _: None  # noqa: E731
    with tempfile.TemporaryDirectory() as folder:  # warm-up first (CUDA kernels, allocator), untimed
        warm = replace(stage, steps=max(1, steps // 3))
        train_stage(reader, warm, data, Path(folder) / "warm", save_every=10**9, log=quiet, bf16=bf16)
        with around():
            began = time.perf_counter()
            train_stage(reader, stage, data, Path(folder) / "timed", save_every=10**9, log=quiet, bf16=bf16)
            return (time.perf_counter() - began) / steps


def fit_to_budget(stages: list[Stage], seconds_per_step: float, budget_s: float, control_steps: int = 0) -> tuple[list[Stage], int, float]:
    """Scale every stage's steps (and the control's) by one factor <= 1 so that the chain fits ``budget_s``.

    The control runs beside the chain (another process), so it counts once in its own right: the
    budget must hold the longer of plain + split + bits and plain + control. Returns the stages, the
    control's steps and the factor.
    """
    chain_s = sum(s.steps * STEP_COST[s.kind] for s in stages) * seconds_per_step
    control_s = (stages[0].steps + control_steps) * seconds_per_step
    factor = min(1.0, budget_s / max(chain_s, control_s, 1e-9))
    return [replace(s, steps=max(1, int(s.steps * factor))) for s in stages], int(control_steps * factor), factor
