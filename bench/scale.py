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

With ``--update SHARE`` (0.01: 1% of the passages changed), then an update of the final index, as
``--update`` of the flow does it (``flows.update``), its workers' part synthesized as ``write``'s:

    new_corpus    the next dump as a parquet file: SHARE of the passages changed, half edited, 30% added,
                  20% deleted (seeded; not timed as part of the update: a user downloads it)
    update        plan (normalize, match by id and digest), encode the changed and added passages, publish
                  (their shards merged in a window of their own, the retriever extended, version files, manifest)
    check_update  verify; deleted rows neither fetched nor retrieved; new passages found first by their vectors

``update.over_build``: the update's seconds over the build's (write + faiss + merge), one sitting.

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

from . import scale_steps, scale_update
from .scale_steps import BUILD_STEPS, STEPS
from .scale_update import UPDATE_STEPS
from .step_monitor import run_watched

CONFIG = "scale.json"


def run_step(step: str, out: Path) -> dict:
    """Run one step in a child process; its result, wall time, peak memory and peak disk."""
    command = [sys.executable, "-m", "bench.scale", "--step", step, "--out", str(out)]
    watched = run_watched(command, out)
    if watched.pop("exit") != 0:
        raise RuntimeError(f"step {step} failed; its folder is {out} (after a fix: --out {out} --from {step})")
    figures = {**json.loads((out / "steps" / f"{step}.json").read_text()), **watched}
    (out / "steps" / f"{step}.done.json").write_text(json.dumps(figures))  # what --from reads back
    return figures


def done_step(step: str, out: Path) -> dict:
    """The figures of a step an earlier run of the same folder finished (``--from`` a later step)."""
    path = out / "steps" / f"{step}.done.json"
    if not path.exists():
        raise RuntimeError(f"{out} has no finished step {step}: --from can only skip steps that finished")
    return json.loads(path.read_text())


def _child(step: str, out: Path) -> int:
    cfg = json.loads((out / CONFIG).read_text())
    figures = getattr(scale_update if step in UPDATE_STEPS else scale_steps, f"step_{step}")(cfg, out)
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


def measure(cfg: dict, out: Path, start: str | None = None) -> dict:
    """Every step in order (``start``: from that one, the earlier ones' figures read back); the figures in one dict."""
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(json.dumps(cfg, indent=1))
    order = STEPS + (UPDATE_STEPS if cfg["update"] else ())
    first = order.index(start) if start else 0
    steps = {step: done_step(step, out) if i < first else run_step(step, out) for i, step in enumerate(order)}
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
        "update": update_figures(steps) if cfg["update"] else None,
        "steps": steps,
        "config": cfg,
    }


def update_figures(steps: dict) -> dict:
    """The update against the build: seconds, the ratio, its peak heap, and what check_update found."""
    update, check, build = steps["update"], steps["check_update"], sum(steps[s]["seconds"] for s in BUILD_STEPS)
    return {
        "counts": update["counts"], "seconds": update["seconds"], "build_s": round(build, 1),
        "over_build": round(update["seconds"] / build, 4),
        "plan_s": update["plan_s"], "encode_s": update["encode_s"], "publish_s": update["publish_s"],
        "peak_anon_mb": update["peak_anon_mb"], "peak_rss_mb": update["peak_rss_mb"],
        "verified": check["ok"], "live": check["live"], "rows": check["rows"],
        "removed_fetch_refused": f"{check['removed_fetch_refused']}/{check['removed_rows']}",
        "removed_retrieved": check["removed_retrieved"],
        "new_found_first": f"{check['new_found_first']}/{check['new']}",
        "unchanged_same_text": f"{check['unchanged_same_text']}/{check['unchanged_sampled']}",
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
    parser.add_argument("--update", type=float, default=0.0,
                        help="then update the index to a new corpus with this share of its passages changed (0.01: "
                             "1%%), timed against the build; 0: no update (default: %(default)s)")
    parser.add_argument("--from", dest="start", choices=STEPS + UPDATE_STEPS,
                        help="with --out of a run that stopped: run from this step on, the earlier steps' figures read "
                             "from the folder (default: every step)")
    parser.add_argument("--step", choices=STEPS + UPDATE_STEPS, help=argparse.SUPPRESS)  # a child process runs one step
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.step:
        return _child(args.step, args.out)
    if args.passages < 1:
        parser.error("--passages must be positive")
    if args.start and args.out is None:
        parser.error("--from needs --out: the folder of the run that stopped")
    if args.out is not None and args.out.exists() and any(args.out.iterdir()) and not args.start:
        parser.error(f"{args.out} is not empty: give a new folder")

    if not 0 <= args.update < 1:
        parser.error("--update is a share of the passages: at least 0, below 1")
    names = ("passages", "workers", "words", "max_tokens", "codec_sample", "offline_ratio", "merge_window", "fetch", "draws",
             "seed", "update")
    cfg = {name: getattr(args, name) for name in names} | {"shard_size": args.shard_size or default_shard_size(args.passages)}
    if args.start and json.loads((args.out / CONFIG).read_text()) != cfg:
        parser.error(f"--from: {args.out} was run with other settings; give the same flags")
    out = args.out or Path(tempfile.mkdtemp(prefix="btr-scale-"))
    try:
        result = measure(cfg, out, args.start)
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
    if result["update"]:
        u = result["update"]
        print(f"  update ({u['counts']['changed']} changed, {u['counts']['added']} added, {u['counts']['deleted']} deleted): "
              f"{u['seconds']:,} s = {100 * u['over_build']:.1f}% of the build's {u['build_s']:,} s "
              f"(plan {u['plan_s']} s, encode {u['encode_s']} s, publish {u['publish_s']} s); "
              f"peak anonymous {u['peak_anon_mb']} MB")
        print(f"    {'verified' if u['verified'] else 'PROBLEMS'}; removed rows refused on fetch {u['removed_fetch_refused']}, "
              f"retrieved {u['removed_retrieved']} times; new passages found first {u['new_found_first']}; "
              f"unchanged texts as built {u['unchanged_same_text']}")
    print(f"  merged index {result['digests']['merged'][:16]}, retrievers {result['digests']['retriever'][:16]} / "
          f"{result['digests']['retriever_ivfpq'][:16]}")
    return 0 if result["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
