"""flows.retriever_recall: the figures it reports, on hand-made hits."""

import faiss
import numpy as np
import pytest

from flows.retriever_recall import factories, score, stored_vectors
from reader.retriever import build_faiss


def test_recall_counts_a_question_once_and_overlap_is_the_share_of_exact_top_k():
    texts = ["Paris is the capital", "Lyon", "Bram Stoker wrote Dracula", "Dracula by Stoker", "nothing"]
    records = [{"answers": ["Paris"]}, {"answers": ["Bram Stoker"]}]
    hits = [[1, 0, 4, 2, 3], [4, 1, 0, 3, 2]]  # question 2: the answer's passage only at rank 5
    exact = [[0, 1, 2, 3, 4], [2, 3, 4, 0, 1]]
    two = score(hits, exact, records, texts, 2)
    assert two == {"recall@2": 50.0, "overlap@2": 50.0}  # {1, 0} & {0, 1}: 2 of 2; {4, 1} & {2, 3}: 0 of 2
    five = score(hits, exact, records, texts, 5)
    assert five == {"recall@5": 100.0, "overlap@5": 100.0}


def test_the_types_are_the_flows_and_only_an_exact_index_gives_its_vectors_back(tmp_path):
    assert factories(10_033, 384) == {"flat": "Flat", "ivf_flat": "IVF400,Flat", "ivf_pq": "IVF400,PQ48np"}
    vectors = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    (tmp_path / "flat").mkdir(), (tmp_path / "ivf").mkdir()
    build_faiss([vectors], tmp_path / "flat", {"name": "test"}, factory="Flat")
    assert np.array_equal(stored_vectors(tmp_path / "flat"), vectors)
    build_faiss([vectors], tmp_path / "ivf", {"name": "test"}, factory="IVF4,Flat")
    with pytest.raises(ValueError, match="not an exact retriever"):
        stored_vectors(tmp_path / "ivf")
    assert faiss.read_index(str(tmp_path / "ivf" / "retriever.faiss")).ntotal == 300
