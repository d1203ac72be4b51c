"""`--update`: a changed corpus published as the next version of an index, through Prefect and Ray like a build."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from flows.update_corpus import changed_corpus
from reader.retriever import Retriever, passage_text
from storage.index import Index, Manifest
from storage.record import Passage
from storage.verify import main as verify_main
from workers.indexer import FAULT_ENV

from reader.config import BTRConfig

PASSAGES, SHARD_SIZE = 36, 9
EDITED, ADDED, DELETED = 3, 2, 2


@pytest.fixture(scope="module")
def built(tmp_path_factory, make_extractive_module, write_flow_inputs, prefect_server):
    """An index of 36 passages built by the flow at the demo's offline merge (0.2), and a changed corpus (3 edited, 2
    added, 2 deleted)."""
    reader = make_extractive_module(BTRConfig(split_layer=2, max_passage_tokens=96), hidden_size=64)
    root = write_flow_inputs(tmp_path_factory.mktemp("update"), reader, PASSAGES)
    run(root, root / "base", "corpus.jsonl")
    old = [Passage(r["title"], r["text"], r["id"]) for r in map(json.loads, open(root / "corpus.jsonl"))]
    new, changes = changed_corpus(old, EDITED, ADDED, DELETED, seed=1)
    with open(root / "new.jsonl", "w") as f:
        for p in new:
            f.write(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n")
    return root, changes, {p.id: p for p in new}


def run(root: Path, index: Path, corpus: str, update: bool = False) -> dict:
    from flows.index_wikipedia import index_wikipedia

    return index_wikipedia(
        index=str(index), corpus=str(root / corpus), corpus_format="jsonl", reader_checkpoint=str(root / "reader"),
        retriever=str(root / "reader"), max_passage_tokens=96, split_layer=2, shard_size=SHARD_SIZE, offline_merge=0.2,
        codec_sample=PASSAGES, update=update,
    )


def files(index: Path) -> dict[str, bytes]:
    """Every file of an index but the manifests' creation times and the work folder."""
    out = {}
    for path in sorted(index.rglob("*")):
        if path.is_file() and ".work" not in path.parts and path.name not in ("run.json", "lock.mdb"):
            data = path.read_bytes()
            if path.name == "manifest.json":
                manifest = json.loads(data)
                manifest.pop("created")
                data = json.dumps(manifest, sort_keys=True).encode()
            out[str(path.relative_to(index))] = data
    return out


@pytest.fixture(scope="module")
def updated(built, tmp_path_factory):
    root, changes, _ = built
    index = tmp_path_factory.mktemp("updated") / "index"
    shutil.copytree(root / "base", index)
    result = run(root, index, "new.jsonl", update=True)
    return index, result


def test_the_update_counts_its_changes_and_publishes_version_2_that_verifies(built, updated):
    index, result = updated
    assert {k: result[k] for k in ("version", "changed", "added", "deleted", "unchanged")} == {
        "version": 2, "changed": EDITED, "added": ADDED, "deleted": DELETED, "unchanged": PASSAGES - EDITED - DELETED}
    stored = Index.open(index)
    assert len(stored) == PASSAGES + EDITED + ADDED and stored.live == PASSAGES - DELETED + ADDED
    assert len(stored.deleted) == EDITED + DELETED
    assert verify_main([str(index)]) == 0
    base = Index.open(built[0] / "base")  # untouched rows: the very same records
    kept = [row for row in range(PASSAGES) if row not in set(stored.deleted.tolist())]
    assert len(kept) == PASSAGES - EDITED - DELETED and stored.read_raw(kept) == base.read_raw(kept)
    assert not (index / ".work" / "update").exists()


def test_the_new_passages_are_merged_as_a_window_of_their_own_with_the_index_codec(built, updated):
    """An update of a merged index (the demo's 0.2) stores its new passages merged, not lossless: their bits are the
    brute-force merge (tests/test_offline.py's reference) of the serial path's lossless bits of the same passages, in
    the same order; the index's codec is the one it was built with, byte for byte."""
    from reader.inputs import stopword_ids
    from reader.load import ReaderSpec, load_reader
    from storage.offline import OfflineMerge
    from test_offline import reference_merge
    from workers.build import build_index
    from workers.corpus import normalize, read_rows

    root, changes, new = built
    index, _ = updated
    assert files(index)["codec/codec.json"] == files(root / "base")["codec/codec.json"]
    assert {k: v for k, v in files(index).items() if k.startswith("codec/")} == {
        k: v for k, v in files(root / "base").items() if k.startswith("codec/")}
    stored = Index.open(index)
    assert stored.manifest.extra["offline_merge"]["ratio"] == 0.2
    added = stored.fetch(range(PASSAGES, len(stored)))
    assert sorted(p.pid for p in added) == sorted([*changes["edited"], *changes["added"]])
    loaded = load_reader(ReaderSpec("extractive", str(root / "reader"), 2, 96))
    normalized = {p.id: p for p in read_rows(normalize(str(root / "new.jsonl"), "jsonl", root / "reference-new-corpus").path,
                                             0, len(new))}  # as the flow reads it
    build_index(root / "reference-new", loaded, [normalized[p.pid] for p in added], shard_size=SHARD_SIZE)
    lossless = Index.open(root / "reference-new")
    expected = reference_merge(lossless, stopword_ids(loaded.tokenizer), OfflineMerge(0.2),
                               prototypes=stored.format.codec.prototypes)  # the index's codec, not the reference's own
    reference = lossless.fetch(range(len(added)))
    assert sum(not np.array_equal(e, r.tokens.bits.numpy()) for e, r in zip(expected, reference)) >= len(added) // 2
    for got, want, bits in zip(added, reference, expected):
        assert (got.pid, got.text) == (want.pid, want.text)
        assert np.array_equal(got.tokens.token_ids, want.tokens.token_ids)
        assert np.array_equal(got.tokens.bits.numpy(), bits)


def test_deleted_and_replaced_passages_are_never_retrieved_or_fetched_and_new_text_is_found(built, updated):
    root, changes, new = built
    index, _ = updated
    stored = Index.open(index)
    retriever = Retriever(index, store=stored)
    gone = set(changes["deleted"])
    everything = retriever.search([f"What is {p.title}?" for p in new.values()], stored.live)
    rows = {h.row for hits in everything for h in hits}
    assert len(rows) == stored.live and not rows & set(stored.deleted.tolist())
    assert not {p.pid for p in stored.fetch(sorted(rows))} & gone
    with pytest.raises(IndexError, match="deleted by an update"):
        stored.fetch([int(stored.deleted[0])])
    for pid in [*changes["edited"], *changes["added"]]:  # a question that is the new text itself finds it first
        top = retriever.search([passage_text(new[pid])], 1)[0][0]
        [found] = stored.fetch([top.row])
        assert found.pid == pid and ("catalogue number" in found.text) == (pid in changes["edited"])


def test_unchanged_passages_answer_as_before(built, updated):
    from reader.answer import Answerer

    root, changes, new = built
    index, _ = updated
    before, after = Answerer(root / "base"), Answerer(index)
    touched = set(changes["deleted"]) | set(changes["edited"])
    unchanged = [p for pid, p in new.items() if pid not in touched and pid not in changes["added"]]
    same = 0
    for passage in unchanged:
        a, b = (x.answer(f"What is {passage.title}?", k=3) for x in (before, after))
        old_ids = [p["id"] for p in a["passages"] if p["id"] not in touched]
        new_ids = [p["id"] for p in b["passages"] if p["id"] in {q.id for q in unchanged}]
        common = min(len(old_ids), len(new_ids))
        assert new_ids[:common] == old_ids[:common]  # the same vectors score the same: their order is kept
        if [p["id"] for p in a["passages"]] == [p["id"] for p in b["passages"]]:
            assert (a["answer"], a["source"], a["passages"]) == (b["answer"], b["source"], b["passages"])
            same += 1
    assert same >= len(unchanged) // 2


class Stop(RuntimeError):
    """Raised where a test stops an update."""


def test_an_update_stopped_at_six_points_in_turn_serves_the_old_version_until_published_and_ends_as_one_run(
    built, updated, tmp_path, monkeypatch
):
    """One update stopped again and again, each rerun going further: after matching the corpus, with a worker killed
    mid-shard, half-way through merging the new shards, before the retriever, after the version files, and after
    the manifest (the commit point) before the clean-up. Until the manifest the old version verifies and answers
    and none of its files changes; the last rerun ends with the files of an update never stopped."""
    import flows.update as update
    from reader.answer import Answerer

    root, _, _ = built
    index = tmp_path / "index"
    shutil.copytree(root / "base", index)
    before = files(index)
    real = {name: getattr(update, name) for name in ("corpus_digests", "merge_on_cluster", "extend_faiss",
                                                     "write_version_files", "prune")}

    def stop_after(name):
        def stopped(*args, **kwargs):
            real[name](*args, **kwargs)
            raise Stop(f"stopped after {name}")
        return stopped

    def merge_stopped_half_way(*args, **kwargs):
        def progress(stage, done, total):
            if stage == "rewrite" and done >= 1:
                raise Stop("stopped in the merge")
        return real["merge_on_cluster"](*args, **kwargs, progress=progress)

    def old_version_serves():
        assert Manifest.load(index).extra.get("version") is None and verify_main([str(index)]) == 0
        assert {k: v for k, v in files(index).items() if k in before} == before  # nothing it reads changed
        assert Answerer(index).answer("What is it?", k=2)["answer"] is not None

    marker = tmp_path / "killed"
    stops = [  # (where, the stand-in that stops it, a worker SIGKILLed half-way through the first new shard too)
        ("corpus_digests", stop_after("corpus_digests"), False),
        ("merge_on_cluster", merge_stopped_half_way, True),  # the killed worker's shard is indexed again first
        ("extend_faiss", stop_after("extend_faiss"), False),
        ("write_version_files", stop_after("write_version_files"), False),
        ("prune", stop_after("prune"), False),
    ]
    for name, stand_in, kill in stops:
        monkeypatch.setattr(update, name, stand_in)
        if kill:
            monkeypatch.setenv(FAULT_ENV, f"{PASSAGES // SHARD_SIZE}:{marker}")
        with pytest.raises(Stop):
            run(root, index, "new.jsonl", update=True)
        monkeypatch.setattr(update, name, real[name])
        monkeypatch.delenv(FAULT_ENV, raising=False)
        if name != "prune":  # before the manifest: the old version, whole
            old_version_serves()
    assert marker.exists(), "the worker was never killed"
    assert Manifest.load(index).extra["version"]["number"] == 2  # the manifest was renamed in before the stop
    run(root, index, "new.jsonl", update=True)  # nothing left to change: the clean-up is finished
    assert files(index) == files(updated[0])
    assert not (index / ".work" / "update").exists()


def test_the_same_corpus_again_publishes_nothing_and_another_reader_is_refused(built, updated, tmp_path):
    root, _, _ = built
    index = tmp_path / "index"
    shutil.copytree(updated[0], index)
    assert run(root, index, "new.jsonl", update=True) == {"index": str(index), "version": 2, "changed": 0, "added": 0,
                                                          "deleted": 0, "unchanged": PASSAGES - DELETED + ADDED}
    from flows.update import Refused, check_same_reader

    with pytest.raises(Refused, match="split_layer"):
        check_same_reader(Manifest.load(index), {"split_layer": 3}, None)


def test_a_damaged_version_file_fails_verify(updated, tmp_path, capsys):
    index = tmp_path / "index"
    shutil.copytree(updated[0], index)
    deleted = next(index.glob("versions/*/deleted.npy"))
    rows = np.load(deleted)
    np.save(open(deleted, "wb"), rows[:-1])
    assert verify_main([str(index)]) == 1
    assert "deleted.npy differs from the manifest" in capsys.readouterr().err
    with pytest.raises(Exception, match="damaged"):
        Index.open(index)


def test_an_empty_corpus_and_another_corpus_into_a_built_folder_are_one_line_each_and_a_touched_corpus_resumes(
    built, tmp_path, capsys
):
    from flows.index_wikipedia import main

    root, _, _ = built
    (tmp_path / "empty.jsonl").write_text('{"id": "x", "title": "t"}\n')  # its one record rejected
    common = ["--corpus-format", "jsonl", "--reader-checkpoint", str(root / "reader"), "--retriever", str(root / "reader"),
              "--max-passage-tokens", "96", "--split-layer", "2", "--shard-size", str(SHARD_SIZE), "--offline-merge", "0",
              "--codec-sample", str(PASSAGES)]
    with pytest.raises(SystemExit) as exit_:
        main(["--index", str(tmp_path / "e"), "--corpus", str(tmp_path / "empty.jsonl"), *common])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "no passages to index (1 rejected" in err and "Traceback" not in err
    assert not (tmp_path / "e" / "shards").exists()
    index = tmp_path / "index"
    shutil.copytree(root / "base", index)
    with pytest.raises(SystemExit) as exit_:
        main(["--index", str(index), "--corpus", str(root / "new.jsonl"), *common])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "choose another index folder" in err and "Traceback" not in err
    from flows.index_wikipedia import check_plan, corpus_digest

    work = index / ".work"
    plan = json.loads((work / "plan.json").read_text())  # what the build recorded, the corpus's sha256 among it
    os.utime(root / "corpus.jsonl", ns=(1, 1))  # same bytes, another modification time: the same corpus
    assert corpus_digest(root / "corpus.jsonl", work) == plan["corpus_sha256"]  # read again, the same digest
    check_plan(work, plan)  # so a rerun resumes (refused above for another corpus)


def test_a_running_service_moves_to_the_new_version_under_load_without_failing_a_request(built, updated, tmp_path):
    """Four clients ask without pause; the update's files appear, then its manifest is renamed in (as publishing
    does); every request succeeds, the added passage is found once the manifest is there, and a deleted one never."""
    import threading

    from reader.answer import Answerer
    from reader.loadtest import request
    from reader.serve import create_app
    from test_serve_page import serving

    root, changes, new = built
    index = tmp_path / "index"
    shutil.copytree(root / "base", index)
    added = new[next(iter(changes["added"]))]
    app = create_app(Answerer(index), max_batch=4, window_ms=1)
    statuses, seen, lock = [], [], threading.Lock()
    asked, found, stop = threading.Event(), threading.Event(), threading.Event()

    def client(number: int) -> None:
        for _ in range(200):  # bounded: the test ends on events, the loop on this count
            if stop.is_set():
                return
            status, body = request(port, "POST", "/answer", {"question": passage_text(added), "k": 3})
            ids = [p["id"] for p in body.get("passages", [])]
            with lock:
                statuses.append(status)
                seen.append(ids)
                if len(statuses) >= 8:
                    asked.set()
            if ids[:1] == [added.id]:
                found.set()

    with serving(app) as port:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        assert asked.wait(120), "the clients did not get going"
        for name, data in files(updated[0]).items():  # the new version's files, then its manifest, renamed in
            if name != "manifest.json" and not (index / name).exists():
                (index / name).parent.mkdir(parents=True, exist_ok=True)
                (index / name).write_bytes(data)
        before = len(statuses)
        shutil.copyfile(updated[0] / "manifest.json", index / ".manifest.json.tmp")
        os.replace(index / ".manifest.json.tmp", index / "manifest.json")
        assert found.wait(120), "the service never served the new version"
        stop.set()
        for thread in threads:
            thread.join(120)
        status, health = request(port, "GET", "/health")
        assert status == 200 and (health["version"], health["passages"]) == (2, PASSAGES - DELETED + ADDED)
    assert set(statuses) == {200} and len(statuses) > before
    assert app.state.watch.reloads == 1
    on_new = [ids for ids in seen if ids[:1] == [added.id]]  # answered by version 2: no deleted passage cited
    assert on_new and not {pid for ids in on_new for pid in ids} & set(changes["deleted"])


@pytest.mark.parametrize("fault", ["a truncated deletion file", "a new shard missing", "no retriever"])
def test_a_damaged_or_half_written_new_version_is_never_served(built, updated, tmp_path, fault, caplog):
    """The manifest of version 2 renamed in beside files that are damaged or not all there: the running answerer
    stays on version 1 (a warning says why) and answers from it; once the files are whole and the manifest is
    published again, it moves."""
    from reader.answer import Answerer
    from reader.reload import VersionWatch

    root, changes, new = built
    index = tmp_path / "index"
    shutil.copytree(root / "base", index)
    answerer = Answerer(index)
    watch = VersionWatch(answerer)
    version_2 = files(updated[0])
    damaged = dict(version_2)
    if fault == "a truncated deletion file":
        name = next(n for n in damaged if n.endswith("deleted.npy"))
        damaged[name] = damaged[name][:-8]
    elif fault == "a new shard missing":
        new_shard = max(n.split("/")[1] for n in damaged if n.startswith("shards/"))
        damaged = {n: data for n, data in damaged.items() if not n.startswith(f"shards/{new_shard}/")}
    else:
        damaged = {n: data for n, data in damaged.items() if not n.endswith(".faiss")}

    def publish(tree: dict) -> None:
        for name, data in tree.items():
            if name != "manifest.json":
                (index / name).parent.mkdir(parents=True, exist_ok=True)
                (index / name).write_bytes(data)
        shutil.copyfile(updated[0] / "manifest.json", index / ".manifest.json.tmp")
        os.replace(index / ".manifest.json.tmp", index / "manifest.json")

    added = new[next(iter(changes["added"]))]
    publish(damaged)
    with caplog.at_level("WARNING", logger="reader.reload"):
        assert watch.poll() is False
    assert "does not open" in caplog.text and "still serving version 1" in caplog.text
    assert answerer.index.version == 1 and watch.reloads == 0
    hits = watch.lookup(passage_text(added), 3).hits
    assert all(h.row < PASSAGES for h in hits)  # version 1's rows only
    publish(version_2)
    assert watch.poll() is True and answerer.index.version == 2
    [top] = answerer.index.fetch([watch.lookup(passage_text(added), 1).hits[0].row])
    assert top.pid == added.id


def test_a_compaction_gives_back_the_deleted_rows_and_every_question_gets_its_answer_and_citations(built, updated, tmp_path):
    """`--compact` on the updated index (5 of 41 rows deleted, 12%): below the threshold nothing happens; at it, version 3
    holds the live rows only, their records byte for byte in order, and every question answers as on version 2; a
    reader that opened version 2 keeps reading it."""
    from flows.index_wikipedia import index_wikipedia
    from reader.answer import Answerer

    _, _, new = built
    index = tmp_path / "index"
    shutil.copytree(updated[0], index)
    old, before = Index.open(index), Answerer(index)
    questions = [f"What is {p.title}?" for p in new.values()] + [passage_text(p) for p in list(new.values())[:8]]
    keys = ("answer", "source", "context", "span", "passages")
    answers = [{k: a[k] for k in keys} for a in (before.answer(q, k=3) for q in questions)]

    skipped = index_wikipedia(index=str(index), compact=True, compact_threshold=0.5)
    assert not skipped["compacted"] and (skipped["deleted_rows"], skipped["rows"]) == (5, 41)
    assert Manifest.load(index).extra["version"]["number"] == 2

    result = index_wikipedia(index=str(index), compact=True, compact_threshold=0.1)
    assert result["compacted"] and result["version"] == 3 and result["passages"] == old.live == 36
    assert result["bytes"] < result["bytes_before"]
    compacted = Index.open(index)
    assert len(compacted) == compacted.live == 36 and not len(compacted.deleted)
    assert verify_main([str(index)]) == 0
    live = [row for row in range(len(old)) if row not in set(old.deleted.tolist())]
    assert compacted.read_raw(range(36)) == old.read_raw(live)  # the records themselves, renumbered in order
    after = Answerer(index)
    assert [{k: a[k] for k in keys} for a in (after.answer(q, k=3) for q in questions)] == answers
    assert [p.pid for p in old.fetch(live[:4])] == [p.pid for p in compacted.fetch(range(4))]  # version 2 still reads
    assert not (index / ".work" / "compact").exists()
    # the next update matches against the renumbered digests: the same corpus again changes nothing
    from flows.update import plan_changes
    from storage.versions import read_passages

    assert read_passages(index, compacted.manifest.extra)["row"].to_pylist() == list(range(36))
    planned = plan_changes(index, compacted.manifest, str(built[0] / "new.jsonl"), "jsonl", None, SHARD_SIZE)
    assert planned["counts"] == {"changed": 0, "added": 0, "deleted": 0, "unchanged": 36}


def test_prune_removes_shards_neither_the_current_nor_the_previous_version_names(tmp_path):
    from storage.versions import prune

    def manifest(path: Path, names: list[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"shards": [{"name": n} for n in names]}))

    for name in ("shard-00000", "shard-00001", "shard-00002", "shard-00003", ".tmp-shard-00004"):
        (tmp_path / "shards" / name).mkdir(parents=True)
    manifest(tmp_path / "manifest.json", ["shard-00002", "shard-00003"])
    assert prune(tmp_path, 4, ()) == []  # version 3's manifest unread: nothing is removed
    manifest(tmp_path / "versions" / "0003" / "manifest.json", ["shard-00001", "shard-00002"])
    assert prune(tmp_path, 4, ()) == ["shards/shard-00000"]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [".tmp-shard-00004", "shard-00001", "shard-00002",
                                                                        "shard-00003"]
