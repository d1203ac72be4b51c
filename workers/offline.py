"""The offline merge and verify of an index on a Ray cluster: ``storage.offline`` and ``storage.verify``'s units as tasks.

    python -m workers.offline merge LOSSLESS MERGED [--ray-address ADDR | --cpus N]
    python -m workers.offline verify INDEX [--ray-address ADDR | --cpus N]

Without an address a loopback cluster of ``--cpus`` CPUs is started for the command and stopped
after it. The merged index is byte for byte the one ``storage.offline.merge_index`` writes in one
process, whatever the number of workers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reader.inputs import stopword_ids
from storage.index import Manifest
from storage.offline import OfflineMerge, Progress, merge_index
from storage.verify import verify

from .cluster import cluster, cluster_runner


def merge_on_cluster(
    source: Path | str, destination: Path | str, stopwords: set[int], settings: OfflineMerge | None = None,
    workdir: Path | str | None = None, progress: Progress | None = None, scratch: Path | str | None = None,
    consume_source: bool = False, codec_final: bool = False,
) -> Manifest:
    """``storage.offline.merge_index`` with every pass's units as tasks on the connected Ray cluster."""
    return merge_index(
        source, destination, stopwords, settings, workdir, progress, cluster_runner(), scratch, consume_source, codec_final
    )


def verify_on_cluster(root: Path) -> tuple[list[str], int]:
    """``storage.verify.verify`` with one task per shard on the connected Ray cluster."""
    return verify(root, cluster_runner())


def index_tokenizer(root: Path):
    """The tokenizer of the reader that built the index at ``root`` (the default reader's when the manifest names none)."""
    from transformers import AutoTokenizer

    from reader.assets import minilm_path
    from reader.load import ReaderSpec, resolve_checkpoint

    spec = Manifest.load(root).extra.get("reader_spec")
    path, local = resolve_checkpoint(ReaderSpec(**spec)) if spec else (str(minilm_path()), True)
    return AutoTokenizer.from_pretrained(path, local_files_only=local)


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m workers.offline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="offline-merge a lossless index into a new folder")
    merge.add_argument("source", type=Path, help="the lossless index folder to merge")
    merge.add_argument("destination", type=Path, help="the new, merged index folder")
    merge.add_argument("--ratio", type=float, default=0.2,
                       help="r_o, the share of each token's occurrences merged (default: %(default)s)")
    merge.add_argument("--scratch", type=Path,
                       help="scratch folder, kept if the merge fails so that a rerun resumes "
                            "(default: a temporary folder, removed)")
    check = commands.add_parser("verify", help="verify an index, a task per shard")
    check.add_argument("index", type=Path, help="the index folder to verify")
    for command in (merge, check):
        command.add_argument("--ray-address",
                             help="a running cluster to join (default: start a loopback one for the command)")
        command.add_argument("--cpus", type=int, default=None,
                             help="CPUs of the loopback cluster (default: all of this machine's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with cluster(args.ray_address, args.cpus):
        if args.command == "merge":
            stopwords = stopword_ids(index_tokenizer(args.source))
            manifest = merge_on_cluster(args.source, args.destination, stopwords, OfflineMerge(args.ratio), scratch=args.scratch)
            print(f"merged {manifest.passages} passages in {len(manifest.shards)} shards into {args.destination}")
            return 0
        problems, checked = verify_on_cluster(args.index)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{'ok' if not problems else f'{len(problems)} problem(s)'}: {checked} records verified")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
