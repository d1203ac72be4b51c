"""The retriever's files as the index format sees them: their digests, and the structural check of a loaded faiss index.

``reader.retriever`` builds and searches the retriever; ``storage.verify`` and the query path's load
both check it with what is here, so the check lives with the format, below both.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from .codec import file_digest
from .index import FAISS_FILE, IVF_DATA

UNIT = 1e-3  # how far a stored unit vector's norm, or a score between unit vectors, may stray from 1 in float32


def retriever_digests(folder: Path) -> dict[str, str]:
    """sha256 of the retriever's index file and, when merged on disk, its lists (streamed: bounded memory)."""
    return {name: file_digest(folder / name) for name in (FAISS_FILE, IVF_DATA) if (folder / name).exists()}


def exact_vectors(index: faiss.Index) -> bool:
    """Whether the index stores its vectors whole (Flat, IVF-Flat), so that norms and scores are exact; PQ stores codes."""
    ivf = faiss.try_extract_index_ivf(index)
    return ivf.code_size == 4 * ivf.d if ivf is not None else isinstance(index, faiss.IndexFlat)


def check_vectors(index: faiss.Index, sample: int = 256) -> None:
    """Raise ValueError unless the index holds what ``Encoder.embed`` stores: lists adding up, a sample of unit vectors.

    Cheap (a few hundred vectors, read from the map), so every load runs it; a damaged stretch of
    the file the sample misses is caught by the score check of every search, and by the digest
    ``storage.verify`` compares.
    """
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        lists = ivf.invlists
        sizes = [lists.list_size(i) for i in range(lists.nlist)]
        if sum(sizes) != index.ntotal:
            raise ValueError(f"its inverted lists hold {sum(sizes)} vectors, its header says {index.ntotal}")
    if index.ntotal == 0 or not exact_vectors(index):
        return
    if ivf is None:
        rows = np.unique(np.linspace(0, index.ntotal - 1, min(index.ntotal, sample)).astype(np.int64))
        vectors = index.reconstruct_batch(rows)
    else:  # a few whole lists, spread over the file
        chosen = [i for i in np.unique(np.linspace(0, len(sizes) - 1, min(len(sizes), 8)).astype(int)) if sizes[i]]
        vectors = np.concatenate([_list_vectors(ivf, int(i), sizes[i], sample // 8 or 1) for i in chosen] or [np.zeros((0, ivf.d), np.float32)])
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    bad = ~(np.abs(norms - 1) <= UNIT)  # NaN too
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} of {len(norms)} stored vectors checked are not unit vectors (one has norm "
            f"{norms[bad][0]:.4g}): the file was changed after it was built"
        )


def _list_vectors(ivf: faiss.IndexIVF, number: int, size: int, most: int) -> np.ndarray:
    """The first ``most`` vectors of an IVF-Flat inverted list (copied out of the map)."""
    codes = ivf.invlists.get_codes(number)
    try:
        taken = min(size, most)
        raw = faiss.rev_swig_ptr(codes, taken * ivf.code_size)
        return np.frombuffer(raw, dtype=np.float32).reshape(taken, ivf.d).copy()
    finally:
        ivf.invlists.release_codes(number, codes)
