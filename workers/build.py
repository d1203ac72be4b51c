"""Build a small index in one process: bits for every passage, fit the codec, write shards, publish.

The indexing pipeline (flows/, workers/) does the same in parallel over Ray with the same
IndexWriter; this serial path serves tests, benchmarks and small corpora.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from reader.split import SplitReader
from storage.bits import BinaryTokens
from storage.codec import Codec, CodecSettings
from storage.index import IndexWriter, Manifest
from storage.record import Passage


def encode_corpus(
    reader: SplitReader,
    passages: Sequence[Passage],
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> list[BinaryTokens]:
    """Binary tokens of every passage, in input order (batched by length to waste little padding).

    ``progress(passages, tokens)`` is told what each batch added.
    """
    order = sorted(range(len(passages)), key=lambda i: len(passages[i].text))
    out: list[BinaryTokens | None] = [None] * len(passages)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        records = reader.encode_passages([passages[i] for i in chunk])
        for i, record in zip(chunk, records):
            out[i] = record
        if progress is not None:
            progress(len(chunk), sum(len(r.token_ids) for r in records))
    return out  # type: ignore[return-value]


def write_index(
    root: Path | str,
    reader: SplitReader,
    passages: Sequence[Passage],
    records: Sequence[BinaryTokens],
    shard_size: int = 1000,
    settings: CodecSettings | None = None,
    extra: dict | None = None,
) -> Manifest:
    """Fit the codec on ``records``, write them as shards of ``shard_size`` passages, publish."""
    codec = Codec.fit(
        ((r.token_ids.numpy(), r.bits.numpy()) for r in records), reader.vocab_size, reader.hidden_size, settings
    )
    writer = IndexWriter(root, reader.identity(), codec)
    shards = []
    for shard_id, first in enumerate(range(0, len(passages), shard_size)):
        rows = zip(passages[first : first + shard_size], records[first : first + shard_size])
        shards.append(writer.write_shard(shard_id, first, ((p.id, p.title, p.text, r) for p, r in rows)))
    return writer.publish(shards, extra)


def build_index(
    root: Path | str, reader: SplitReader, passages: Sequence[Passage], shard_size: int = 1000,
    settings: CodecSettings | None = None, extra: dict | None = None,
) -> Manifest:
    """Encode ``passages`` with ``reader``'s lower layers and write them as an index at ``root``."""
    return write_index(root, reader, passages, encode_corpus(reader, passages), shard_size, settings, extra)
