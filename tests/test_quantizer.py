"""Training an IVF index in units (reader.quantizer): as good as faiss's own training, and the same bytes
whatever order or process runs the units."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from reader.quantizer import sample_chunks, train_ivf


def clustered(count: int, dimension: int, centers: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``centers`` random directions (the shape of passage embeddings, in miniature)."""
    rng = np.random.default_rng(seed)
    middle = rng.normal(size=(centers, dimension))
    x = middle[rng.integers(0, centers, count)] + 0.35 * rng.normal(size=(count, dimension))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def reversed_order(fn, calls, done=None):
    """A runner that runs the units last first (as a cluster may finish them), results in call order."""
    results = {i: fn(*calls[i]) for i in reversed(range(len(calls)))}
    return [results[i] for i in range(len(calls))]


def recall_at_10(index: faiss.Index, x: np.ndarray, queries: np.ndarray) -> float:
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    truth = exact.search(queries, 10)[1]
    faiss.extract_index_ivf(index).nprobe = 8
    got = index.search(queries, 10)[1]
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)]))


@pytest.mark.parametrize("factory", ["IVF32,Flat", "IVF32,PQ8np"])
def test_units_train_as_well_as_faiss_and_the_same_bytes_in_any_order(tmp_path, factory):
    x = clustered(6000, 64, 40)
    files = []
    for i, part in enumerate(np.array_split(x, 5)):
        files.append(str(tmp_path / f"part-{i}.npy"))
        np.save(files[-1], part)
    trained, threads = {}, faiss.omp_get_max_threads()
    for name, run, sources in (("files", None, files), ("arrays", reversed_order, list(np.array_split(x, 5)))):
        index = faiss.index_factory(64, factory, faiss.METRIC_INNER_PRODUCT)
        train_ivf(index, sources, 5000, tmp_path, **({"run": run} if run else {}))
        assert index.is_trained
        trained[name] = index
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".train-")] == []  # scratch removed
    assert faiss.omp_get_max_threads() == threads  # the caller's faiss threads are left as they were
    # the same trained bytes however the units ran and whatever held the vectors
    assert np.array_equal(faiss.serialize_index(trained["files"]), faiss.serialize_index(trained["arrays"]))

    reference = faiss.index_factory(64, factory, faiss.METRIC_INNER_PRODUCT)
    reference.train(x[:5000])  # faiss's own training, one process, on the same sample

    def coarse_fit(index: faiss.Index) -> float:  # mean inner product of a sample vector with its centroid
        return float(faiss.extract_index_ivf(index).quantizer.search(x[:5000], 1)[0].mean())

    assert coarse_fit(trained["files"]) >= coarse_fit(reference) - 0.01
    ivf = faiss.downcast_index(faiss.extract_index_ivf(trained["files"]))
    if isinstance(ivf, faiss.IndexIVFPQ):  # the codebooks against faiss's own PQ training on the same residuals
        centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
        residuals = x[:5000] - centroids[ivf.quantizer.search(x[:5000], 1)[1][:, 0]]
        theirs = faiss.ProductQuantizer(64, 8, 8)
        theirs.train(residuals)

        def error(pq) -> float:
            return float(((pq.decode(pq.compute_codes(residuals)) - residuals) ** 2).sum(1).mean())

        assert error(ivf.pq) <= 1.05 * error(theirs)
    queries = x[5000:5200] + 0.01
    for index in (trained["files"], reference):
        index.add(x)
    assert recall_at_10(trained["files"], x, queries) >= recall_at_10(reference, x, queries) - 0.03


def test_the_sample_is_the_first_rows_in_fixed_chunks_and_too_few_vectors_is_an_error(tmp_path):
    chunks = sample_chunks(["a", "b", "c"], [5, 7, 100], train_size=20, chunks=4)
    rows = [(src, a, b) for chunk in chunks for src, a, b in chunk]
    assert rows == [("a", 0, 5), ("b", 0, 5), ("b", 5, 7), ("c", 0, 3), ("c", 3, 8)]
    assert [sum(b - a for _, a, b in chunk) for chunk in chunks] == [5, 5, 5, 5]
    index = faiss.index_factory(8, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    with pytest.raises(ValueError, match="10 training vectors for 16 inverted lists"):
        train_ivf(index, [clustered(10, 8, 2)], 100, tmp_path)
