"""`python -m flows.index_wikipedia` run directly, as its docstring says: one Prefect API for the
whole run (the driver's temporary server; Ray's workers report to it), every shard's task run and
log lines recorded under the flow run, nothing sent out, and the run's figures in the index folder."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from flows.progress import RUN_FILE
from reader.config import BTRConfig
from workers.quiet import QUIET_ENV

ROOT = Path(__file__).resolve().parent.parent
PASSAGES, SHARD_SIZE = 30, 10


@pytest.fixture(scope="module")
def direct_run(tmp_path_factory, make_extractive_module, write_flow_inputs):
    """One direct run of the flow in a fresh process, with a Prefect home of its own and no API URL."""
    reader = make_extractive_module(BTRConfig(split_layer=2, max_passage_tokens=64), hidden_size=32)
    root = write_flow_inputs(tmp_path_factory.mktemp("direct"), reader, PASSAGES)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in QUIET_ENV}
    env |= {"PREFECT_HOME": str(root / "prefect-home"), "PYTHONPATH": str(ROOT)}
    index = root / "index"
    done = subprocess.run(
        [sys.executable, "-m", "flows.index_wikipedia", "--index", str(index), "--corpus", str(root / "corpus.jsonl"),
         "--corpus-format", "jsonl", "--shard-size", str(SHARD_SIZE), "--reader-checkpoint", str(root / "reader"),
         "--retriever", str(root / "reader"), "--split-layer", "2", "--max-passage-tokens", "64",
         "--codec-sample", str(PASSAGES), "--offline-merge", "0"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    output = done.stderr + done.stdout  # the order a terminal shows: the logs, then the command's last line
    assert done.returncode == 0, output[-3000:]
    return index, output, root / "prefect-home" / "prefect.db"


def test_one_prefect_server_and_nothing_lost_or_sent(direct_run):
    _, output, _ = direct_run
    assert output.count("Starting temporary server") == 1, output[-3000:]
    assert "Error logging to API" not in output
    assert "telemetry" not in output.lower()  # Prefect logs each failed attempt to send it


def test_the_terminal_gets_a_line_per_phase_and_the_wall_time_not_the_libraries_chatter(direct_run):
    """Weight-loading bars, Ray's start-up lines, Prefect's engine lines and the console lines of the tasks in
    Ray's processes stay off the terminal (the API keeps them: the test below); the last line is the wall time."""
    _, output, _ = direct_run
    lines = output.strip().splitlines()
    for chatter in ("Loading weights", "Finished in state", "Beginning subflow", "Still processing items",
                    "Token authentication", "Started a local Ray instance", "IndexWorker pid", "prefect.io/docs"):
        assert chatter not in output, chatter
    for phase in ("corpus: 30 passages", "codec: ", "Ray: ", "3/3 shards done", "retriever: ", "index ready at"):
        assert sum(phase in line for line in lines) == 1, (phase, lines)
    assert len(lines) <= 13, lines  # the phases above, 3 shard lines, the server's URL, the flow run's name
    assert lines[-1].startswith("done in ") and "in the flow run" in lines[-1], lines[-1]


def test_every_shard_task_run_and_its_log_lines_are_recorded_under_the_flow_run(direct_run):
    _, _, database = direct_run
    db = sqlite3.connect(database)
    runs = dict(db.execute(
        "SELECT flow.name, flow_run.id FROM flow_run JOIN flow ON flow.id = flow_run.flow_id"
    ).fetchall())
    assert sorted(runs) == ["index-shards", "index-wikipedia"]  # one run, its subflow: no second server's
    tasks = db.execute(
        "SELECT id, state_type, flow_run_id FROM task_run WHERE name LIKE 'index-shard-%'"
    ).fetchall()
    assert len(tasks) == PASSAGES // SHARD_SIZE
    assert {state for _, state, _ in tasks} == {"COMPLETED"}
    assert {flow_run for _, _, flow_run in tasks} == {runs["index-shards"]}
    for task_id, _, _ in tasks:  # logged inside the Ray worker process, received by the driver's API
        messages = [m for (m,) in db.execute("SELECT message FROM log WHERE task_run_id = ?", (task_id,))]
        assert any(m.startswith("shard ") and "tokens/s" in m for m in messages), messages
        assert "Finished in state Completed()" in messages  # the engine's last line, sent just before Ray may stop the process


def test_the_run_leaves_its_figures_per_shard_in_the_index_folder(direct_run):
    index, _, _ = direct_run
    run = json.loads((index / RUN_FILE).read_text())
    assert run["phase"] == "done" and run["eta_s"] == 0
    assert run["shards_done"] == run["shards_total"] == PASSAGES // SHARD_SIZE
    assert run["passages_done"] == PASSAGES
    manifest = json.loads((index / "manifest.json").read_text())
    assert [s["shard"] for s in run["shards"]] == [s["name"] for s in manifest["shards"]]
    assert [s["bytes"] for s in run["shards"]] == [s["bytes"] for s in manifest["shards"]]
    for shard in run["shards"]:
        assert shard["passages"] == SHARD_SIZE and shard["tokens"] > 0 and shard["seconds"] > 0
        assert shard["worker"].startswith("btr-index-worker") and shard["attempts"] == 1
    assert set(run["phases"]) >= {"normalizing the corpus", "fitting the codec", "indexing shards"}
    assert not (index / ".progress").exists()  # the workers' reports are cleared away
