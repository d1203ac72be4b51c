"""A synthetic corpus of any size through the product's own storage code: throughput, disk, memory, reads.

    python -m bench.scale --passages 1000000 --json
    python -m bench.scale --passages 1000000 --workers 2 --json     # the steps after the workers on Ray

Everything after the model, as the flow `index-wikipedia` does it, at a size no CPU could encode:
passages and bits come from ``bench.synthetic`` (no model runs), then each step runs in its own
process so that its peak memory is its own:

    write     passages shard by shard; the codec fitted on the first 2,000 (as the flow); IndexWriter
              shards and manifest (the flow's lossless staging index); random unit vectors per shard
    faiss     reader.retriever.build_faiss over those vectors (the index type the flow picks for the count)
    faiss_pq  the same with the IVF-PQ type the flow picks past 5M passages (IVF-PQ training at this size)
    merge     storage.offline.merge_index, r_o = 0.2, into the final index, consuming the lossless one (as the flow's publish)
    verify    storage.verify on the final index (digests, every record's checksum, the retriever)
    fetch     40 random passages fetched and decoded, p50 / p99 over 200 draws, lossless (fetch_lossless,
              before the merge deletes it window by window, as the flow's does) and merged

With ``--workers W`` the retriever builds, the merge and verify run as tasks on a loopback Ray of W
CPUs started for each step (``reader.retriever.build_faiss_apart``, ``workers.offline``); their
``digests`` match whatever W is.

Peak memory per step: ``peak_rss_mb`` (the kernel's high-water mark, file pages of memory-mapped
shards included) and ``peak_anon_mb`` (heap, sampled every 0.1 s: what the step's largest process
really holds, Ray's processes included); ``peak_disk_bytes``, the work folder's, sampled every second.
Work goes to ``--out`` (kept), or a temporary folder removed afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from storage.shard import default_shard_size
from storage.token_merge import OfflineMerge

from . import scale_steps
from .scale_steps import STEPS
from .step_monitor import run_watched

CONFIG = "scale.json"


def run_step(step: str, out: Path) -> dict:
    """Run one step in a child process; its result, wall time, peak memory and peak disk."""
    command = [sys.executable, "-m", "bench.scale", "--step", step, "--out", str(out)]
    watched = run_watched(command, out)
    if watched.pop("exit") != 0:
        raise RuntimeError(f"step {step} failed; its folder is {out}")
    return {**json.loads((out / "steps" / f"{step}.json").read_text()), **watched}


def _child(step: str, out: Path) -> int:
    cfg = json.loads((out / CONFIG).read_text())
    figures = getattr(scale_steps, f"step_{step}")(cfg, out)
    (out / "steps").mkdir(exist_ok=True)
    (out / "steps" / f"{step}.json").write_text(json.dumps(figures))
    return 0


def digests(out: Path) -> dict:
    """What two runs over the same corpus share, whoever ran them: manifests (no timestamp), merged shards, retrievers."""
    import hashlib

    from storage.index import Manifest

    def manifest(folder: Path) -> str:
        data = json.loads((folder / "manifest.json").read_text())
        del data["created"]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def retriever(folder: Path) -> str:  # lists merged on disk: the index file names them by path, which is blanked
        lists = (folder / "retriever.ivfdata").resolve()
        data = (folder / "retriever.faiss").read_bytes().replace(str(lists).encode(), b"")
        return hashlib.sha256(data + (lists.read_bytes() if lists.exists() else b"")).hexdigest()

    return {
        "lossless": manifest(out / "lossless"), "merged": manifest(out / "index"),
        "retriever": retriever(out / "index"), "retriever_ivfpq": retriever(out / "ivfpq"),
        "merged_shards": [s.digest for s in Manifest.load(out / "index").shards],
    }


def measure(cfg: dict, out: Path) -> dict:
    """Every step in order; the figures in one dict."""
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(json.dumps(cfg, indent=1))
    steps = {step: run_step(step, out) for step in STEPS}
    fetched = {**steps["fetch_lossless"], **steps["fetch"]}
    from storage.index import Manifest  # light enough for the driver: no model, no faiss

    lossless, merged = Manifest.load(out / "lossless"), Manifest.load(out / "index")
    tokens = lossless.tokens
    codec_bytes = sum(f.stat().st_size for f in (out / "index" / "codec").iterdir())
    write = steps["write"]
    return {
        "passages": lossless.passages,
        "workers": cfg["workers"],
        "tokens": tokens,
        "tokens_per_passage": round(tokens / lossless.passages, 1),
        "write_passages_per_s": write["passages_per_s"],
        "write_tokens_per_s": write["tokens_per_s"],
        "disk_bytes_per_token": {
            "lossless": round(sum(s.bytes for s in lossless.shards) / tokens, 2),
            "merged": round(sum(s.bytes for s in merged.shards) / tokens, 2),
        },
        "bits_per_dim": {name: fetched[name]["bits_per_dim"] for name in ("lossless", "merged")},
        "fetch_ms": {
            name: {"p50": fetched[name]["fetch_ms_p50"], "p99": fetched[name]["fetch_ms_p99"]}
            for name in ("lossless", "merged")
        },
        "faiss": {
            name: {key: steps[name].get(key) for key in ("factory", "train_s", "train_peak_rss_mb", "bytes")}
            for name in ("faiss", "faiss_pq")
        },
        "verify_s": steps["verify"]["seconds"],
        "verified": steps["verify"]["ok"],
        "peak_rss_mb": {step: steps[step]["peak_rss_mb"] for step in STEPS},
        "peak_anon_mb": {step: steps[step]["peak_anon_mb"] for step in STEPS},
        "seconds": {step: steps[step]["seconds"] for step in STEPS},
        "peak_disk_bytes": {step: steps[step]["peak_disk_bytes"] for step in STEPS},
        "digests": digests(out),
        "disk_bytes": {
            "lossless_shards": sum(s.bytes for s in lossless.shards),
            "merged_shards": sum(s.bytes for s in merged.shards),
            "codec": codec_bytes,
            "retriever": steps["faiss"]["bytes"],
            "retriever_ivfpq": steps["faiss_pq"]["bytes"],
        },
        "bucket_files": steps["merge"]["bucket_files"],
        "total_s": round(sum(steps[step]["seconds"] for step in STEPS), 1),
        "steps": steps,
        "config": cfg,
    }


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=5000, help="synthetic passages to index (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (default: off, a summary)")
    parser.add_argument("--out", type=Path, help="work folder, kept (default: a temporary folder, removed)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary folder; its path goes to stderr (default: off)")
    parser.add_argument("--shard-size", type=int, default=0, help="passages per shard (default: the flow's, from the count)")
    parser.add_argument("--workers", type=int, default=0,
                        help="run the retriever builds, merge and verify as tasks on a loopback Ray of this many CPUs; "
                             "0: one process per step (default: %(default)s)")
    parser.add_argument("--words", type=int, default=100,
                        help="words per passage; DPR's Wikipedia passages have 100 (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=320,
                        help="passage token limit, the flow's default (default: %(default)s)")
    parser.add_argument("--codec-sample", type=int, default=2000,
                        help="passages the codec is fitted on, the flow's (default: %(default)s)")
    parser.add_argument("--offline-ratio", type=float, default=0.2, help="r_o of the offline merge (default: %(default)s)")
    parser.add_argument("--merge-window", type=int, default=OfflineMerge().window,
                        help="passages merged together, the flow's default; smaller shows the disk a window frees "
                             "(default: %(default)s)")
    parser.add_argument("--fetch", type=int, default=40,
                        help="passages per timed fetch, a query's worth (default: %(default)s)")
    parser.add_argument("--draws", type=int, default=200, help="timed fetches (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the synthetic passages, bits and vectors (default: %(default)s)")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # a child process runs one step
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.step:
        return _child(args.step, args.out)
    if args.passages < 1:
        parser.error("--passages must be positive")
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty: give a new folder")
    names = ("passages", "workers", "words", "max_tokens", "codec_sample", "offline_ratio", "merge_window", "fetch", "draws", "seed")
    cfg = {name: getattr(args, name) for name in names} | {"shard_size": args.shard_size or default_shard_size(args.passages)}
    out = args.out or Path(tempfile.mkdtemp(prefix="btr-scale-"))
    try:
        result = measure(cfg, out)
    finally:
        if args.out is None and not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        elif args.out is None:
            print(f"kept {out}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
        return 0 if result["verified"] else 1
    on = f"a loopback Ray of {args.workers} CPU(s)" if args.workers else "one process per step"
    print(f"{result['passages']:,} passages, {result['tokens']:,} tokens ({result['tokens_per_passage']} per passage), {on}")
    print(f"  write: {result['write_passages_per_s']:,} passages/s, {result['write_tokens_per_s']:,} tokens/s")
    disk, bits = result["disk_bytes_per_token"], result["bits_per_dim"]
    print(f"  on disk: {disk['lossless']} bytes/token lossless, {disk['merged']} merged "
          f"(bits/dim {bits['lossless']} / {bits['merged']})")
    for name, f in result["fetch_ms"].items():
        print(f"  fetch+decode {args.fetch} random passages, {name}: p50 {f['p50']} ms, p99 {f['p99']} ms")
    for name, f in result["faiss"].items():
        trained = f"trained in {f['train_s']} s (peak RSS {f['train_peak_rss_mb']} MB)" if f["train_s"] is not None else "no training"
        print(f"  {name}: {f['factory']}, {trained}, {f['bytes']:,} bytes")
    print(f"  verify: {result['verify_s']} s, {'intact' if result['verified'] else 'PROBLEMS'}; all steps {result['total_s']:,} s")
    print("  step: seconds / peak RSS MB / peak anonymous MB (largest process) / peak disk GB")
    for step in STEPS:
        figures = [result[key][step] for key in ("seconds", "peak_rss_mb", "peak_anon_mb")] + [result["peak_disk_bytes"][step] / 1e9]
        print(f"    {step:9s}" + "".join(f"{x:10.1f}" for x in figures))
    print(f"  merged index {result['digests']['merged'][:16]}, retrievers {result['digests']['retriever'][:16]} / "
          f"{result['digests']['retriever_ivfpq'][:16]}")
    return 0 if result["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
