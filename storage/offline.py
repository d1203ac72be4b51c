"""Offline (lossy) compression of a whole index in bounded memory: passes of small units, run here or on a cluster.

What happens to each token (``storage.token_merge``): stopwords collapse to their prototype, and
``ratio`` of every other token's occurrences merge, chunk by chunk of ``chunk`` occurrences in (row,
position) order. Occurrences are grouped by token through an external partition in a scratch
folder. Each pass is a map over shards or buckets whose units are independent, so ``merge_index``
runs them with any ``storage.tasks.Runner`` (one process, or Ray tasks: ``workers.offline``) and
writes the same bytes either way:

    count      per shard: how many occurrences of each token it holds (token ids alone are decoded)
    (driver)   each shard's first rank per token: the sum of the shards' counts before it
    partition  per shard: every non-stopword occurrence (token, row, position, bits) to a bucket by
               hash(token, piece), a piece being PIECE_CHUNKS chunks of the token's occurrences in
               corpus order; one file per shard, grouped by bucket
    merge      per bucket: its slice of every shard's file; new bits for the changed occurrences,
               one file per bucket, grouped by shard
    (driver)   the codec's dictionary, trained again on the first merged passages
    rewrite    per shard: its slice of every bucket's changes swapped in, stopwords set to their
               prototypes, sealed into the destination

Memory is bounded by a bucket and a shard, never the corpus: stopwords (about 45% of Wikipedia's
tokens, the most frequent of them 5% each) never enter a bucket; a token's occurrences are cut into
pieces of whole chunks, each hashed to a bucket of its own; and the bucket count grows with the
corpus (one per ``bucket_tokens`` tokens, at least ``buckets``). Cutting at chunk boundaries
changes nothing: the merge is the same, whatever the bucketing.

The passes run window by window (``OfflineMerge.window`` passages of consecutive shards, the
chunks of a token cut within its window): the disk holds one window's scratch, and with
``consume_source`` (the flow's lossless staging) a window's source shards are deleted as soon as its
merged shards are sealed, so the peak is the lossless index plus one window's scratch, not twice
the corpus. The codec's dictionary is trained on the first window's merged passages.

Every unit (``storage.merge_units``) writes its files under a temporary name and renames them: a
unit lost with its process runs again from the start, and a rerun given the same ``scratch`` folder
and settings skips the units and windows already done, including those whose source shards are
gone. A shard's partition file is deleted once every bucket of its window is merged.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from .index import SHARDS, Index, IndexWriter, Manifest
from .merge_units import (
    PIECE_CHUNKS, PLAN, count_shard, first_ranks, gather, merge_bucket, merged_passages, partition_shard, rewrite_shard,
    save_json, unit_file,
)
from .open_shards import close_shards
from .shard import ShardInfo
from .tasks import Runner, serial
from .token_merge import OfflineMerge, merge_occurrences

Progress = Callable[[str, int, int], None]  # (pass, done, total): "count", "partition", "merge", "rewrite"
CODEC_MARKER = "codec-trained.json"  # the destination's codec is final (trained on the first window)


def windows(shards: Sequence[ShardInfo], passages: int) -> list[range]:
    """Shard positions grouped into merge windows: a shard joins the window its first row falls in."""
    groups: dict[int, list[int]] = {}
    for position, shard in enumerate(shards):
        groups.setdefault(shard.first_row // passages, []).append(position)
    return [range(group[0], group[-1] + 1) for group in groups.values()]


def _start(scratch: Path, plan: dict) -> None:
    """Keep what an earlier attempt of the same merge left in ``scratch``; clear anything else."""
    path = scratch / PLAN
    if path.exists() and json.loads(path.read_text()) == plan:
        return
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    path.write_text(json.dumps(plan))


def _merge_window(
    folder: Path, index: Index, destination: Path, run: Runner, progress: Progress, before: dict[str, int], totals: dict[str, int],
    codec_final: bool = False,
) -> tuple[IndexWriter, list, int]:
    """The passes over one started window folder: the destination's writer, the window's shard infos and changed tokens.

    ``progress`` counts over the whole merge: ``before`` units of each pass were in earlier windows, of ``totals``.
    """
    plan = json.loads((folder / PLAN).read_text())
    shards, buckets, codec = plan["shards"], plan["buckets"], index.format.codec
    units = [(str(folder), i) for i in range(shards)]
    report = lambda stage: lambda done, _: progress(stage, before[stage] + done, totals[stage])  # noqa: E731
    run(count_shard, units, report("count"))
    first_ranks(folder, shards, codec.vocab_size)
    changed = sum(run(partition_shard, units, report("partition")))
    gather(folder, "part", shards, buckets)
    changed += sum(run(merge_bucket, [(str(folder), b) for b in range(buckets)], report("merge")))
    gather(folder, "changes", buckets, shards)
    for i in range(shards):  # every bucket is merged: the partition is no longer needed
        unit_file(folder, "part", i, ".bin").unlink(missing_ok=True)
    marker = folder.parent / CODEC_MARKER
    if marker.exists() or codec_final:  # trained on an earlier window, or the destination's own (an update's)
        writer = IndexWriter(destination, index.manifest.reader)
    else:  # same prototypes; the dictionary is trained again on merged residuals, which differ from lossless ones
        merged = itertools.chain.from_iterable(merged_passages(folder, i) for i in range(shards))
        sample = [(t.token_ids.numpy(), t.bits.numpy()) for *_, t in itertools.islice(merged, codec.settings.dictionary_samples)]
        writer = IndexWriter(destination, index.manifest.reader, codec.with_dictionary(sample))
        save_json(marker, writer.codec_description)
    infos = run(rewrite_shard, [(str(folder), str(destination), i) for i in range(shards)], report("rewrite"))
    return writer, infos, changed


def _merge(
    index: Index, folder: Path, destination: Path, settings: OfflineMerge, plan: dict, run: Runner, progress: Progress
) -> Manifest:
    """Every window in order (skipping those an earlier attempt finished); the destination's manifest."""
    groups = windows(index.manifest.shards, settings.window)
    bucket_counts = [settings.bucket_count(sum(index.manifest.shards[p].tokens for p in g)) for g in groups]
    shards = len(index.manifest.shards)
    totals = {"count": shards, "partition": shards, "merge": sum(bucket_counts), "rewrite": shards}
    infos, changed, writer = [], 0, None
    for number, (positions, buckets) in enumerate(zip(groups, bucket_counts)):
        done = folder / f"window-{number:05d}.json"
        window = folder / f"window-{number:05d}"
        if not done.exists():
            _start(window, {**plan, "first_shard": positions.start, "shards": len(positions), "buckets": buckets})
            before = dict.fromkeys(totals, positions.start) | {"merge": sum(bucket_counts[:number])}
            writer, window_infos, window_changed = _merge_window(
                window, index, destination, run, progress, before, totals, plan.get("codec_final", False)
            )
            save_json(done, {"shards": window_infos, "changed": window_changed})
        record = json.loads(done.read_text())
        infos += record["shards"]
        changed += record["changed"]
        shutil.rmtree(window, ignore_errors=True)
        if plan["consume_source"]:  # sealed and recorded above: the window's lossless copy is no longer needed
            close_shards(index.root)
            for position in positions:
                shutil.rmtree(index.root / SHARDS / index.manifest.shards[position].name, ignore_errors=True)
    writer = writer or IndexWriter(destination, index.manifest.reader)
    extra = {**index.manifest.extra, "offline_merge": {
        **asdict(settings), "bucket_files": sum(bucket_counts), "stopwords": len(plan["stopwords"]), "changed_tokens": changed,
    }}
    shards = [ShardInfo.from_dict(i) for i in infos]
    return writer.publish(shards, extra=extra, first_row=min((s.first_row for s in shards), default=0))


def merge_index(
    source: Path | str, destination: Path | str, stopwords: set[int], settings: OfflineMerge | None = None,
    workdir: Path | str | None = None, progress: Progress | None = None, run: Runner = serial,
    scratch: Path | str | None = None, consume_source: bool = False, codec_final: bool = False,
) -> Manifest:
    """Write an offline-compressed copy of the index at ``source`` to ``destination``.

    ``run`` runs each pass's units (``storage.tasks.serial``, or a cluster's runner); ``scratch``
    (default: a temporary folder in ``workdir``) is kept if the merge fails, so that a rerun with
    the same one resumes. ``progress(pass, done, total)`` is called after each unit of each pass.
    ``consume_source`` deletes each window's source shards once its merged shards are sealed (the
    source is left unreadable: for a staging copy only). ``codec_final``: ``destination`` already holds
    the codec its shards are written with (an update's new shards join an index coded with it), so
    no dictionary is trained again.
    """
    settings = settings or OfflineMerge()
    progress = progress or (lambda *_: None)
    index = Index.open(source, only=())  # the manifest and codec: each window opens its own shards
    folder = Path(scratch) if scratch is not None else Path(tempfile.mkdtemp(prefix="btr-merge-", dir=workdir))
    source_digest = hashlib.sha256("".join(s.digest for s in index.manifest.shards).encode()).hexdigest()
    plan = {
        "source": str(Path(source).resolve()), "source_shards": source_digest, "settings": asdict(settings),
        "stopwords": sorted(stopwords), "span": settings.chunk * PIECE_CHUNKS, "consume_source": consume_source,
    } | ({"codec_final": True} if codec_final else {})
    _start(folder, plan)
    try:
        manifest = _merge(index, folder, Path(destination), settings, plan, run, progress)
    except BaseException:
        if scratch is None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    return manifest


__all__ = [
    "OfflineMerge", "count_shard", "merge_bucket", "merge_index", "merge_occurrences", "partition_shard", "rewrite_shard",
    "windows",
]
