"""Training an inverted-file index's quantizers as units of a ``storage.tasks.Runner``: no process holds
the training sample, and the trained index is the same bytes whatever runs the units.

faiss's ``index.train`` is one process: a k-means over the whole sample for the coarse quantizer, then
(IVF-PQ) a k-means per sub-quantizer over the sample's residuals. At 1M passages that is half the
retriever build, and it does not get faster with more workers. Here the same algorithms are cut into
units:

- the sample (the first ``train_size`` vectors in row order, as before) is ``CHUNKS`` fixed row ranges
  of the embedding files, read by memory map;
- coarse quantizer: ``COARSE_ITERATIONS`` Lloyd iterations. In each, a unit per chunk assigns its
  vectors to the nearest centroid by inner product and writes per-centroid sums and counts; the
  driver adds them up in chunk order in float64 and normalizes the means (the spherical k-means faiss
  runs for an inner-product IVF). A centroid that gets no vector keeps its place. Starting centroids:
  ``nlist`` sample vectors drawn with a fixed seed;
- product quantizer: a unit per chunk writes the residuals (vector minus its centroid) of the chunk's
  share of a fixed seeded subset of the sample (``PQ_POINTS_PER_CODE`` per code, faiss's cap), then a
  unit per group of sub-quantizers runs faiss's k-means on those columns, one thread;
- the index is faiss's own (``index_factory``), its quantizer and codebooks filled in.

Chunks, seeds and the order of every sum are fixed by the sample, not by the runner, so one process and
a cluster of any size train identical indexes (tested).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from storage.tasks import Runner, serial

CHUNKS = 16  # sample chunks: units per Lloyd iteration
COARSE_ITERATIONS = 10  # faiss's default for an IVF's coarse quantizer
PQ_ITERATIONS = 25  # faiss's default for a product quantizer
PQ_POINTS_PER_CODE = 256  # faiss's max_points_per_centroid: 65,536 residuals for 8-bit codes
PQ_GROUPS = 8  # units training the sub-quantizers
SEED = 1234  # faiss's clustering seed

Source = str | np.ndarray  # a .npy file's path (what a cluster's units are given) or the vectors (one process)
Slice = tuple[Source, int, int]  # rows [start, stop) of one source


def sample_chunks(files: Sequence[Source], lengths: Sequence[int], train_size: int, chunks: int = CHUNKS) -> list[list[Slice]]:
    """The first ``train_size`` rows of ``files`` (in order) as ``chunks`` near-equal row ranges, each a list of slices."""
    total = min(train_size, sum(lengths))
    bounds = np.linspace(0, total, min(chunks, total) + 1).astype(int)
    out: list[list[Slice]] = []
    for low, high in zip(bounds[:-1], bounds[1:]):
        slices, first = [], 0
        for path, length in zip(files, lengths):
            start, stop = max(low, first), min(high, first + length)
            if start < stop:
                slices.append((path if isinstance(path, np.ndarray) else str(path), int(start - first), int(stop - first)))
            first += length
        out.append(slices)
    return out


def _rows(slices: Sequence[Slice]) -> np.ndarray:
    parts = [(np.load(src, mmap_mode="r") if isinstance(src, str) else src)[a:b] for src, a, b in slices]
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


@contextmanager
def _one_thread() -> Iterator[None]:
    """faiss on one thread inside (the same float sums in a Ray task and in a process with many cores), restored after."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _nearest(centroids: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Each row's centroid of largest inner product (exact search)."""
    flat = faiss.IndexFlatIP(centroids.shape[1])
    flat.add(centroids)
    with _one_thread():
        return flat.search(x, 1)[1][:, 0]


def _per_chunk(chunks: list[list[Slice]], picks: np.ndarray) -> list[np.ndarray]:
    """Sorted sample-wide row numbers ``picks``, split into each chunk's row offsets."""
    firsts = np.cumsum([0] + [sum(b - a for _, a, b in chunk) for chunk in chunks])
    return [picks[(picks >= lo) & (picks < hi)] - lo for lo, hi in zip(firsts[:-1], firsts[1:])]


def _sample_size(chunks: list[list[Slice]]) -> int:
    return sum(b - a for chunk in chunks for _, a, b in chunk)


def coarse_step(centroids: str, slices: Sequence[Slice], out: str) -> str:
    """One unit of a Lloyd iteration: the chunk's per-centroid sums (float64) and counts, saved to ``out``."""
    c, x = np.load(centroids), _rows(slices)
    labels = _nearest(c, x)
    order = np.argsort(labels, kind="stable")
    present, starts = np.unique(labels[order], return_index=True)
    sums = np.zeros(c.shape, dtype=np.float64)
    sums[present] = np.add.reduceat(x[order].astype(np.float64), starts, axis=0)
    np.savez(out, sums=sums, counts=np.bincount(labels, minlength=len(c)))
    return out


def residuals(centroids: str, slices: Sequence[Slice], rows: Sequence[int], out: str) -> str:
    """One unit: the residuals of the chunk's ``rows`` (offsets in the chunk) to their nearest centroid."""
    c, x = np.load(centroids), _rows(slices)[np.asarray(rows, dtype=np.int64)]
    np.save(out, x - c[_nearest(c, x)])
    return out


def pq_group(parts: Sequence[str], subquantizers: Sequence[int], dsub: int, ksub: int, out: str) -> str:
    """One unit: faiss's k-means for each of ``subquantizers`` over its columns of the residuals; codebooks to ``out``."""
    books = []
    for m in subquantizers:
        x = np.ascontiguousarray(np.concatenate([np.load(p, mmap_mode="r")[:, m * dsub:(m + 1) * dsub] for p in parts]))
        kmeans = faiss.Kmeans(dsub, ksub, niter=PQ_ITERATIONS, seed=SEED + m, max_points_per_centroid=len(x) // ksub + 1)
        with _one_thread():
            kmeans.train(x)
        books.append(kmeans.centroids)
    np.save(out, np.stack(books))
    return out


def train_coarse(chunks: list[list[Slice]], nlist: int, run: Runner, scratch: Path) -> np.ndarray:
    """The coarse quantizer's ``nlist`` unit-norm centroids, by ``COARSE_ITERATIONS`` Lloyd iterations of units."""
    total = _sample_size(chunks)
    if total < nlist:
        raise ValueError(f"{total} training vectors for {nlist} inverted lists: need at least one per list")
    picks = np.sort(np.random.RandomState(SEED).choice(total, nlist, replace=False))
    centroids = np.concatenate([_rows(chunk)[rows] for chunk, rows in zip(chunks, _per_chunk(chunks, picks))])
    for iteration in range(COARSE_ITERATIONS):
        path = str(scratch / f"centroids-{iteration}.npy")
        np.save(path, centroids)
        outs = run(coarse_step, [(path, chunk, str(scratch / f"sums-{iteration}-{i}.npz")) for i, chunk in enumerate(chunks)])
        sums, counts = np.zeros(centroids.shape, dtype=np.float64), np.zeros(nlist, dtype=np.int64)
        for out in outs:  # chunk order: the same float64 additions whatever ran the units
            with np.load(out) as part:
                sums += part["sums"]
                counts += part["counts"]
            Path(out).unlink()  # nlist x d x 8 bytes each: 56 MB at 21M passages
        Path(path).unlink()
        moved = counts > 0
        means = sums[moved] / np.linalg.norm(sums[moved], axis=1, keepdims=True).clip(1e-30)
        centroids = centroids.copy()
        centroids[moved] = means.astype(np.float32)
    return centroids


def train_pq(chunks: list[list[Slice]], centroids: np.ndarray, m: int, ksub: int, run: Runner, scratch: Path) -> np.ndarray:
    """The product quantizer's codebooks [m, ksub, d / m] over a seeded subset of the sample's residuals."""
    total, dsub = _sample_size(chunks), centroids.shape[1] // m
    chosen = np.sort(np.random.RandomState(SEED + 1).choice(total, min(total, PQ_POINTS_PER_CODE * ksub), replace=False))
    path = str(scratch / "centroids-final.npy")
    np.save(path, centroids)
    calls = [(path, chunk, rows.tolist(), str(scratch / f"residuals-{i}.npy"))
             for i, (chunk, rows) in enumerate(zip(chunks, _per_chunk(chunks, chosen)))]
    parts = run(residuals, calls)
    groups = [g.tolist() for g in np.array_split(np.arange(m), min(PQ_GROUPS, m))]
    outs = run(pq_group, [(parts, group, dsub, ksub, str(scratch / f"pq-{i}.npy")) for i, group in enumerate(groups)])
    return np.concatenate([np.load(out) for out in outs])


def train_ivf(
    index: faiss.Index, sources: Sequence[Source], train_size: int, workdir: Path, run: Runner = serial
) -> None:
    """Train ``index`` (an IVF-Flat or IVF-PQ from ``faiss.index_factory``, inner product) on the first
    ``train_size`` vectors of ``sources`` (in order), in units of ``run``; scratch files under ``workdir``
    (shared by the cluster's nodes), removed after."""
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if not isinstance(ivf, (faiss.IndexIVFFlat, faiss.IndexIVFPQ)):
        raise ValueError(f"train_ivf trains IVF-Flat and IVF-PQ indexes, not {type(ivf).__name__}")
    lengths = [len(np.load(s, mmap_mode="r")) if isinstance(s, str) else len(s) for s in sources]
    chunks = sample_chunks(sources, lengths, train_size)
    scratch = Path(tempfile.mkdtemp(prefix=".train-", dir=workdir))
    try:
        centroids = train_coarse(chunks, ivf.nlist, run, scratch)
        ivf.quantizer.add(centroids)
        if isinstance(ivf, faiss.IndexIVFPQ):
            pq = ivf.pq
            books = train_pq(chunks, centroids, pq.M, pq.ksub, run, scratch)
            faiss.copy_array_to_vector(books.ravel(), pq.centroids)
        ivf.is_trained = True
        index.is_trained = True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
