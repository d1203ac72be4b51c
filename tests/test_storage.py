"""Storage: round trip, atomic publish, integrity, refusal of foreign indexes, concurrent readers."""

from __future__ import annotations

import concurrent.futures as futures
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reader.assets import wikipedia_sample
from reader.config import BTRConfig
from storage.codec import Codec, PrototypeCounter
from storage.identity import IncompatibleIndex
from storage.index import Index, IndexNotFound, IndexWriter
from storage.record import CorruptRecord, Passage
from storage.shard import SHARDS, shard_name
from storage.verify import main as verify_main
from workers.build import build_index, encode_corpus


PASSAGES = [Passage(p.title, p.text, f"wiki-{i}") for i, p in enumerate(wikipedia_sample(24))]


@pytest.fixture
def reader(make_extractive):
    return make_extractive(BTRConfig(split_layer=2, max_passage_tokens=96), hidden_size=64)


@pytest.fixture
def index_path(tmp_path, reader) -> Path:
    build_index(tmp_path / "idx", reader, PASSAGES, shard_size=10)
    return tmp_path / "idx"


def test_fetch_returns_exactly_what_was_written(index_path, reader):
    expected = encode_corpus(reader, PASSAGES)
    index = Index.open(index_path, expect=reader.identity())
    assert len(index) == 24 and [s.rows for s in index.manifest.shards] == [10, 10, 4]
    assert index.fetch([]) == []
    rows = [23, 0, 11, 5, 10]
    for stored in index.fetch(rows):
        want, passage = expected[stored.row], PASSAGES[stored.row]
        assert (stored.pid, stored.title, stored.text) == (passage.id, passage.title, passage.text)
        assert torch.equal(stored.tokens.token_ids, want.token_ids)
        assert torch.equal(stored.tokens.bits, want.bits)
        assert torch.equal(stored.tokens.scale, want.scale)
    # The reader takes the fetched bits as they are.
    stored = [p.tokens for p in index.fetch([0, 1])]
    assert reader.extract(["what is it?"], [stored], "btr")[0].text


def test_texts_read_what_was_written_without_the_bits_and_check_each_record(index_path, flip_record_byte):
    index = Index.open(index_path)
    rows = [23, 0, 11, 5, 10]
    assert index.texts(rows) == [PASSAGES[r] for r in rows]  # against the corpus, not fetch
    assert index.texts([]) == []
    shard = flip_record_byte(index_path, row=3)
    with pytest.raises(CorruptRecord, match=f"{shard} row 3: checksum mismatch"):
        Index.open(index_path).texts([2, 3])


def test_manifest_records_reader_codec_and_counts(index_path, reader):
    manifest = json.loads((index_path / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert manifest["reader"]["split_layer"] == 2 and manifest["reader"]["hidden_size"] == 64
    assert manifest["reader"]["weights_digest"] == reader.identity().weights_digest
    assert manifest["passages"] == 24 and manifest["tokens"] == sum(len(r) for r in encode_corpus(reader, PASSAGES))
    assert set(manifest["codec"]["files"]) >= {"prototypes.npy.zst"}
    for shard in manifest["shards"]:
        assert shard["bytes"] == (index_path / SHARDS / shard["name"] / "data.mdb").stat().st_size


def test_shard_bytes_are_deterministic(tmp_path, reader):
    a = build_index(tmp_path / "a", reader, PASSAGES, shard_size=10)
    b = build_index(tmp_path / "b", reader, PASSAGES, shard_size=10)
    assert [s.digest for s in a.shards] == [s.digest for s in b.shards]


def test_no_manifest_no_index(tmp_path, reader):
    records = encode_corpus(reader, PASSAGES[:5])
    codec = Codec.fit(((r.token_ids.numpy(), r.bits.numpy()) for r in records), reader.vocab_size, 64)
    writer = IndexWriter(tmp_path / "idx", reader.identity(), codec)
    info = writer.write_shard(0, 0, ((p.id, p.title, p.text, r) for p, r in zip(PASSAGES, records)))
    with pytest.raises(IndexNotFound, match="manifest.json is missing"):
        Index.open(tmp_path / "idx")
    with pytest.raises(ValueError, match="expected 0"):
        writer.publish([type(info)(**{**info.to_dict(), "first_row": 3})])
    writer.publish([info])
    assert len(Index.open(tmp_path / "idx")) == 5


def test_flipped_byte_is_caught_by_verify_and_by_the_reader_path(index_path, capsys, flip_record_byte):
    assert verify_main([str(index_path)]) == 0
    shard = flip_record_byte(index_path, row=3)
    assert verify_main([str(index_path)]) == 1
    err = capsys.readouterr().err
    assert f"{shard}: digest differs" in err and f"{shard} row 3 (passage 'wiki-3'): checksum mismatch" in err
    index = Index.open(index_path)
    with pytest.raises(CorruptRecord, match=f"{shard} row 3: checksum mismatch"):
        index.fetch([2, 3])
    assert index.fetch([2])[0].pid == "wiki-2"  # the rest stays readable


def test_verify_without_an_index_says_so(tmp_path, capsys):
    assert verify_main([str(tmp_path)]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err


_KILLED_WRITER = """
import os, signal, struct, sys
from pathlib import Path
import storage.shard as shard

class DyingKey:
    # Packs keys for the LMDB puts, and SIGKILLs the writer at the third: two blocks are in.
    size, calls = 8, 0

    def pack(self, row):
        DyingKey.calls += 1
        if DyingKey.calls == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return struct.pack(">Q", row)

shard.KEY = DyingKey()
shard.write_shard(Path(sys.argv[1]), 1, 10, [b"x" * 5000] * 40, 40)
"""


def test_half_written_shard_is_never_listed_and_is_rebuilt(index_path, reader):
    writer_script = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(index_path)], cwd=Path.cwd())
    assert writer_script.returncode == -9
    leftover = index_path / SHARDS / f".tmp-{shard_name(1)}"
    assert leftover.exists()
    # The published index is untouched: its shard 1 is the sealed one.
    index = Index.open(index_path)
    assert index.fetch([10])[0].pid == "wiki-10"
    assert verify_main([str(index_path)]) == 0
    # A sealed shard whose data changed is not trusted by a resumed run either.
    writer = IndexWriter(index_path, reader.identity(), index.format.codec)
    assert writer.sealed(1) is not None
    with open(index_path / SHARDS / shard_name(1) / "data.mdb", "r+b") as f:
        f.seek(5000)
        f.write(b"\x00garbage")
    assert writer.sealed(1) is None
    # The next run rebuilds shard 1 and clears the leftover.
    records = encode_corpus(reader, PASSAGES[10:20])
    info = writer.write_shard(1, 10, ((p.id, p.title, p.text, r) for p, r in zip(PASSAGES[10:20], records)))
    assert not leftover.exists() and writer.sealed(1) == info
    writer.publish([Index.open(index_path).manifest.shards[0], info, Index.open(index_path).manifest.shards[2]])
    assert verify_main([str(index_path)]) == 0


def test_index_from_another_split_or_model_is_refused(index_path, make_extractive):
    other_k = make_extractive(BTRConfig(split_layer=3, max_passage_tokens=96), hidden_size=64)
    with pytest.raises(IncompatibleIndex, match="split layer k: index 2, reader 3"):
        Index.open(index_path, expect=other_k.identity())
    other_weights = make_extractive(BTRConfig(split_layer=2, max_passage_tokens=96), hidden_size=64, seed=1)
    with pytest.raises(IncompatibleIndex, match="model weights"):
        Index.open(index_path, expect=other_weights.identity())


def test_writer_refuses_bits_from_another_split(tmp_path, reader, make_extractive):
    other = make_extractive(BTRConfig(split_layer=1, max_passage_tokens=96), hidden_size=64)
    [foreign] = other.encode_passages(PASSAGES[:1])
    codec = Codec.fit([(foreign.token_ids.numpy(), foreign.bits.numpy())], reader.vocab_size, 64)
    writer = IndexWriter(tmp_path / "idx", reader.identity(), codec)
    with pytest.raises(ValueError, match="k=1"):
        writer.write_shard(0, 0, [("p", "t", "x", foreign)])


def _digest_of_fetch(index_path: str, rows: list[int]) -> str:
    import hashlib

    index = Index.open(index_path)
    digest = hashlib.sha256()
    for p in index.fetch(rows):
        digest.update(p.pid.encode() + p.tokens.bits.numpy().tobytes() + p.tokens.scale.numpy().tobytes())
    return digest.hexdigest()


def test_threads_and_processes_read_identical_results(index_path):
    rows = list(np.random.default_rng(0).integers(0, 24, size=60))
    rows = [int(r) for r in rows]
    serial = _digest_of_fetch(str(index_path), rows)
    index = Index.open(index_path)  # one index shared by every thread
    with futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: [(p.pid, p.tokens.bits.sum().item()) for p in index.fetch(rows)], range(16)))
    assert all(r == results[0] for r in results)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        digests = pool.starmap(_digest_of_fetch, [(str(index_path), rows)] * 8)
    assert set(digests) == {serial}
    # A forked child reopens the shards it inherited instead of using the parent's environments;
    # a pickled index (spawn) works too.
    global _INHERITED
    _INHERITED = index
    with multiprocessing.get_context("fork").Pool(2) as pool:
        forked = pool.map(_fetch_inherited, [rows] * 2)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pickled = pool.starmap(_fetch_pickled, [(index, rows)])
    assert forked + pickled == [[p.pid for p in index.fetch(rows)]] * 3


_INHERITED: Index | None = None


def _fetch_inherited(rows: list[int]) -> list[str]:
    return [p.pid for p in _INHERITED.fetch(rows)]


def _fetch_pickled(index: Index, rows: list[int]) -> list[str]:
    return [p.pid for p in index.fetch(rows)]


def test_prototypes_are_the_per_dimension_majority():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, size=200)
    bits = rng.integers(0, 256, size=(200, 2), dtype=np.uint8)
    counter = PrototypeCounter(6, 16)
    counter.add(ids[:120], bits[:120])
    counter.add(ids[120:], bits[120:])
    protos = np.unpackbits(counter.prototypes(min_count=1), axis=1, bitorder="little")
    unpacked = np.unpackbits(bits, axis=1, bitorder="little")
    for token in range(5):
        assert np.array_equal(protos[token], (unpacked[ids == token].mean(0) >= 0.5).astype(np.uint8))
    overall = (unpacked.mean(0) >= 0.5).astype(np.uint8)
    assert np.array_equal(protos[5], overall)  # never seen: the global prototype
    with pytest.raises(ValueError, match="outside the vocabulary"):
        counter.add(np.array([9]), bits[:1])


def test_blocks_of_rows_cross_boundaries_and_waste_little(tmp_path, reader):
    from storage.shard import BLOCK_ROWS

    passages = [Passage(p.title, p.text, f"w{i}") for i, p in enumerate(wikipedia_sample(60))]
    build_index(tmp_path / "idx", reader, passages, shard_size=24)  # blocks of 16 + 8 per shard
    index = Index.open(tmp_path / "idx")
    rows = [0, BLOCK_ROWS - 1, BLOCK_ROWS, 23, 24, 24 + BLOCK_ROWS, 59]
    assert [p.pid for p in index.fetch(rows)] == [f"w{r}" for r in rows]
    stored = sum(len(v) for v in index.read_raw(range(60)))
    on_disk = sum(s.bytes for s in index.manifest.shards)
    assert on_disk < 1.5 * stored + 3 * 8 * 4096  # page rounding per block, plus LMDB's own pages
    assert verify_main([str(tmp_path / "idx")]) == 0


FD_LIMIT_SCRIPT = """
import os, resource, sys
from storage.index import Index
from storage.open_shards import open_count
from storage.verify import verify
open_now = len(os.listdir("/proc/self/fd"))
soft, hard = open_now + 8, (open_now + 8 if sys.argv[2] == "hard" else resource.getrlimit(resource.RLIMIT_NOFILE)[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
index = Index.open(sys.argv[1])
fetched = [p.pid for p in index.fetch(range(24))] + [p.pid for p in index.fetch(range(23, -1, -1))]
most = open_count()
problems, checked = verify(index.root)
print(len(fetched), len(set(fetched)), resource.getrlimit(resource.RLIMIT_NOFILE)[0] > soft, most, problems == [], checked)
"""


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts open files through /proc")
def test_reading_more_shards_than_the_file_limit_allows_keeps_a_bounded_number_open(tmp_path, reader):
    build_index(tmp_path / "idx", reader, PASSAGES, shard_size=1)  # 24 shards, one open file each
    run = lambda limit: subprocess.run(  # noqa: E731
        [sys.executable, "-c", FD_LIMIT_SCRIPT, str(tmp_path / "idx"), limit], capture_output=True, text=True, check=True
    ).stdout.split()
    # Room to raise the soft limit: every shard stays open.
    assert run("soft") == ["48", "24", "True", "24", "True", "24"]
    # 8 files free under the hard limit: at most 4 shards open at once, least recently used closed first.
    fetched, distinct, raised, most, intact, checked = run("hard")
    assert (fetched, distinct, raised, intact, checked) == ("48", "24", "False", "True", "24")
    assert 1 <= int(most) <= 4


def test_shards_open_at_once_are_bounded_and_the_least_recently_used_close_first(tmp_path, reader, monkeypatch):
    from storage import open_shards

    build_index(tmp_path / "idx", reader, PASSAGES, shard_size=4)  # 6 shards
    monkeypatch.setenv(open_shards.MAX_OPEN_ENV, "3")
    index = Index.open(tmp_path / "idx")
    for row in (0, 4, 8, 0, 12):  # shard 0 used again before shard 3 opens: shard 1 is the one closed
        index.fetch([row])
    names = [os.path.basename(path) for path in open_shards._OPEN]
    assert names == ["shard-00002", "shard-00000", "shard-00003"]
    with open_shards.open_shard(index.root, "shard-00004"):  # in use: never closed under its reader
        index.fetch([20])
        assert "shard-00004" in [os.path.basename(path) for path in open_shards._OPEN]
    assert open_shards.open_count() == 3


def test_the_default_shard_size_keeps_wikipedia_sized_corpora_to_a_few_thousand_shards():
    from storage.shard import default_shard_size

    assert [default_shard_size(n) for n in (1, 10_000, 1_000_000, 4_096_000)] == [1000] * 4
    for passages, size in ((4_096_001, 2000), (21_000_000, 6000), (100_000_000, 25_000)):
        assert default_shard_size(passages) == size
        assert -(-passages // size) <= 4096  # files and maps: far under 20,000 and 65,530
