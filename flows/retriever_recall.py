"""Recall of each retriever index type the flow can pick, against exact search, on questions people wrote.

The flow picks Flat (exact) below 200k passages, IVF-Flat up to 5M and IVF-PQ beyond
(``reader.retriever.index_factory``). Each is built here over the same passage vectors with the
flow's own builder (``build_faiss_apart``, the factory forced) and searched through the query path's
``Retriever`` at its default probes, on NQ-open and TriviaQA *dev* questions whose answer is in the
corpus. Per type and k: answer recall@k (a passage holds a gold answer, as ``reader.evaluate``
counts it), and overlap@k (the share of exact search's top k that the index returns).

The vectors are the exact retriever's (``make data`` builds it over the bundled sample); the inverted
lists follow the flow's rule for the corpus size (4 sqrt(n)), so at 10,033 passages the default 32
probes visit 8% of 400 lists, where at 21M they would visit 0.2% of 18,330: ``--probes`` sets more
than one setting to show the curve. Every type is built from the vectors stored as the workers store
them (float16); ``flat_float32``, exact search over the float32 vectors, is the reference of every
overlap and shows what the float16 storage costs.

    python -m flows.retriever_recall --json > results/retriever-recall-dev.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from workers.corpus import read_sample
from workers.indexer import EMBEDDING_DTYPE
from storage.record import Passage
from reader.normalize import has_answer
from reader.retriever import Encoder, Retriever, build_faiss_apart, ivf_lists, ivfpq_factory, read_faiss

QUESTIONS = ("nq-dev-in-sample.jsonl", "trivia-dev-in-sample.jsonl")  # dev only: the test files are the benchmark
KS = (5, 20)


def factories(count: int, dimension: int) -> dict[str, str]:
    """The three index types the flow can pick, at ``count`` passages."""
    return {"flat": "Flat", "ivf_flat": f"IVF{ivf_lists(count)},Flat", "ivf_pq": ivfpq_factory(count, dimension)}


def stored_vectors(folder: Path) -> np.ndarray:
    """Every vector of an exact (Flat) retriever, in row order."""
    index = read_faiss(folder)
    if not isinstance(index, faiss.IndexFlat):
        raise ValueError(f"{folder} is not an exact retriever ({type(index).__name__}): its vectors cannot be read back")
    return index.reconstruct_n(0, index.ntotal)


def score(hits: list[list[int]], exact: list[list[int]], records: list[dict], texts: list[str], k: int) -> dict:
    """Answer recall@k and overlap with exact search's top k, in percent."""
    recall = [has_answer([texts[r] for r in rows[:k]], rec["answers"]) for rows, rec in zip(hits, records)]
    overlap = [len(set(rows[:k]) & set(ref[:k])) / k for rows, ref in zip(hits, exact)]
    return {f"recall@{k}": round(100 * float(np.mean(recall)), 2), f"overlap@{k}": round(100 * float(np.mean(overlap)), 2)}


def measure(qa: Path, probes: list[int], limit: int | None) -> dict:
    """Build each index type over the exact retriever's vectors and score it on the dev questions."""
    exact_folder = qa / "retriever"
    info = json.loads((exact_folder / "retriever.json").read_text())
    vectors = stored_vectors(exact_folder)
    passages = [p for p in read_sample(None) if isinstance(p, Passage)]  # the rows make data embedded
    if len(passages) != len(vectors):
        raise ValueError(f"the sample has {len(passages)} passages, {exact_folder} {len(vectors)}: rerun make data")
    texts = [f"{p.title} {p.text}" for p in passages]  # a span may come from the title too
    encoder = Encoder(info["encoder"]["name"], info["encoder"]["max_tokens"])
    sets = {}
    for name in QUESTIONS:
        records = [json.loads(line) for line in (qa / name).read_text(encoding="utf-8").split("\n") if line.strip()][:limit]
        sets[name.split("-")[0]] = (records, encoder.embed([r["question"] for r in records]))
    out = {"passages": len(vectors), "questions": {s: len(r) for s, (r, _) in sets.items()}, "types": {}}
    with tempfile.TemporaryDirectory(prefix="btr-recall-") as tmp:
        reference, parts = Path(tmp) / "float32.npy", Path(tmp) / "part-00000.npy"
        np.save(reference, vectors)  # exact search over the vectors as computed: every overlap's reference
        np.save(parts, vectors.astype(EMBEDDING_DTYPE))  # as the workers store them for the retriever
        exact: dict[str, list[list[int]]] = {}
        kinds = {"flat_float32": "Flat"} | factories(len(vectors), vectors.shape[1])
        for kind, factory in kinds.items():
            folder = Path(tmp) / kind
            folder.mkdir()
            began = time.perf_counter()
            build_faiss_apart([reference if kind == "flat_float32" else parts], folder, info["encoder"], factory=factory)
            built_s = time.perf_counter() - began
            size = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("retriever.") and f.suffix != ".json")
            for nprobe in probes if factory.startswith("IVF") else [0]:
                retriever = Retriever(folder, encoder, probes=nprobe or 1)
                row = {"factory": factory, "bytes": size, "build_s": round(built_s, 2)} | ({"probes": nprobe} if nprobe else {})
                for subset, (records, questions) in sets.items():
                    _, found = retriever.index.search(questions, max(KS))
                    hits = [[int(r) for r in rows] for rows in found]
                    exact.setdefault(subset, hits)  # flat_float32 comes first
                    for k in KS:
                        row[f"{subset}_{k}"] = score(hits, exact[subset], records, texts, k)
                out["types"][f"{kind}" + (f"@{nprobe}" if nprobe else "")] = row
                print(f"{kind}{'@' + str(nprobe) if nprobe else ''}: {row}", file=sys.stderr)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m flows.retriever_recall", description=__doc__.splitlines()[0])
    parser.add_argument("--qa", default="data/qa",
                        help="make data's folder: the exact retriever over the sample, the dev questions "
                             "(default: %(default)s)")
    parser.add_argument("--probes", default="32,8,128",
                        help="comma-separated inverted lists visited per query; the first is the query path's default "
                             "(default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="first N questions of each set (default: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (default: off, a line per index type)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    qa = Path(args.qa)
    if not (qa / "retriever" / "retriever.faiss").exists():
        parser.error(f"no exact retriever in {qa / 'retriever'}: run make data first")
    result = measure(qa, [int(p) for p in args.probes.split(",")], args.limit)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for kind, row in result["types"].items():
            cells = "  ".join(f"{s}: R@{k} {row[f'{s}_{k}'][f'recall@{k}']} O@{k} {row[f'{s}_{k}'][f'overlap@{k}']}"
                              for s in result["questions"] for k in KS)
            print(f"{kind:14} {row['bytes'] / 1e6:7.2f} MB  {cells}")


if __name__ == "__main__":
    main()
