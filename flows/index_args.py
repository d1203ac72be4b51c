"""The index flow's command line, light: ``--help`` and a bad flag answer before Prefect or torch load.

``btr-index`` (the console script) starts here; ``python -m flows.index_wikipedia`` builds the same parser.
"""

from __future__ import annotations

import argparse

DESCRIPTION = "The flow `index-wikipedia`: a corpus in, a BTR index out."


def build_parser() -> argparse.ArgumentParser:
    """The flow's command-line flags (no heavy import: ``--help`` answers at once)."""
    parser = argparse.ArgumentParser(prog="python -m flows.index_wikipedia", description=DESCRIPTION)
    parser.add_argument("--index", default="indexes/wikipedia-sample",
                        help="the index folder: written, resumed, or with --update given a new version (default: %(default)s)")
    parser.add_argument("--corpus", default=None, help="the corpus file (default: the bundled sample, 10,033 passages)")
    # The formats of workers.corpus.FORMATS (not imported here: --help answers before pyarrow and torch load).
    parser.add_argument("--corpus-format", choices=("auto", "sample", "dpr", "jsonl", "parquet", "wikixml"), default="auto",
                        help="jsonl: one {id, title, text} object per line; parquet: columns id, title, text; "
                             "dpr: DPR's psgs_w100.tsv (id, text, title); wikixml: a MediaWiki dump, .xml or .xml.bz2; "
                             "sample: the bundled sample's JSON; auto: the bundled sample without --corpus, else "
                             "from the file's name (.jsonl, .parquet, .tsv, .xml, .xml.bz2, .json) "
                             "(default: %(default)s; docs/indexing.md)")
    parser.add_argument("--shard-size", type=int, default=0,
                        help="passages per LMDB shard; 0: from the corpus size (default: %(default)s)")
    parser.add_argument("--offline-merge", type=float, default=0.2,
                        help="r_o, the share of each token's stored vectors merged (lossy, smaller); "
                             "0 keeps the lossless index (default: %(default)s)")
    parser.add_argument("--ray-address", default=None,
                        help="an existing Ray cluster to join, e.g. auto or HEAD:6379 (default: a local Ray for this run)")
    parser.add_argument("--reader-checkpoint", default=None,
                        help="reader to index with; the index serves only this reader (default: the trained default)")
    parser.add_argument("--reader-family", choices=("extractive", "fid"), default="extractive",
                        help="fid: a trained BTR-FiD checkpoint (flows.train_reader --family fid) (default: %(default)s)")
    parser.add_argument("--split-layer", type=int, default=None,
                        help="k, the encoder layer whose output is stored as bits (default: the reader's own)")
    parser.add_argument("--max-passage-tokens", type=int, default=320,
                        help="passages are cut to this many tokens (default: %(default)s)")
    parser.add_argument("--retriever", default=None, help="passage encoder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--codec-sample", type=int, default=2000,
                        help="passages the codec is fitted on (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="Ray workers; 0: one per GPU, else one (default: %(default)s)")
    parser.add_argument("--worker-threads", type=int, default=0,
                        help="CPUs each worker takes; 0: the cluster's CPUs split among the workers (default: %(default)s)")
    parser.add_argument("--update", action="store_true",
                        help="publish the corpus as the next version of the index in --index (only changes are encoded) "
                             "(default: off)")
    parser.add_argument("--compact", action="store_true",
                        help="rewrite the index in --index without its deleted rows as its next version, once they are "
                             "--compact-threshold of its rows; with --update, after the update (default: off)")
    parser.add_argument("--compact-threshold", type=float, default=0.1,
                        help="the share of deleted rows (0 to 1) from which --compact rewrites the index; 0: whenever "
                             "any row is deleted (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse the flags here, then run the flow (whose module imports Prefect, Ray and torch)."""
    build_parser().parse_args(argv)
    from .index_wikipedia import main as run

    run(argv)
