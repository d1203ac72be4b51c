"""Check an index: every shard's size and digest against the manifest, every record's checksum, the retriever.

    python -m storage.verify INDEX

Exit 0 when intact; 1, naming each bad shard and passage (or a damaged manifest or retriever), when
not; 2 when there is no index. An updated index is checked at its current version: every shard it
lists, its retriever (``versions/NNNN``), and its deleted rows and passage digests against the manifest. A shard of the wrong size is reported without being mapped (LMDB
would fault). The retriever's files are checked against the digests the manifest records (read in
1 MB blocks); an index published before they were recorded gets a ``note:`` line instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import zstandard as zstd

from .codec import Codec, file_digest
from .index import CODEC, FAISS_FILE, INFO_FILE, IVF_DATA, IndexNotFound, Manifest
from .record import CorruptRecord, check_record, record_pid
from .open_shards import open_shard
from .shard import DATA, KEY, SHARDS, DamagedIndex, ShardInfo, block_records, os_fault, repair_hint, shard_file
from .tasks import Runner, serial
from .versions import files_folder, version_number, version_problems


def verify(root: Path, run: Runner = serial) -> tuple[list[str], int]:
    """Problems found (empty when intact) and the number of records checked; ``run`` checks the shards (one unit each)."""
    manifest = Manifest.load(root)
    problems: list[str] = []
    try:
        Codec.load(root / CODEC, manifest.codec)
    except (OSError, ValueError, KeyError, TypeError, zstd.ZstdError) as error:
        problems.append(f"codec: {error}")
    problems += version_problems(root, manifest.extra, manifest.passages)  # an updated index's tombstones and digests
    problems += retriever_problems(files_folder(root, manifest.extra), manifest)
    checked = 0
    for shard_problems, records in run(verify_shard, [(str(root), s.to_dict()) for s in manifest.shards]):
        problems += shard_problems
        checked += records
    return problems, checked


def verify_shard(root: str, info: dict) -> tuple[list[str], int]:
    """One shard: its size and digest against the manifest's ``info``, every record's checksum; (problems, records checked)."""
    root, shard = Path(root), ShardInfo.from_dict(info)
    problems: list[str] = []
    checked = 0
    data = root / SHARDS / shard.name / DATA
    try:
        shard_file(root, shard)
    except DamagedIndex as error:
        return [str(error)], 0
    try:
        if file_digest(data) != shard.digest:
            problems.append(f"{shard.name}: digest differs from the manifest (the file changed after it was sealed)")
    except OSError as error:  # readable by stat, not by open (permissions)
        return [f"{shard.name} cannot be read ({os_fault(data, error)})"], 0
    try:
        with open_shard(root, shard.name) as env, env.begin(buffers=True) as txn:
            expected = shard.first_row
            for key, block in txn.cursor():
                first = KEY.unpack(key)[0]
                if first != expected:
                    problems.append(f"{shard.name}: row {expected} is missing (next block starts at row {first})")
                    expected = first
                for row, value in enumerate(block_records(block), start=first):
                    try:
                        check_record(value, f"{shard.name} row {row} (passage {record_pid(value)!r})")
                    except CorruptRecord as error:
                        problems.append(str(error))
                    expected += 1
                    checked += 1
            if expected != shard.first_row + shard.rows:
                problems.append(f"{shard.name}: {expected - shard.first_row} rows, manifest says {shard.rows}")
    except Exception as error:  # lmdb raises its own errors on a damaged file
        problems.append(f"{shard.name}: unreadable ({type(error).__name__}: {error})")
    return problems, checked


def retriever_problems(root: Path, manifest: Manifest) -> list[str]:
    """The retriever's files in ``root`` (the index's current version's folder): present, readable, as the manifest's
    digests say, and over as many passages (rows) as it lists."""
    import faiss

    from .retriever_file import check_vectors

    present = [name for name in (FAISS_FILE, INFO_FILE) if (root / name).exists()]
    if not present and "retriever" not in manifest.extra:
        return []  # an index built without a retriever (storage alone)
    missing = [name for name in (FAISS_FILE, INFO_FILE) if name not in present]
    if missing:
        return [f"retriever: {', '.join(missing)} missing"]
    problems = []
    for name, digest in recorded_digests(manifest).items():  # streamed: a 1 MB buffer whatever the file's size
        try:
            if file_digest(root / name) != digest:
                problems.append(f"retriever: {name} differs from the manifest's digest (the file changed after the index was published)")
        except OSError as error:
            problems.append(f"retriever: {os_fault(root / name, error)}")
    try:
        count = json.loads((root / INFO_FILE).read_text())["count"]
        # Mapped, not read: only the header is needed, and a flat index of 1M passages is 1.5 GB
        # (a 200,000-vector one: 40 MB peak mapped against 333 MB read). Damaged files still raise.
        # Lists merged on disk (reader.retriever.build_faiss_apart) live in IVF_DATA, beside it.
        lists = (root / IVF_DATA).exists()
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR if lists else faiss.IO_FLAG_MMAP_IFC
        index = faiss.read_index(str(root / FAISS_FILE), flags | faiss.IO_FLAG_READ_ONLY)
        vectors = index.ntotal
        if lists and faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists).totsize > (root / IVF_DATA).stat().st_size:
            return problems + [f"retriever: {IVF_DATA} is truncated"]
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:  # faiss raises RuntimeError
        return problems + [f"retriever: unreadable ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"]
    try:
        check_vectors(index)  # what every load checks (and all an index published before digests has)
    except (ValueError, RuntimeError) as error:
        problems.append(f"retriever: damaged ({error})")
    if count != manifest.passages or vectors != manifest.passages:
        listed = manifest.passages
        return problems + [f"retriever: {vectors} vectors (retriever.json says {count}), the manifest lists {listed} passages"]
    return problems


def recorded_digests(manifest: Manifest) -> dict[str, str]:
    """The retriever files' sha256 the manifest records (none for an index published before they were recorded)."""
    return (manifest.extra.get("retriever") or {}).get("digests") or {}


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m storage.verify", description=__doc__.splitlines()[0])
    parser.add_argument("index", type=Path, help="index folder (with manifest.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        problems, checked = verify(args.index)
    except DamagedIndex as error:  # the manifest itself
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (IndexNotFound, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{len(problems)} problem(s) in {args.index}. {repair_hint(args.index, verified=True)}", file=sys.stderr)
        return 1
    manifest = Manifest.load(args.index)
    number = version_number(manifest.extra)
    deleted = (manifest.extra.get("version") or {}).get("deleted", 0)
    print(f"ok: {checked} records in {len(manifest.shards)} shards verified"
          + (f" (version {number}: {deleted} rows deleted by updates)" if number > 1 else ""))
    if (files_folder(args.index, manifest.extra) / "retriever.faiss").exists() and not recorded_digests(manifest):
        print("note: the manifest records no digest of the retriever (an index published before retriever digests "
              "were recorded): its header, size and a sample of its vectors were checked, not every byte; "
              "rerunning the index flow records one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
