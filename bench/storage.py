"""Index size and fetch speed on real representations.

    python -m bench.storage --json

Runs the default reader's lower layers (``reader/checkpoint``: trained MiniLM, k = 3 of 6;
``--reader`` for another) over the bundled Wikipedia sample, writes an index through the product's
own writer, and reports bits per dimension per token for each coding (plain packed bits, packed +
zstd, the index's lossless codec, and after the offline merge), plus the time to fetch and decode
a query's worth of passages against a plain LMDB read of the same bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zstandard as zstd

from reader.assets import wikipedia_sample
from reader.inputs import stopword_ids
from reader.load import ReaderSpec, load_reader, quiet_library_logs
from storage.bits import BinaryTokens
from storage.codec import CodecSettings, PrototypeCounter
from storage.index import Index
from storage.offline import OfflineMerge, merge_index
from storage.record import section_sizes
from workers.build import encode_corpus, write_index


def count_bits(records: list[BinaryTokens], vocab_size: int, hidden_size: int) -> PrototypeCounter:
    """Per-(token id, dimension) counts of set bits over ``records``."""
    counter = PrototypeCounter(vocab_size, hidden_size)
    for r in records:
        counter.add(r.token_ids.numpy(), r.bits.numpy())
    return counter


def entropy_given_token_dim(counter: PrototypeCounter) -> float:
    """Empirical H(bit | token id, dimension) in bits: what a coder modelling it could approach."""
    seen = counter.count > 0
    p = counter.ones[seen] / counter.count[seen][:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.nan_to_num(p * np.log2(p)) + np.nan_to_num((1 - p) * np.log2(1 - p)))
    return float((h.sum(1) * counter.count[seen]).sum() / (counter.count.sum() * counter.ones.shape[1]))


def heldout_token_dim(records: list[BinaryTokens], total: PrototypeCounter, folds: int = 10) -> float:
    """Bits per dimension of a per-(token id, dimension) probability model on passages it was not fit on.

    ``folds``-fold over passages: each fold is coded with probabilities counted on the others (add-4
    smoothing towards the per-dimension rate). The in-sample entropy above is biased low (a token
    seen once costs nothing); this is what such a model would cost on new text of the same kind.
    """
    bits, count = 0.0, 0
    for fold in range(folds):
        held = [r for i, r in enumerate(records) if i % folds == fold]
        if not held:
            continue
        counter = count_bits(held, *total.ones.shape)
        rate = (total.ones.sum(0) - counter.ones.sum(0) + 1) / (total.count.sum() - counter.count.sum() + 2)
        ids = np.concatenate([r.token_ids.numpy() for r in held])
        ones = total.ones[ids].astype(np.int64) - counter.ones[ids]  # counts from the other folds only
        seen = total.count[ids] - counter.count[ids]
        x = np.unpackbits(np.concatenate([r.bits.numpy() for r in held]), axis=1, bitorder="little").astype(bool)
        p = (ones + 4 * rate) / (seen[:, None] + 4)
        bits += -np.log2(np.where(x, p, 1 - p)).sum()
        count += x.size
    return float(bits / count)


def time_reads(index: Index, rows: list[int], repeats: int) -> tuple[float, float]:
    """Median ms to fetch and decode ``rows``, and to read their bytes only (warm page cache)."""
    index.fetch(rows)  # warm-up: page cache, per-thread decompressors
    decode, raw = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        index.fetch(rows)
        middle = time.perf_counter()
        index.read_raw(rows)
        raw.append(time.perf_counter() - middle)
        decode.append(middle - start)
    return 1000 * statistics.median(decode), 1000 * statistics.median(raw)


def run(args: argparse.Namespace, root: Path) -> dict:
    """Encode, write, measure; return the figures."""
    quiet_library_logs()
    reader = load_reader(ReaderSpec(checkpoint=args.reader, max_passage_tokens=args.passage_tokens))
    passages = wikipedia_sample(args.passages)
    start = time.perf_counter()
    records = encode_corpus(reader, passages)
    encode_s = time.perf_counter() - start
    manifest = write_index(root, reader, passages, records, args.shard_size, CodecSettings(level=args.level))
    index = Index.open(root, expect=reader.identity())

    merged_root = root.parent / f"{root.name}-merged"
    merge_index(root, merged_root, stopword_ids(reader.tokenizer), OfflineMerge(args.offline_ratio))
    merged = Index.open(merged_root, expect=reader.identity())

    tokens, d = manifest.tokens, reader.hidden_size
    per_dim = 8 / (tokens * d)  # bytes -> bits per dimension per token
    sizes = [section_sizes(v) for v in index.read_raw(range(len(index)))]
    merged_sizes = [section_sizes(v) for v in merged.read_raw(range(len(merged)))]
    plain = zstd.ZstdCompressor(level=args.level)
    codec_dir = root / "codec"
    table_bytes = sum(f.stat().st_size for f in codec_dir.iterdir())

    lengths = np.array([len(r) for r in records])
    rows = [int(i) for i in np.argsort(np.abs(lengths - args.fetch_tokens), kind="stable")[: args.fetch]]
    fetch_ms, raw_ms = time_reads(index, rows, args.repeats)
    merged_fetch_ms, _ = time_reads(merged, rows, args.repeats)
    counts = count_bits(records, reader.vocab_size, d)
    return {
        "bits_per_dim": {
            "packed": 1.0,
            "zstd": round(sum(len(plain.compress(r.bits.numpy().tobytes())) for r in records) * per_dim, 4),
            "lossless": round(sum(s["bits"] for s in sizes) * per_dim, 4),
            f"merged_{args.offline_ratio}": round(sum(s["bits"] for s in merged_sizes) * per_dim, 4),
        },
        "entropy_given_token_dim": round(entropy_given_token_dim(counts), 4),
        "heldout_token_dim": round(heldout_token_dim(records, counts), 4),
        "other_bits_per_dim": {
            "scale": round(sum(s["scale"] for s in sizes) * per_dim, 4),
            "token_ids": round(sum(s["ids"] for s in sizes) * per_dim, 4),
            "codec_tables": round(table_bytes * per_dim, 4),
        },
        "fetch_decode_ms_40": round(fetch_ms, 3),
        "raw_read_ms_40": round(raw_ms, 3),
        "fetch_decode_ms_40_merged": round(merged_fetch_ms, 3),
        "fetch_tokens_mean": round(float(lengths[rows].mean()), 1),
        "index_bytes": sum(s.bytes for s in manifest.shards) + table_bytes,
        "record_bytes_per_token": round(sum(s["total"] for s in sizes) / tokens, 2),
        "disk_bytes_per_token": {
            "lossless": round(sum(s.bytes for s in manifest.shards) / tokens, 2),
            "merged": round(sum(s.bytes for s in merged.manifest.shards) / tokens, 2),
        },
        "encode_tokens_per_s": round(tokens / encode_s, 1),
        "config": {
            "reader": args.reader or "reader/checkpoint (the default: trained all-MiniLM-L6-v2, extractive)",
            "split_layer": reader.split_layer,
            "hidden_size": d,
            "passages": len(passages),
            "tokens": tokens,
            "max_passage_tokens": args.passage_tokens,
            "shards": len(manifest.shards),
            "zstd_level": args.level,
            "offline_merge": merged.manifest.extra["offline_merge"],
            "fetch": args.fetch,
            "repeats": args.repeats,
        },
    }


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, built without running it (tests/test_help_texts.py reads their help)."""
    parser = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object (default: off, a summary)")
    parser.add_argument("--reader",
                        help="checkpoint whose lower layers make the bits "
                             "(default: the default reader, reader/checkpoint)")
    parser.add_argument("--passages", type=int, default=2000, help="sample articles to index (default: %(default)s)")
    parser.add_argument("--passage-tokens", type=int, default=256,
                        help="passage length limit, in tokens (default: %(default)s)")
    parser.add_argument("--shard-size", type=int, default=500, help="passages per LMDB shard (default: %(default)s)")
    parser.add_argument("--level", type=int, default=19,
                        help="zstd level of the codec and of the packed + zstd figure (default: %(default)s)")
    parser.add_argument("--offline-ratio", type=float, default=0.2, help="r_o of the offline merge (default: %(default)s)")
    parser.add_argument("--fetch", type=int, default=40,
                        help="passages per timed fetch, a query's worth (default: %(default)s)")
    parser.add_argument("--fetch-tokens", type=int, default=200,
                        help="fetch the passages closest to this length, in tokens (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=50, help="timed fetches; the median counts (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="keep the index here (default: a temporary folder, removed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, args.out or Path(tmp) / "index")
    if args.json:
        print(json.dumps(result))
        return 0
    bits = result["bits_per_dim"]
    print(f"{result['config']['passages']} passages, {result['config']['tokens']} tokens, d={result['config']['hidden_size']}")
    print("  bits/dim: " + ", ".join(f"{k} {v}" for k, v in bits.items()))
    print(f"  given token and dimension: in-sample entropy {result['entropy_given_token_dim']},"
          f" held-out model {result['heldout_token_dim']}")
    print(f"  fetch+decode {args.fetch} passages: {result['fetch_decode_ms_40']} ms (plain LMDB read {result['raw_read_ms_40']} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
