"""How a node's cores and GPUs are shared among index workers: ``size_workers`` (no Ray here: a bench imports it)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def gpu_share(gpus: int, count: int) -> float:
    """The GPU fraction each of ``count`` workers asks Ray for on a cluster of ``gpus`` GPUs: one each,
    or an equal share when there are more workers than GPUs (floored to Ray's 1e-4 resolution so the
    shares fit). Since the worker is a pipeline (``workers.pipeline``) one worker per GPU is the default; more
    share it when ``--workers`` asks for them (before, a worker beyond the GPU count never started)."""
    if gpus <= 0:
        return 0.0
    return 1.0 if count <= gpus else math.floor(10_000 * gpus / count) / 10_000


@dataclass(frozen=True)
class Sizing:
    """How a node's cores and GPUs are shared among index workers (``size_workers``)."""

    workers: int
    cpus: int  # each worker reserves this many of Ray's CPUs
    torch_threads: int  # intra-op threads of its forwards
    pool_threads: int  # its coding pool (workers.pipeline)
    gpu: float  # its share of a GPU (0 on CPU)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        device = f"{self.gpu:g} GPU" if self.gpu else "CPU only"
        threads = f"{self.pool_threads} coding thread(s) and a tokenizer thread" if self.pool_threads else "no threads beside them"
        return f"{self.workers} worker(s), each {device}, {self.cpus} CPU(s): {self.torch_threads} torch thread(s), {threads}"


def size_workers(cpus: int, gpus: int, workers: int = 0, threads: int = 0) -> Sizing:
    """Workers and their threads from the cluster's CPUs and GPUs; ``workers``, ``threads`` (CPUs a worker) override.

    By default one worker per GPU (its pipeline keeps the GPU fed from one process; the forwards need no more
    than a couple of host threads), the node's cores split among the workers, and on a GPU all but two of a
    worker's cores (its device loop and tokenizer thread) code records. Without a GPU the forwards are the
    work: one worker, every core to torch, and no threads beside them (``workers.pipeline.ShardPipeline``).
    """
    count = workers or gpus or 1
    share = threads or max(1, cpus // count)
    if gpus:
        return Sizing(count, share, min(2, share), max(1, share - 2), gpu_share(gpus, count))
    return Sizing(count, share, share, 0, 0.0)
