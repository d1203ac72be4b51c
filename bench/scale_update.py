"""``bench.scale --update``'s steps, each run in its own process after the build's (``bench.scale_steps``):

    new_corpus     the next dump as a parquet file (seeded edits, additions, deletions: ``planned_changes``)
    update         ``flows.update``'s plan and publish on the built index, its workers' encoding synthesized
    check_update   verify; removed rows neither fetched nor retrieved; new passages found first by their vectors
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .scale_steps import HIDDEN_SIZE, Progress, _runner, _tokenizer

UPDATE_STEPS = ("new_corpus", "update", "check_update")
NEW_CORPUS = "new-corpus.parquet"


def _corpus(cfg: dict):
    from .synthetic import BitModel, SyntheticCorpus

    tokenizer, layout = _tokenizer()
    return SyntheticCorpus(tokenizer, layout, HIDDEN_SIZE, BitModel(), cfg["words"], cfg["max_tokens"], cfg["seed"])


def planned_changes(cfg: dict) -> dict:
    """Which rows the new corpus edits and drops, and how many passages it adds (seeded): half of the changed
    share edited, 30% added, 20% deleted, as ``flows.update_corpus`` changes the demo sample."""
    import numpy as np

    count = cfg["passages"]
    changed = max(3, round(count * cfg["update"]))
    edited, added = changed // 2, changed * 3 // 10
    deleted = changed - edited - added
    picked = np.random.default_rng([cfg["seed"], 5]).choice(count, edited + deleted, replace=False)
    return {"edited": np.sort(picked[:edited]), "deleted": np.sort(picked[edited:]), "added": added}


def step_new_corpus(cfg: dict, out: Path) -> dict:
    """The next dump, as a parquet corpus: every passage of the build in row order, less the deleted, the edited
    with new text (drawn from blocks the build never used), then the added (ids from ``syn-<passages>``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage.record import Passage
    from workers.corpus import SCHEMA
    from workers.indexer import plan_shards

    corpus, changes = _corpus(cfg), planned_changes(cfg)
    plans = plan_shards(cfg["passages"], cfg["shard_size"])
    fresh = iter(corpus.passages(len(plans) + 1, 0, len(changes["edited"]) + changes["added"]))
    edited, deleted = set(changes["edited"].tolist()), set(changes["deleted"].tolist())
    progress = Progress("new corpus", cfg["passages"], "passages")
    with pq.ParquetWriter(out / NEW_CORPUS, SCHEMA, compression="zstd") as writer:
        def write(passages) -> None:
            columns = [[p.id for p in passages], [p.title for p in passages], [p.text for p in passages]]
            writer.write_table(pa.Table.from_arrays([pa.array(c, pa.string()) for c in columns], schema=SCHEMA))

        for plan in plans:
            rows = range(plan.first_row, plan.first_row + plan.rows)
            passages = corpus.passages(plan.shard_id, plan.first_row, plan.rows)
            kept = [Passage(p.title, next(fresh).text, p.id) if row in edited else p
                    for row, p in zip(rows, passages) if row not in deleted]
            write(kept)
            progress.update(plan.first_row + plan.rows)
        added = [Passage(p.title, p.text, f"syn-{cfg['passages'] + i}") for i, p in enumerate(fresh)]
        write(added)
    return {"edited": len(edited), "added": len(added), "deleted": len(deleted),
            "passages": cfg["passages"] - len(deleted) + len(added), "bytes": (out / NEW_CORPUS).stat().st_size}


def _new_vectors(cfg: dict, shard_id: int, rows: int):
    import numpy as np

    vectors = np.random.default_rng([cfg["seed"], 6, shard_id]).standard_normal((rows, HIDDEN_SIZE), np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def step_update(cfg: dict, out: Path) -> dict:
    """``flows.update`` on the final index, its workers' part synthesized: plan (normalize, match), encode the
    changed and added passages (synthetic bits, as ``write`` does), publish (merge, retriever, version files)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from flows.update import plan_changes, publish_version, stage_codec
    from storage.index import Manifest

    root, timer = out / "index", {}
    manifest = Manifest.load(root)
    start = time.perf_counter()
    print("update: normalizing and matching the new corpus", file=sys.stderr, flush=True)
    planned = plan_changes(root, manifest, str(out / NEW_CORPUS), "parquet", None, cfg["shard_size"])
    timer["plan_s"] = time.perf_counter() - start
    print(f"update: {planned['counts']} in {timer['plan_s']:,.1f} s", file=sys.stderr, flush=True)

    start = time.perf_counter()
    stage_codec(root, Path(planned["staging"]))
    # in a process of its own, as the flow's Ray workers encode apart from the flow's process
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        shards = pool.submit(_encode_update, cfg, str(root), planned).result()
    timer["encode_s"] = time.perf_counter() - start

    start = time.perf_counter()
    with _runner(cfg) as run:
        published = publish_version(str(root), planned, shards, run)
    timer["publish_s"] = time.perf_counter() - start
    return {**{k: round(v, 2) for k, v in timer.items()}, "counts": planned["counts"],
            "version": published["version"], "new_shards": published["new_shards"], "deleted_rows": published["deleted_rows"],
            "plans": [[p["shard_id"], p["first_row"], p["rows"]] for p in planned["plans"]]}


def _encode_update(cfg: dict, root: str, planned: dict) -> list[dict]:
    """The update's workers, synthesized: its changed and added passages' records and vectors, staged as the flow's."""
    from dataclasses import replace

    import numpy as np

    from storage.index import IndexWriter, Manifest
    from storage.shard import shard_name
    from workers.corpus import read_rows
    from workers.indexer import EMBEDDINGS, STAGING_LEVEL

    corpus, staging = _corpus(cfg), Path(planned["staging"])
    writer = IndexWriter(staging, Manifest.load(Path(root)).reader)
    writer.format = replace(writer.format, codec=writer.format.codec.at_level(STAGING_LEVEL))  # as the flow's workers
    (staging / EMBEDDINGS).mkdir(exist_ok=True)
    shards, progress = [], Progress("update, encode", sum(p["rows"] for p in planned["plans"]), "passages")
    for plan in planned["plans"]:
        passages = read_rows(planned["corpus"], plan["first_row"], plan["first_row"] + plan["rows"])
        records = corpus.bits(plan["shard_id"], passages)
        rows = ((p.id, p.title, p.text, r) for p, r in zip(passages, records))
        shards.append(writer.write_shard(plan["shard_id"], plan["first_row"], rows).to_dict())
        np.save(staging / EMBEDDINGS / f"{shard_name(plan['shard_id'])}.npy", _new_vectors(cfg, plan["shard_id"], plan["rows"]))
        progress.update(plan["first_row"] + plan["rows"] - planned["first_row"])
    return shards


def step_check_update(cfg: dict, out: Path) -> dict:
    """The updated index verified whole; deleted rows neither fetched nor retrieved (searched by their own vectors);
    every new passage retrieved first by its vector; a sample of unchanged rows fetched as the build wrote them."""
    import numpy as np

    from reader.retriever import Retriever
    from storage.index import Index
    from storage.verify import verify

    with _runner(cfg) as run:
        problems, checked = verify(out / "index", run)
    index = Index.open(out / "index")
    changes = planned_changes(cfg)
    removed = np.sort(np.concatenate([changes["edited"], changes["deleted"]]))
    refused = 0
    for row in removed.tolist():
        try:
            index.fetch([row])
        except IndexError:
            refused += 1
    retriever = Retriever(out / "index", encoder=object(), store=index)  # searched by vectors: no encoder
    shard_size = cfg["shard_size"]
    old = _build_vectors(cfg, removed)
    _, found = retriever.index.search(np.ascontiguousarray(old), 10, params=retriever.params)
    plans = json.loads((out / "steps" / "update.json").read_text())["plans"]
    new = np.concatenate([_new_vectors(cfg, shard_id, rows) for shard_id, _, rows in plans])
    first = np.concatenate([np.arange(first, first + rows) for _, first, rows in plans])
    _, top = retriever.index.search(np.ascontiguousarray(new), 1, params=retriever.params)
    sample = np.random.default_rng([cfg["seed"], 7]).choice(np.setdiff1d(np.arange(cfg["passages"]), removed), 200, replace=False)
    corpus = _corpus(cfg)
    same = sum(index.texts([int(r)])[0] == corpus.passages(int(r) // shard_size, int(r) // shard_size * shard_size,
                                                          shard_size)[int(r) % shard_size] for r in sample)
    return {"ok": not problems, "records": checked, "problems": problems[:10], "live": index.live, "rows": len(index),
            "removed_rows": len(removed), "removed_fetch_refused": refused,
            "removed_retrieved": int(np.isin(found, removed).sum()),
            "new_found_first": int((top[:, 0] == first).sum()), "new": len(first), "unchanged_sampled": len(sample),
            "unchanged_same_text": int(same)}


def _build_vectors(cfg: dict, rows):
    """The retriever vectors ``write`` gave ``rows`` (sorted): each shard's drawn once, as ``write`` drew them."""
    import numpy as np

    shard_size, out = cfg["shard_size"], []
    for shard_id in np.unique(rows // shard_size):
        positions = rows[rows // shard_size == shard_id] % shard_size
        vectors = np.random.default_rng([cfg["seed"], 3, int(shard_id)]).standard_normal((positions.max() + 1, HIDDEN_SIZE), np.float32)
        out.append(vectors[positions] / np.linalg.norm(vectors[positions], axis=1, keepdims=True))
    return np.concatenate(out)
