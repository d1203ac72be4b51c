"""Fault injection, second round (issue 27): a damaged retriever, and index files the system will not open.

Each row of docs/faults.md that this file tests failed before its fix: the retriever verified "ok"
and answered from garbage; a shard folder replaced by a file, a symlink loop, a manifest field of
the wrong type or a shard name outside ``shards/`` ended in a traceback and exit 1.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import reader.retriever as retriever_module
from reader.answer import DAMAGED_INDEX, main as answer_main
from storage.index import FAISS_FILE
from storage.shard import DATA, SHARDS, shard_name
import storage.verify as verify_module
from storage.verify import main as verify_main
from test_faults import answer, built, index, refused_everywhere, verify  # noqa: F401 (fixtures)

VECTORS = 40 * 64 * 4  # the fixture's retriever: 40 unit vectors of the tiny reader's 64 dimensions, last in the file


def flip_retriever(index: Path) -> None:  # the probe: bytes flipped in the middle of retriever.faiss
    path = index / FAISS_FILE
    raw = bytearray(path.read_bytes())
    middle = len(raw) - VECTORS // 2
    raw[middle - VECTORS // 4 : middle + VECTORS // 4] = bytes(b ^ 0xFF for b in raw[middle - VECTORS // 4 : middle + VECTORS // 4])
    path.write_bytes(bytes(raw))


def zero_retriever(index: Path) -> None:  # zeroed after its header: same size, every vector 0
    path = index / FAISS_FILE
    raw = path.read_bytes()
    path.write_bytes(raw[:-VECTORS] + bytes(VECTORS))


def shard_folder_is_a_file(index: Path) -> None:
    shutil.rmtree(index / SHARDS / shard_name(1))
    (index / SHARDS / shard_name(1)).write_text("not a shard")


def shard_is_a_symlink_loop(index: Path) -> None:
    path = index / SHARDS / shard_name(2) / DATA
    path.unlink()
    path.symlink_to(DATA)  # itself: ELOOP


def edit_manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(index: Path) -> None:
        manifest = json.loads((index / "manifest.json").read_text())
        change(manifest)
        (index / "manifest.json").write_text(json.dumps(manifest))

    return damage


def manifest_is_a_folder(index: Path) -> None:
    (index / "manifest.json").unlink()
    (index / "manifest.json").mkdir()


# fault, damage, what reader.answer, serve and evaluate say (exit 3), what storage.verify says (exit 1)
REFUSED = [
    ("retriever flipped in the middle", flip_retriever, "are not unit vectors", "retriever.faiss differs from the manifest's digest"),
    ("retriever zeroed after its header", zero_retriever, "are not unit vectors", "retriever.faiss differs from the manifest's digest"),
    ("shard folder replaced by a file", shard_folder_is_a_file, "shard-00001 cannot be read", "Not a directory"),
    ("data.mdb a symlink loop", shard_is_a_symlink_loop, "shard-00002 cannot be read", "Too many levels of symbolic links"),
    ("manifest field of the wrong type", edit_manifest(lambda m: m["shards"][0].update(bytes="lots")),
     "shards.0.bytes: Input should be a valid integer", "manifest.json is damaged"),
    ("shard name outside shards/", edit_manifest(lambda m: m["shards"][1].update(name="../../../../etc")),
     "shards.1.name: String should match pattern", "manifest.json is damaged"),
    ("manifest unreadable", manifest_is_a_folder, "manifest.json is damaged (unreadable", "Is a directory"),
]


@pytest.mark.parametrize("fault, damage, said, verified", REFUSED, ids=[row[0] for row in REFUSED])
def test_damage_the_first_round_missed_is_refused_with_exit_3_and_verify_finds_it(index, capsys, fault, damage, said, verified):
    refused_everywhere(index, capsys, damage, said, verified)


def test_a_retriever_damaged_where_the_load_check_does_not_look_is_refused_at_the_first_search(index, capsys, monkeypatch):
    monkeypatch.setattr(retriever_module, "check_vectors", lambda index: None)  # a sample that misses the damage
    flip_retriever(index)
    status, out, err = answer(capsys, index, "--k", 5)
    assert status == DAMAGED_INDEX and out == "" and err.count("\n") == 1, err
    assert "scored a passage" in err and "unit vectors score at most 1" in err and "rerun the index flow" in err


def test_an_index_published_before_retriever_digests_still_reads_and_verify_says_what_it_checked(index, capsys):
    manifest = json.loads((index / "manifest.json").read_text())
    del manifest["extra"]["retriever"]
    (index / "manifest.json").write_text(json.dumps(manifest))
    status, out, err = answer(capsys, index)
    assert status == 0 and json.loads(out)["answer"], err
    assert verify_main([str(index)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: 40 records") and "records no digest of the retriever" in out
    flip_retriever(index)  # without a digest, the vectors' check still finds this damage
    status, err = verify(capsys, index)
    assert status == 1 and "are not unit vectors" in err
    assert answer(capsys, index)[0] == DAMAGED_INDEX


def test_a_reader_spec_of_the_wrong_type_is_a_damaged_manifest_not_a_traceback(index, capsys):
    edit_manifest(lambda m: m["extra"]["reader_spec"].update(split_layer="two"))(index)
    status, out, err = answer(capsys, index)
    assert status == DAMAGED_INDEX and "extra.reader_spec.split_layer" in err and err.count("\n") == 1, err


def test_a_shard_file_that_stats_but_does_not_open_is_named_by_verify_not_a_traceback(index, capsys, monkeypatch):
    def denied(path: Path, chunk: int = 0) -> str:  # what a file of mode 0 gives a user who is not root
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(verify_module, "file_digest", denied)
    status, err = verify(capsys, index)
    assert status == 1 and "shard-00000 cannot be read" in err and "Permission denied" in err and "Traceback" not in err


def test_k_past_the_command_line_bound_is_bad_input_with_the_flag_named(index, capsys):
    status, out, err = answer(capsys, index, "--k", 20, "--max-k", 10)
    assert status == 2 and out == "" and err.count("\n") == 1
    assert "k must be a whole number from 1 to 10 (reader.answer's --max-k), got 20" in err
    assert answer(capsys, index, "--k", 10, "--max-k", 10)[0] == 0


@pytest.mark.parametrize("question", ["\x00\x00\x00", "\x01\x07\x1b\x7f", "\u200b\u2028 \t"])
def test_a_question_of_control_characters_only_is_empty(index, capsys, question):
    status = answer_main([question, "--index", str(index)])
    out, err = capsys.readouterr()
    assert status == 2 and out == "" and err == "error: the question is empty\n"
