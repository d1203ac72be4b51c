"""Offline (lossy) compression: stopword collapse, bipartite merging by Hamming distance, the rewrite."""

import json

import numpy as np
import pytest

from reader.assets import wikipedia_sample
from reader.config import BTRConfig
from reader.inputs import stopword_ids
from storage.index import Index
from storage.offline import OfflineMerge, merge_index, merge_occurrences
from storage.record import Passage, section_sizes
from storage.verify import main as verify_main
from workers.build import build_index

PASSAGES = [Passage(p.title, p.text, f"wiki-{i}") for i, p in enumerate(wikipedia_sample(40))]


def packed(signs: np.ndarray) -> np.ndarray:
    return np.packbits(signs > 0, axis=1, bitorder="little")


def test_nearest_occurrences_merge_into_sign_of_sum_with_prototype_ties():
    rng = np.random.default_rng(0)
    base = rng.choice([-1, 1], size=(1, 16))
    far = -base
    # A = rows 0, 2, 4; B = rows 1, 3, 5. Row 0 is one bit from row 1; the others are far apart.
    near = base.copy()
    near[0, 0] *= -1
    rows = np.concatenate([near, base, far, rng.choice([-1, 1], size=(3, 16))])
    prototype = packed(np.ones((1, 16)))[0]
    out = np.unpackbits(merge_occurrences(packed(rows), prototype, ratio=1 / 6), axis=1, bitorder="little")
    expected = (base[0] > 0).astype(np.uint8)
    expected[0] = 1  # the one disagreement is a tie: the prototype's bit (+1) wins
    assert np.array_equal(out[0], expected) and np.array_equal(out[1], expected)
    assert np.array_equal(out[2:], np.unpackbits(packed(rows[2:]), axis=1, bitorder="little"))  # untouched


def brute_force_merge(signs: list[list[int]], prototype: list[int], ratio: float) -> tuple[list[list[int]], dict]:
    """The merge of one token's occurrences as BTR.md and storage.token_merge's docstring describe it,
    one pair at a time in plain Python: even-numbered occurrences form A, odd ones B; each A links
    to its nearest B by Hamming distance (the first such B on a tie); the r best links merge
    (r = round(ratio * n), at most n // 2, the bipartite limit; the earlier A on a tie); each B with
    the A tokens linked to it becomes sign(sum), a zero sum taking the prototype's bit.
    Also returns what the case exercised: ties in distance and in sign, the largest group."""
    n = len(signs)
    r = min(round(ratio * n), n // 2)
    a_rows, b_rows = list(range(0, n, 2)), list(range(1, n, 2))
    hamming = lambda i, j: sum(x != y for x, y in zip(signs[i], signs[j]))  # noqa: E731
    links, seen = [], {"nearest_ties": 0, "sign_ties": 0, "largest_group": 1, "capped": round(ratio * n) > n // 2}
    if r == 0:
        return [list(row) for row in signs], seen
    for i in a_rows:
        nearest = b_rows[0]
        for j in b_rows[1:]:
            if hamming(i, j) < hamming(i, nearest):
                nearest = j
        seen["nearest_ties"] += sum(hamming(i, j) == hamming(i, nearest) for j in b_rows) > 1
        links.append((hamming(i, nearest), i, nearest))
    chosen = sorted(links)[:r]
    out = [list(row) for row in signs]
    for j in sorted({b for _, _, b in chosen}):
        members = [j] + [i for _, i, b in chosen if b == j]
        seen["largest_group"] = max(seen["largest_group"], len(members))
        sums = [sum(signs[m][bit] for m in members) for bit in range(len(prototype))]
        seen["sign_ties"] += sums.count(0)
        vector = [prototype[bit] if total == 0 else (1 if total > 0 else -1) for bit, total in enumerate(sums)]
        for m in members:
            out[m] = vector
    return out, seen


def test_bucketed_merge_equals_a_brute_force_hamming_merge_on_random_occurrences():
    rng = np.random.default_rng(7)
    cases = []
    for case in range(600):
        n, width = int(rng.integers(2, 24)), int(rng.choice([8, 16, 24]))
        ratio = float(rng.choice([0.1, 0.2, 1 / 3, 0.45, 0.5]))
        # Few distinct vectors with a few bits flipped: distances tie and several A share a nearest B.
        pool = rng.choice([-1, 1], size=(int(rng.integers(1, 5)), width))
        signs = pool[rng.integers(0, len(pool), n)] * np.where(rng.random((n, width)) < 0.1, -1, 1)
        prototype = rng.choice([-1, 1], size=width)
        got = np.unpackbits(merge_occurrences(packed(signs), packed(prototype[None])[0], ratio), axis=1, bitorder="little")
        expected, seen = brute_force_merge(signs.tolist(), prototype.tolist(), ratio)
        assert np.array_equal(got, np.array(expected) > 0), (case, n, width, ratio)
        cases.append(seen | {"odd": n % 2})
    count = lambda key: sum(bool(c[key]) for c in cases)  # noqa: E731
    assert min(count("odd"), count("capped"), count("nearest_ties"), count("sign_ties")) > 20
    assert sum(c["largest_group"] >= 3 for c in cases) > 50  # several A tokens merged into one B


def test_ratio_zero_and_tiny_groups_are_left_alone():
    bits = np.arange(12, dtype=np.uint8).reshape(6, 2)
    assert merge_occurrences(bits, np.zeros(2, np.uint8), 0.0) is bits
    single = bits[:1]
    assert merge_occurrences(single, np.zeros(2, np.uint8), 0.2) is single


def test_stopwords_include_function_words_punctuation_and_specials(tokenizer):
    ids = stopword_ids(tokenizer)
    for token in ("the", "of", ",", ".", "[SEP]", "[CLS]", "title", "context"):
        assert tokenizer.convert_tokens_to_ids(token) in ids
    for token in ("paris", "tragedy", "1600"):
        assert tokenizer.convert_tokens_to_ids(token) not in ids


@pytest.fixture
def indexes(tmp_path, make_extractive):
    reader = make_extractive(BTRConfig(split_layer=2, max_passage_tokens=128), hidden_size=64)
    build_index(tmp_path / "lossless", reader, PASSAGES, shard_size=15)
    stopwords = stopword_ids(reader.tokenizer)
    merge_index(tmp_path / "lossless", tmp_path / "merged", stopwords, OfflineMerge(0.2, chunk=64, buckets=3))
    return reader, stopwords, Index.open(tmp_path / "lossless"), Index.open(tmp_path / "merged")


def test_merged_index_is_smaller_verified_and_keeps_everything_else(indexes, tmp_path):
    reader, stopwords, lossless, merged = indexes
    assert verify_main([str(tmp_path / "merged")]) == 0
    assert [s.rows for s in merged.manifest.shards] == [15, 15, 10]
    manifest = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    assert manifest["extra"]["offline_merge"]["ratio"] == 0.2
    bits = lambda index: sum(section_sizes(v)["bits"] for v in index.read_raw(range(len(index))))  # noqa: E731
    assert bits(merged) < 0.8 * bits(lossless)
    rows = list(range(len(lossless)))
    for before, after in zip(lossless.fetch(rows), merged.fetch(rows)):
        assert (before.pid, before.text) == (after.pid, after.text)
        assert np.array_equal(before.tokens.token_ids, after.tokens.token_ids)
        assert np.array_equal(before.tokens.scale, after.tokens.scale)
    # The reader reads the merged bits like any others.
    assert reader.extract(["what?"], [[p.tokens for p in merged.fetch([0, 1])]], "btr")[0].text


def test_stopwords_collapse_and_the_rest_merge_exactly_as_the_brute_force_reference(indexes):
    _, stopwords, lossless, merged = indexes
    rows = list(range(len(lossless)))
    ids = np.concatenate([p.tokens.token_ids.numpy() for p in lossless.fetch(rows)])
    before = np.concatenate([p.tokens.bits.numpy() for p in lossless.fetch(rows)])
    after = np.concatenate([p.tokens.bits.numpy() for p in merged.fetch(rows)])
    prototypes = merged.format.codec.prototypes
    is_stop = np.isin(ids, list(stopwords))
    assert is_stop.mean() > 0.3
    assert np.array_equal(after[is_stop], prototypes[ids[is_stop]])
    changed = (after != before).any(1) & ~is_stop
    expected = np.concatenate(reference_merge(lossless, stopwords, OfflineMerge(0.2, chunk=64)))
    assert np.array_equal(after, expected)
    # Exactly the occurrences the reference changes: merged A tokens and the B tokens they joined.
    assert changed.sum() == ((expected != before).any(1) & ~is_stop).sum() > 0
    stop_changed = ((before != after).any(1) & is_stop).sum()
    assert merged.manifest.extra["offline_merge"]["changed_tokens"] == changed.sum() + stop_changed
    # Identical vectors now stand for each merged group: fewer distinct vectors per token.
    distinct = lambda bits: len({(t, v.tobytes()) for t, v in zip(ids[~is_stop], bits[~is_stop])})  # noqa: E731
    assert distinct(after) < distinct(before)


def test_settings_are_validated():
    with pytest.raises(ValueError, match=r"\[0, 0.5\]"):
        OfflineMerge(ratio=0.7)


def brute_force_packed(bits: np.ndarray, prototype: np.ndarray, ratio: float) -> np.ndarray:
    """``brute_force_merge`` on packed bits, the stored form."""
    signs = np.unpackbits(bits, axis=1, bitorder="little").astype(int) * 2 - 1
    proto = np.unpackbits(prototype, bitorder="little").astype(int) * 2 - 1
    return packed(np.array(brute_force_merge(signs.tolist(), proto.tolist(), ratio)[0]).reshape(signs.shape))


def reference_merge(
    index: Index, stopwords: set[int], settings: OfflineMerge, rows: range | None = None, prototypes: np.ndarray | None = None
) -> list[np.ndarray]:
    """The offline merge of ``rows`` (all) alone, in memory, as specified: each token's occurrences in (row, position)
    order, chunk by chunk, through the brute-force merge (not the code under test). ``prototypes``: another codec's
    (an update's passages merge with their index's), else the index's own."""
    stored = index.fetch(rows if rows is not None else range(len(index)))
    ids = np.concatenate([p.tokens.token_ids.numpy() for p in stored])
    bits = np.concatenate([p.tokens.bits.numpy() for p in stored])  # (row, position) order already
    prototypes = index.format.codec.prototypes if prototypes is None else prototypes
    for token in np.unique(ids):
        where = np.flatnonzero(ids == token)
        if token in stopwords:
            bits[where] = prototypes[token]
            continue
        for lo in range(0, len(where), settings.chunk):
            part = where[lo : lo + settings.chunk]
            bits[part] = brute_force_packed(bits[part], prototypes[token], settings.ratio)
    return np.split(bits, np.cumsum([len(p.tokens) for p in stored])[:-1])


def test_merge_is_the_same_whatever_the_bucketing(tmp_path, make_extractive, monkeypatch):
    import storage.offline as offline

    reader = make_extractive(BTRConfig(split_layer=2, max_passage_tokens=128), hidden_size=64)
    build_index(tmp_path / "lossless", reader, PASSAGES, shard_size=15)
    stopwords = stopword_ids(reader.tokenizer)
    expected = reference_merge(Index.open(tmp_path / "lossless"), stopwords, OfflineMerge(0.2, chunk=4))
    one = merge_index(tmp_path / "lossless", tmp_path / "one", stopwords, OfflineMerge(0.2, chunk=4, buckets=1))
    # Pieces of one chunk (4 occurrences) spread every frequent token over many buckets.
    monkeypatch.setattr(offline, "PIECE_CHUNKS", 1)
    many = merge_index(tmp_path / "lossless", tmp_path / "many", stopwords, OfflineMerge(0.2, chunk=4, buckets=7))
    assert [s.digest for s in one.shards] == [s.digest for s in many.shards]
    assert one.extra["offline_merge"]["changed_tokens"] == many.extra["offline_merge"]["changed_tokens"]
    merged = Index.open(tmp_path / "many").fetch(range(len(PASSAGES)))
    assert all(np.array_equal(p.tokens.bits.numpy(), bits) for p, bits in zip(merged, expected))


def test_buckets_hold_pieces_of_tokens_and_no_stopwords(tmp_path, make_extractive):
    from storage.merge_units import _occurrence_dtype, count_shard, first_ranks, partition_shard
    from storage.offline import _start

    reader = make_extractive(BTRConfig(split_layer=2, max_passage_tokens=128), hidden_size=64)
    build_index(tmp_path / "lossless", reader, PASSAGES, shard_size=15)
    index = Index.open(tmp_path / "lossless")
    is_stop = np.zeros(index.format.codec.vocab_size, dtype=bool)
    is_stop[list(stopword_ids(reader.tokenizer))] = True
    scratch = tmp_path / "scratch"
    shards = range(len(index.manifest.shards))
    plan = {"source": str(tmp_path / "lossless"), "settings": {}, "stopwords": np.flatnonzero(is_stop).tolist(), "buckets": 5,
            "span": 3, "first_shard": 0, "shards": len(shards)}
    _start(scratch, plan)
    for shard in shards:
        count_shard(str(scratch), shard)
    first_ranks(scratch, len(shards), len(is_stop))
    for shard in shards:
        partition_shard(str(scratch), shard)
    parts = [np.fromfile(scratch / f"part-{s:05d}.bin", _occurrence_dtype(8)) for s in shards]
    bounds = [np.load(scratch / f"part-{s:05d}.idx.npy")[:-1] for s in shards]
    buckets = [np.concatenate([p["token"][b[i] : b[i + 1]] for p, b in zip(parts, bounds)]) for i in range(5)]
    ids = np.concatenate([p.tokens.token_ids.numpy() for p in index.fetch(range(len(index)))])
    assert sum(len(b) for b in buckets) == (~is_stop[ids]).sum()
    assert not any(is_stop[b].any() for b in buckets)
    frequent = np.bincount(ids[~is_stop[ids]]).argmax()  # seen more than 3 times: cut into pieces
    assert sum(frequent in b for b in buckets) > 1
    # A bucket's share no longer grows with the corpus: one bucket per bucket_tokens tokens.
    assert OfflineMerge().bucket_count(10_000) == 8
    assert OfflineMerge().bucket_count(3_000_000_000) == 3000


def test_a_merge_stopped_half_way_resumes_from_its_scratch_folder_to_the_same_bytes(indexes, tmp_path, monkeypatch):
    import storage.merge_units as units
    import storage.offline as offline
    from storage.tasks import serial

    _, stopwords, _, merged = indexes

    def crashing(fn, calls, done=None):  # the process dies after the first shard's rewrite
        if fn is offline.rewrite_shard:
            serial(fn, calls[:1])
            raise SystemExit("killed")
        return serial(fn, calls, done)

    settings, scratch = OfflineMerge(0.2, chunk=64, buckets=3), tmp_path / "scratch"
    with pytest.raises(SystemExit):
        merge_index(tmp_path / "lossless", tmp_path / "again", stopwords, settings, run=crashing, scratch=scratch)
    assert (scratch / "plan.json").exists()  # kept for the rerun

    def no_merging(*_):
        raise AssertionError("a bucket finished before the crash was merged again")

    monkeypatch.setattr(units, "merge_occurrences", no_merging)
    manifest = merge_index(tmp_path / "lossless", tmp_path / "again", stopwords, settings, scratch=scratch)
    assert [s.digest for s in manifest.shards] == [s.digest for s in merged.manifest.shards]
    assert not scratch.exists()


def test_each_window_merges_its_own_passages_alone(indexes, tmp_path):
    """Windows of 20 passages (shards of 15 join the window their first row is in: rows 0-29 and 30-39)."""
    _, stopwords, lossless, _ = indexes
    settings = OfflineMerge(0.2, chunk=8, buckets=3, window=20)
    windowed = merge_index(tmp_path / "lossless", tmp_path / "windowed", stopwords, settings)
    assert windowed.extra["offline_merge"]["window"] == 20
    got = Index.open(tmp_path / "windowed").fetch(range(len(PASSAGES)))
    whole = settings.__class__(0.2, chunk=8, buckets=3)
    for rows, window in ((range(40), whole), (range(30), settings), (range(30, 40), settings)):
        expected = reference_merge(lossless, stopwords, window, rows)
        matches = [np.array_equal(got[r].tokens.bits.numpy(), e) for r, e in zip(rows, expected)]
        assert all(matches) == (window is settings), rows  # the whole-corpus merge cuts chunks elsewhere


def test_a_consuming_merge_deletes_each_window_once_sealed_and_resumes_without_it(indexes, tmp_path, monkeypatch):
    import storage.offline as offline
    from storage.shard import SHARDS
    from storage.tasks import serial

    _, stopwords, _, _ = indexes
    settings, scratch = OfflineMerge(0.2, chunk=8, buckets=3, window=20), tmp_path / "scratch"
    reference = merge_index(tmp_path / "lossless", tmp_path / "reference", stopwords, settings)
    source = tmp_path / "staging"
    build_index(source, indexes[0], PASSAGES, shard_size=15)
    names = sorted(p.name for p in (source / SHARDS).iterdir())
    rewrites = []

    def crashing(fn, calls, done=None):  # the process dies at the second window's rewrite
        if fn is offline.rewrite_shard:
            rewrites.append(calls)
            if len(rewrites) == 2:
                raise SystemExit("killed")
        return serial(fn, calls, done)

    with pytest.raises(SystemExit):
        merge_index(source, tmp_path / "merged", stopwords, settings, run=crashing, scratch=scratch, consume_source=True)
    assert sorted(p.name for p in (source / SHARDS).iterdir()) == names[2:]  # the first window's two shards are gone
    manifest = merge_index(source, tmp_path / "merged", stopwords, settings, scratch=scratch, consume_source=True)
    assert [s.digest for s in manifest.shards] == [s.digest for s in reference.shards]
    assert manifest.extra["offline_merge"]["changed_tokens"] == reference.extra["offline_merge"]["changed_tokens"]
    assert list((source / SHARDS).iterdir()) == [] and not scratch.exists()
