"""A worker's shard as a pipeline, so that the device never waits on the host.

    tokenizer thread   lower-layer batches, then retriever batches, tokenized ahead  --(bounded queue)-->
    device loop        layers 1..k, sign bits packed and scales computed on the device; the retriever's
                       forward, pooled: only packed bits, fp16 scales and float32 vectors reach the host
    coding pool        codec encode and record packing, a lower batch a task (zstd releases the GIL)
    writer             the sealed LMDB shard, last (``storage.shard.write_shard``)

The batches are the serial path's own (``workers.build.encode_corpus``, ``reader.encoder.Encoder.embed``),
so the floats, bits and vectors are the same, and at the same zstd level so are the records: the tests
compare shard digests with the serial path's. The queue and the pool's backlog are bounded (``depth``
batches each): memory is a shard's records plus a few batches, whatever the number of shards. Without
threads (a CPU worker: ``workers.sizing``) the same stages run one after the other in the caller.

``Device`` is the device's half. ``Replay`` stands in for it with recorded outputs, so a benchmark can
time the host's half alone (``bench.workers``).
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field

import numpy as np
import torch

from reader.binary import pack_states
from reader.encoder import Encoder, passage_text
from reader.inputs import PassagePieces, encode_passages, pad
from reader.split import SplitReader
from storage.record import Passage, RecordFormat, encode_arrays

# Batches the tokenizer may run ahead of the device, and lower batches the coding pool may hold.
DEPTH = 4


@dataclass
class StageTimes:
    """Busy seconds per stage, summed over the threads that ran it (stages overlap: their sum exceeds the wall)."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.seconds[stage] += seconds

    def timed(self, stage: str, work: Callable, *args):
        start = time.perf_counter()
        try:
            return work(*args)
        finally:
            self.add(stage, time.perf_counter() - start)


@dataclass(frozen=True)
class LowerBatch:
    """A lower-layer batch: its passages' positions in the shard, padded ids and mask, real lengths."""

    chunk: list[int]
    ids: torch.Tensor
    mask: torch.Tensor
    lengths: list[int]


@dataclass(frozen=True)
class EmbedBatch:
    """A retriever batch: its passages' positions in the shard and the tokenizer's output."""

    chunk: list[int]
    tokens: dict


class Device:
    """The device's half of a shard: layers 1..k with the bits packed where they were computed, and the retriever."""

    def __init__(self, reader: SplitReader, encoder: Encoder | None) -> None:
        self.reader, self.encoder = reader, encoder

    def lower(self, batch: LowerBatch) -> tuple[np.ndarray, np.ndarray]:
        """Packed bits uint8 [B, L, d/8] and fp16 scales [B, L] of one batch, on the host."""
        with torch.no_grad():
            hidden = self.reader.lower(batch.ids, batch.mask).hidden
            bits, scale = pack_states(hidden, self.reader.calibration)
        return bits.cpu().numpy(), scale.cpu().numpy()

    def embed(self, batch: EmbedBatch) -> np.ndarray:
        """Unit vectors float32 [B, d] of one retriever batch."""
        return self.encoder.forward(batch.tokens)


class Replay:
    """Recorded outputs of a ``Device``, given back in the order they were recorded: the host's half timed alone."""

    def __init__(self) -> None:
        self.lowers: list[tuple[np.ndarray, np.ndarray]] = []
        self.embeds: list[np.ndarray] = []
        self.recording: Device | None = None

    def record(self, device: Device) -> "Replay":
        self.recording = device
        return self

    def replay(self) -> "Replay":
        self.recording, self._lower, self._embed = None, iter(self.lowers), iter(self.embeds)
        return self

    def lower(self, batch: LowerBatch) -> tuple[np.ndarray, np.ndarray]:
        if self.recording is not None:
            self.lowers.append(self.recording.lower(batch))
            return self.lowers[-1]
        return next(self._lower)

    def embed(self, batch: EmbedBatch) -> np.ndarray:
        if self.recording is not None:
            self.embeds.append(self.recording.embed(batch))
            return self.embeds[-1]
        return next(self._embed)


class Inline:
    """The coding pool of a worker without threads: each task runs at once, in the caller."""

    def submit(self, work: Callable, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(work(*args))
        except BaseException as error:  # noqa: BLE001 (raised again where the result is collected, as from a pool)
            future.set_exception(error)
        return future

    def shutdown(self, wait: bool = True) -> None:
        """Nothing to stop."""


@dataclass(frozen=True)
class ShardOutput:
    """What a shard's pipeline hands the writer: records in row order, their token count, the retriever's vectors."""

    records: list[bytes]
    tokens: int
    embeddings: np.ndarray  # [passages, 0] without an encoder


class ShardPipeline:
    """Runs shards through tokenizer thread, device loop and coding pool; one per worker, reused for every shard."""

    def __init__(
        self, reader: SplitReader, encoder: Encoder | None, fmt: RecordFormat, batch_size: int = 32, threads: int = 1,
        embed_batch_size: int = 64, device: Device | Replay | None = None, depth: int = DEPTH, share_tokens: bool = True,
    ) -> None:
        """``threads`` coding threads, and a tokenizer thread; 0: every stage in the caller, one after the other.

        A CPU worker takes 0: its forwards hold every core, and threads beside them made them 2.4x slower
        here (torch's OpenMP threads wait on a core another thread holds). ``encoder`` None: bits only, no
        retriever vectors (``bench.workers`` times the bits' pipeline alone). ``share_tokens``: tokenize each
        passage once for both models where their tokenizers allow it (``reader.inputs.PassagePieces``), checked
        against the direct tokenization on the first batches; False: twice, as the serial path does.
        """
        self.reader, self.encoder, self.format = reader, encoder, fmt
        self.batch_size, self.embed_batch_size, self.depth = batch_size, embed_batch_size, depth
        self.device = device or Device(reader, encoder)
        self.threaded = threads > 0
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="btr-code") if self.threaded else Inline()
        self.times = StageTimes()
        self.pieces = PassagePieces.shared_by(reader.tokenizer, encoder.tokenizer) if share_tokens and encoder else None
        self._unchecked = {"reader", "retriever"}  # composed ids not yet compared with the direct ones

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def run(self, passages: Sequence[Passage], progress: Callable[[int, int], None] | None = None) -> ShardOutput:
        """Records (in input order) and retriever vectors of ``passages``; ``progress(passages, tokens)`` per lower batch."""
        records: list[bytes | None] = [None] * len(passages)
        width = self.encoder.dimension if self.encoder is not None else 0
        embeddings = np.empty((len(passages), width), dtype=np.float32)
        pending: deque[Future] = deque()
        tokens = 0
        with closing(self._tokenized(passages)) as batches:  # an error here stops the tokenizer thread too
            for batch in batches:
                self._step(batch, passages, records, embeddings, pending, progress)
                tokens += sum(batch.lengths) if isinstance(batch, LowerBatch) else 0
        while pending:
            self._collect(pending.popleft(), records)
        return ShardOutput(records, tokens, embeddings)  # type: ignore[arg-type]

    def _step(
        self, batch: LowerBatch | EmbedBatch, passages: Sequence[Passage], records: list[bytes | None],
        embeddings: np.ndarray, pending: deque[Future], progress: Callable[[int, int], None] | None,
    ) -> None:
        """One batch through the device; a lower batch's coding handed to the pool (oldest collected past ``depth``)."""
        if isinstance(batch, EmbedBatch):
            embeddings[batch.chunk] = self.times.timed("device: retriever", self.device.embed, batch)
            return
        bits, scale = self.times.timed("device: lower layers + bits", self.device.lower, batch)
        if len(pending) >= self.depth:
            self._collect(pending.popleft(), records)
        pending.append(self.pool.submit(self._code, passages, batch, bits, scale))
        if progress is not None:
            progress(len(batch.chunk), sum(batch.lengths))

    def _collect(self, future: Future, records: list[bytes | None]) -> None:
        start = time.perf_counter()
        for position, record in future.result():
            records[position] = record
        self.times.add("waiting on the coding pool", time.perf_counter() - start)

    def _code(self, passages: Sequence[Passage], batch: LowerBatch, bits: np.ndarray, scale: np.ndarray) -> list:
        """Records of one lower batch (in the pool): codec encode and packing, per passage."""
        start = time.perf_counter()
        ids = batch.ids.numpy()
        out = []
        for row, (position, n) in enumerate(zip(batch.chunk, batch.lengths)):
            p = passages[position]
            out.append((position, encode_arrays(self.format, p.id, p.title, p.text, ids[row, :n], bits[row, :n], scale[row, :n])))
        self.times.add("code records", time.perf_counter() - start)
        return out

    def _tokenized(self, passages: Sequence[Passage]) -> Iterator[LowerBatch | EmbedBatch]:
        """The shard's batches, tokenized by a thread ahead of the caller (at most ``depth`` waiting)."""
        if not self.threaded:
            yield from self._batches(passages)
            return
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        done = object()

        def offer(item) -> bool:
            """Queue ``item``, unless the caller stopped listening (then the thread ends instead of blocking)."""
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for batch in self._batches(passages):
                    if not offer(batch):
                        return
                offer(done)
            except BaseException as error:  # noqa: BLE001 (handed to the caller, which raises it)
                offer(error)

        thread = threading.Thread(target=produce, name="btr-tokenize", daemon=True)
        thread.start()
        try:
            while True:
                start = time.perf_counter()
                item = ready.get()
                self.times.add("waiting on the tokenizer", time.perf_counter() - start)
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()

    def _batches(self, passages: Sequence[Passage]) -> Iterator[LowerBatch | EmbedBatch]:
        """Lower batches first (the pool starts coding while the retriever runs), then the retriever's."""
        order = sorted(range(len(passages)), key=lambda i: len(passages[i].text))  # as workers.build.encode_corpus
        limit = self.reader.config.max_passage_tokens
        pieces: list = [None] * len(passages)  # (title ids, text ids) of each passage, when shared
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            begin = time.perf_counter()
            batch = [passages[i] for i in chunk]
            direct = lambda: encode_passages(self.reader.tokenizer, self.reader.layout, batch, limit)  # noqa: E731
            ids = None
            if self.pieces is not None:
                split = self.pieces.split(batch)
                for i, piece in zip(chunk, split):
                    pieces[i] = piece
                ids = self.pieces.reader_ids(split, self.reader.layout, limit)
                ids = ids if self._agrees("reader", ids, direct) else None
            ids = direct() if ids is None else ids
            padded, mask = pad(ids, self.reader.layout.pad_id)
            if self.reader.device.type == "cuda":
                padded, mask = padded.pin_memory(), mask.pin_memory()
            self.times.add("tokenize", time.perf_counter() - begin)
            yield LowerBatch(chunk, padded, mask, [len(i) for i in ids])
        if self.encoder is None:
            return
        texts, ids = [passage_text(p) for p in passages], None
        if self.pieces is not None:  # the retriever's ids from the pieces the lower batches tokenized
            begin, limit = time.perf_counter(), self.encoder.max_tokens
            ids = self.pieces.retriever_ids(pieces, limit)
            sample = min(len(texts), self.embed_batch_size)
            direct = lambda: self.encoder.tokenizer(texts[:sample], truncation=True, max_length=limit)["input_ids"]  # noqa: E731
            ids = ids if self._agrees("retriever", ids[:sample], direct) else None
            self.times.add("tokenize", time.perf_counter() - begin)
        batches = self.encoder.batches(texts, self.embed_batch_size, ids)
        while True:
            begin = time.perf_counter()
            item = next(batches, None)
            self.times.add("tokenize", time.perf_counter() - begin)
            if item is None:
                return
            yield EmbedBatch(*item)

    def _agrees(self, model: str, composed: list[list[int]], direct: Callable[[], list[list[int]]]) -> bool:
        """Whether ids composed from shared pieces are the tokenizer's own: compared with ``direct`` once per pipeline
        and model; on a difference a warning, and no more sharing (the caller tokenizes directly)."""
        if model not in self._unchecked:
            return self.pieces is not None
        self._unchecked.discard(model)
        if direct() == composed:
            return True
        warnings.warn(f"the {model}'s passage ids composed from shared pieces differ from its tokenizer's: "
                      "this worker tokenizes for each model apart", stacklevel=2)
        self.pieces = None
        return False
