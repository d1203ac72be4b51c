"""A retriever carried from one index version to the next: an update's extended, a compaction's compacted.

Both read the current version's faiss index without loading lists kept on disk (``build_faiss_apart``'s,
past 200k passages: they are mapped) and write the new version's into its own folder, so readers of the
current version keep the files they map. Nothing already in the index is encoded again.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from storage.index import FAISS_FILE, INFO_FILE, IVF_DATA

from .retriever import (
    BUILD_DIR, PART_BYTES, merge_parts, write_index_whole, write_info, index_bytes, part_groups, space_for, stdout_to_stderr,
)


def _read_to_rewrite(source: Path) -> tuple[faiss.Index, bool]:
    """A version's retriever read to write another from (lists on disk mapped, not loaded), and whether they are."""
    on_disk = (source / IVF_DATA).exists()
    with stdout_to_stderr():  # faiss's notes on its on-disk lists
        return faiss.read_index(str(source / FAISS_FILE), faiss.IO_FLAG_ONDISK_SAME_DIR if on_disk else 0), on_disk


def extend_faiss(source: Path, target: Path, embeddings: Sequence[Path], first_row: int) -> dict:
    """An update's retriever: ``source``'s index (rows 0..first_row-1) with the vectors of ``embeddings`` (row order,
    from ``first_row``) added under its trained quantizer, written to ``target``; ``source`` is left as it is.

    Lists on disk (``build_faiss_apart``'s, past 200k passages) are never loaded: the new vectors go into
    lists in memory, and those are merged with the source's mapped lists, list by list, into a new
    ``target/retriever.ivfdata`` (the source's file is the one readers of the previous version map). The
    heap holds the new vectors' codes and the quantizer, not the index's. What it returns is
    ``extra.retriever`` for the new manifest.
    """
    index, _ = _read_to_rewrite(source)
    if index.ntotal != first_row:
        raise ValueError(f"the retriever in {source} holds {index.ntotal} passages; the update appends at row {first_row}")
    ivf = faiss.try_extract_index_ivf(index)
    previous = None
    if ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists):
        previous, ivf.own_invlists = ivf.invlists, False  # kept mapped for the merge below
        fresh = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
        ivf.replace_invlists(fresh, True)
        fresh.this.disown()  # the index owns them now
        index.ntotal = ivf.ntotal = 0  # numbered by the ids given below; the total is set after the merge
    added = first_row
    for path in embeddings:
        vectors = np.ascontiguousarray(np.load(path, mmap_mode="r"), dtype=np.float32)
        if ivf is None:
            index.add(vectors)  # a flat index numbers its vectors in order: row = position
        else:
            index.add_with_ids(vectors, np.arange(added, added + len(vectors), dtype=np.int64))
        added += len(vectors)
    target.mkdir(parents=True, exist_ok=True)
    if previous is not None:
        lists = target / IVF_DATA
        lists.unlink(missing_ok=True)  # an earlier attempt's
        merged = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(lists.resolve()))
        both = faiss.InvertedListsPtrVector()
        both.push_back(previous)
        both.push_back(ivf.invlists)
        with stdout_to_stderr(), space_for(lists, index_bytes(index) + first_row * (ivf.code_size + 8), partial=lists):
            total = merged.merge_from_multiple(both.data(), both.size(), False)
        ivf.replace_invlists(merged, True)
        merged.this.disown()
        index.ntotal = ivf.ntotal = total
    write_index_whole(index, target / FAISS_FILE)
    info = json.loads((source / INFO_FILE).read_text())
    return write_info(target, info["factory"], added, info["dimension"], info["encoder"])


def compact_faiss(source: Path, target: Path, live: np.ndarray, part_bytes: int = PART_BYTES) -> dict:
    """A compaction's retriever: ``source``'s vectors of the ``live`` rows (sorted), renumbered 0.. in that order,
    written to ``target``; ``source`` is left as it is.

    Nothing is encoded again: an exact index's vectors are copied, an inverted file's codes move list by
    list with their new ids, so every live passage scores what it scored before. Lists on disk are
    copied into parts of at most ``part_bytes`` of codes, merged on disk into ``target/retriever.ivfdata``
    (as ``build_faiss_apart`` does): the heap never holds the index.
    """
    index, on_disk = _read_to_rewrite(source)
    info = json.loads((source / INFO_FILE).read_text())
    renumber = np.full(index.ntotal, -1, dtype=np.int64)
    renumber[live] = np.arange(len(live), dtype=np.int64)
    target.mkdir(parents=True, exist_ok=True)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:  # exact: the vectors themselves, in row order
        compacted = faiss.index_factory(index.d, info["factory"], faiss.METRIC_INNER_PRODUCT)
        for start in range(0, index.ntotal, 1 << 16):
            vectors = index.reconstruct_n(start, min(1 << 16, index.ntotal - start))
            compacted.add(vectors[renumber[start : start + len(vectors)] >= 0])
        write_index_whole(compacted, target / FAISS_FILE)
        return write_info(target, info["factory"], len(live), index.d, info["encoder"])
    old_lists = ivf.invlists
    ivf.own_invlists = False  # read below, list by list, from their mapped file
    sizes = [old_lists.list_size(number) for number in range(ivf.nlist)]

    def kept_lists(numbers: range) -> faiss.ArrayInvertedLists:
        lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
        for number in numbers:
            if not sizes[number]:
                continue
            ids = faiss.rev_swig_ptr(old_lists.get_ids(number), sizes[number]).copy()
            codes = faiss.rev_swig_ptr(old_lists.get_codes(number), sizes[number] * ivf.code_size)
            keep = renumber[ids] >= 0
            kept_codes = np.ascontiguousarray(codes.reshape(sizes[number], ivf.code_size)[keep])
            if keep.any():
                lists.add_entries(number, int(keep.sum()), faiss.swig_ptr(renumber[ids[keep]]), faiss.swig_ptr(kept_codes))
        return lists

    def install(lists: faiss.InvertedLists, total: int) -> None:
        ivf.replace_invlists(lists, True)
        lists.this.disown()  # the index owns them now
        index.ntotal = ivf.ntotal = total

    if not on_disk:  # one piece, in memory as the source was
        install(kept_lists(range(ivf.nlist)), len(live))
        write_index_whole(index, target / FAISS_FILE)
        return write_info(target, info["factory"], len(live), index.d, info["encoder"])
    work = target / BUILD_DIR
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    install(faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size), 0)
    trained = work / "trained.faiss"
    write_index_whole(index, trained)
    groups = part_groups(sizes, ivf.code_size, tasks=1, part_bytes=part_bytes)
    outs = []
    for number, group in enumerate(groups):
        part = faiss.read_index(str(trained))
        faiss.extract_index_ivf(part).replace_invlists(lists := kept_lists(group), True)
        lists.this.disown()
        outs.append(str(work / f"part-{number:05d}.faiss"))
        write_index_whole(part, Path(outs[-1]))
        del part
    merge_parts(faiss.read_index(str(trained)), outs, target)
    shutil.rmtree(work)
    return write_info(target, info["factory"], len(live), index.d, info["encoder"])
