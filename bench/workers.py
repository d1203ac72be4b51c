"""Indexing efficiency: the whole shard pipeline against the bare lower-layer forward pass.

    python -m bench.workers --json

Same passages, same batches, one run: (1) the bare forward of layers 1..k over pre-tokenized
batches; (2) the pipeline a worker runs per shard: read rows from the normalized corpus, tokenize,
forward, binarize, pack, compress, write a sealed LMDB shard. ``efficiency`` = (2) / (1) in tokens/s.
Retriever embeddings are a separate model's cost and are not part of either.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from reader.inputs import pad
from reader.load import ReaderSpec, load_reader
from storage.codec import Codec
from storage.index import IndexWriter
from workers.build import encode_corpus
from workers.corpus import normalize, read_rows


def bare_forward(reader, passages, batch_size: int) -> tuple[float, int]:
    """Seconds for layers 1..k alone over the pipeline's own batches (tokenized beforehand), and tokens."""
    order = sorted(range(len(passages)), key=lambda i: len(passages[i].text))
    ids = [reader.passage_ids(passages[i]) for i in order]
    batches = [pad(ids[s : s + batch_size], reader.layout.pad_id) for s in range(0, len(ids), batch_size)]
    start = time.perf_counter()
    with torch.no_grad():
        for batch, mask in batches:
            reader.lower(batch, mask)
    if reader.device.type == "cuda":
        torch.cuda.synchronize()  # kernels run behind the Python loop; time their end
    return time.perf_counter() - start, sum(len(i) for i in ids)


def pipeline(reader, corpus: str, rows: int, root: Path, batch_size: int) -> tuple[float, int]:
    """Seconds for read + tokenize + forward + binarize + pack + compress + write of one shard."""
    start = time.perf_counter()
    passages = read_rows(corpus, 0, rows)
    records = encode_corpus(reader, passages, batch_size)
    info = IndexWriter(root, reader.identity()).write_shard(0, 0, ((p.id, p.title, p.text, r) for p, r in zip(passages, records)))
    return time.perf_counter() - start, info.tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--passages", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--corpus", help="a corpus file (default: the bundled sample)")
    parser.add_argument("--format", default="sample", help="its format (workers.corpus: sample, jsonl, dpr, parquet, wikixml)")
    parser.add_argument("--checkpoint", help="reader checkpoint (default: the bundled reader); only its shape matters here")
    parser.add_argument("--split-layer", type=int, help="k, for a checkpoint without btr.json")
    args = parser.parse_args(argv)
    reader = load_reader(ReaderSpec(checkpoint=args.checkpoint, split_layer=args.split_layer))
    if torch.cuda.is_available():  # as a GPU worker runs it (workers.indexer)
        reader.to("cuda", dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = normalize(args.corpus, args.format, work / "corpus")
        passages = read_rows(corpus.path, 0, args.passages)
        records = encode_corpus(reader, passages[:200], args.batch_size)  # warm-up, and a codec to write with
        codec = Codec.fit(((r.token_ids.numpy(), r.bits.numpy()) for r in records), reader.vocab_size, reader.hidden_size)
        bare, piped = [], []
        for round_ in range(args.rounds):  # alternate, so that machine noise hits both alike
            seconds, tokens = bare_forward(reader, passages, args.batch_size)
            bare.append(tokens / seconds)
            root = work / f"index-{round_}"
            codec.save(root / "codec")
            seconds, tokens = pipeline(reader, corpus.path, args.passages, root, args.batch_size)
            piped.append(tokens / seconds)
    result = {
        "bare_forward_tokens_per_s": round(max(bare), 1),
        "pipeline_tokens_per_s": round(max(piped), 1),
        "efficiency": round(max(piped) / max(bare), 3),
        "config": {
            "reader": args.checkpoint or "all-MiniLM-L6-v2 extractive (the default)", "split_layer": reader.split_layer,
            "passages": args.passages, "tokens": tokens, "batch_size": args.batch_size, "rounds": args.rounds,
            "threads": torch.get_num_threads(), "device": str(reader.device),
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "dtype": str(reader.dtype),
        },
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"bare forward {result['bare_forward_tokens_per_s']} tokens/s, pipeline {result['pipeline_tokens_per_s']} tokens/s, efficiency {result['efficiency']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
