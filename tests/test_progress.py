"""The run's progress record: counts, speeds and time left from finished shards and workers' reports,
and what a person sees of it in a terminal or a log."""

from __future__ import annotations

import io
import json
import time

import pytest

from flows.progress import Printer, RunProgress, follow, main, markdown_table, status_line
from workers.progress import WORKER_FOLDER, ShardProgress, in_flight


def finished(shard_id: int, passages: int, tokens: int, skipped: bool = False) -> dict:
    return {
        "shard": {"name": f"shard-{shard_id:06d}", "first_row": shard_id * 100, "bytes": 1_000_000},
        "passages": passages, "tokens": tokens, "seconds": 0.0 if skipped else 10.0, "skipped": skipped,
        "passages_per_s": None if skipped else passages / 10, "tokens_per_s": None if skipped else tokens / 10,
        "worker": "btr-index-worker-0", "attempts": 1,
    }


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_counts_speeds_and_time_left_come_from_finished_shards_and_workers_reports(tmp_path):
    progress = RunProgress.start(tmp_path / "progress.json", "idx", passages=400, shards=4)
    progress.phase("indexing shards")
    began = time.time() - 10.0  # ten seconds of indexing so far
    shards = [finished(0, 100, 5000, skipped=True), finished(1, 100, 6000)]
    progress.shards(shards, [{"shard_id": 2, "done": 50, "tokens": 3000}], began)
    record = json.loads((tmp_path / "progress.json").read_text())
    assert record["shards_done"] == 2 and record["shards_resumed"] == 1
    assert record["passages_done"] == 250  # resumed ones count as done ...
    assert record["tokens_done"] == 9000  # ... but not as work done now
    assert record["passages_per_s"] == pytest.approx(15.0, rel=0.05)  # 150 passages in ~10 s
    assert record["eta_s"] == pytest.approx(10.0, rel=0.05)  # 150 left at that rate
    assert [s["shard"] for s in record["shards"]] == ["shard-000000", "shard-000001"]
    assert "shards 2/4, passages 250/400" in status_line(record)
    progress.finish()
    done = json.loads((tmp_path / "progress.json").read_text())
    assert done["phase"] == "done" and done["eta_s"] == 0 and "indexing shards" in done["phases"]
    assert "| shard-000001 | 100 | 6,000 |" in markdown_table(done)


def test_a_worker_writes_its_shard_report_now_and_then_and_at_the_end(tmp_path):
    report = ShardProgress(tmp_path, shard_id=3, rows=64, interval=3600)
    report.add(32, 900)  # the first write is at once
    report.add(16, 400)  # within the interval: not written
    path = tmp_path / WORKER_FOLDER / "shard-000003.json"
    assert json.loads(path.read_text())["done"] == 32
    report.add(16, 500)  # the shard's last rows: written whatever the interval
    assert json.loads(path.read_text())["tokens"] == 1800
    assert in_flight(tmp_path, finished=set())[0]["done"] == 64
    assert in_flight(tmp_path, finished={3}) == []


def test_off_a_terminal_a_line_per_change_on_a_terminal_one_line_rewritten(tmp_path):
    record = {"phase": "indexing shards", "started": time.time(), "shards_done": 0, "shards_total": 3,
              "passages_done": 10, "passages_total": 300, "passages_per_s": 5.0, "tokens_per_s": 400.0,
              "eta_s": 58.0, "ray_dashboard": "http://127.0.0.1:8265"}
    log = io.StringIO()
    printer = Printer(log, every=3600)
    printer.show(record)
    printer.show(record)  # nothing new: no new line
    printer.show(record | {"shards_done": 1, "passages_done": 100})
    lines = log.getvalue().splitlines()
    assert lines[0] == "    Ray dashboard: http://127.0.0.1:8265"
    assert len(lines) == 3 and "shards 1/3" in lines[2] and "about 58s left" in lines[2]
    terminal = _Tty()
    printer = Printer(terminal)
    printer.show(record)
    printer.show(record | {"shards_done": 1})
    printer.close()
    assert terminal.getvalue().count("\r") == 2 and terminal.getvalue().endswith("\n")


def test_on_a_narrow_terminal_the_line_is_cut_to_its_width_so_that_it_is_rewritten_in_place(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    record = {"phase": "indexing shards", "started": time.time(), "shards_done": 0, "shards_total": 3,
              "passages_done": 10, "passages_total": 300, "passages_per_s": 5.0, "tokens_per_s": 400.0, "eta_s": 58.0}
    terminal = _Tty()
    printer = Printer(terminal)
    printer.show(record)
    printer.show(record | {"shards_done": 1})
    assert all(len(row) < 40 for row in terminal.getvalue().split("\r")) and "shards 1/3" in terminal.getvalue()


def test_follow_stops_at_a_final_phase_and_main_says_when_there_is_no_run(tmp_path, capsys):
    path = tmp_path / "idx" / ".work" / "progress.json"
    progress = RunProgress.start(path, "idx", passages=1, shards=1)
    progress.finish("failed")
    assert follow(path, printer=Printer(io.StringIO()))["phase"] == "failed"
    assert main([str(tmp_path / "idx")]) == 1  # a failed run
    assert main([str(tmp_path / "elsewhere")]) == 2
    assert "no run in progress" in capsys.readouterr().err


def test_a_finished_run_shows_how_long_it_took_not_the_time_since_it_began(tmp_path, capsys):
    path = tmp_path / "idx" / ".work" / "progress.json"
    progress = RunProgress.start(path, "idx", passages=1, shards=1)
    progress.finish()
    record = json.loads(path.read_text())
    hours_ago = 2 * 3600
    record |= {"started": record["started"] - hours_ago - 350, "updated": record["updated"] - hours_ago, "seconds": 350.0,
               "ray_dashboard": "http://127.0.0.1:8265"}
    path.write_text(json.dumps(record))
    assert status_line(record) == "[5m50s] done"
    assert main([str(tmp_path / "idx")]) == 0
    out = capsys.readouterr().out
    assert "flow run took 5m50s" in out and "[5m50s] done" in out and "125m" not in out
    assert "start-up" in out  # says why the command that ran it took longer (the flow's own time is what it keeps)
    assert "8265" not in out  # the run's Ray dashboard is gone with it: no stale URL
