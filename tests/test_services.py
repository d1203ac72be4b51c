"""make services / make stop: what is stopped is what was started, and a busy port is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from flows import services


def _fake_service() -> tuple[subprocess.Popen, int]:
    """A process group like the server's: a leader (named like a prefect command) and a child; and the
    child's pid, which the leader prints once the child runs (a handshake, not a sleep)."""
    script = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "print(child.pid, flush=True); time.sleep(60)")
    process = subprocess.Popen([sys.executable, "-c", script, "prefect"], start_new_session=True, stdout=subprocess.PIPE, text=True)
    return process, int(process.stdout.readline())


def ended(pid: int) -> bool:
    """Gone, or a zombie waiting for init to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_stop_ends_each_process_group_it_started_and_forgets_it(tmp_path, monkeypatch):
    monkeypatch.setattr(services, "STATE", tmp_path / "services.json")
    process, child = _fake_service()
    services.STATE.write_text(json.dumps({"port": 4200, "pids": [process.pid]}))
    assert services.alive(process.pid) and not ended(child)
    assert services.cmd_stop() == 0
    assert process.wait(timeout=30) is not None and not services.STATE.exists()
    deadline = time.monotonic() + 30  # the child got the group's SIGTERM too
    while not ended(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ended(child)
    assert services.cmd_stop() == 0  # nothing left to stop: says so, not an error


def test_a_pid_that_is_not_a_prefect_process_is_left_alone():
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        assert not services.alive(other.pid)  # a reused pid is never killed
        services.stop_pids([other.pid], timeout=0.1)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_start_refuses_a_port_where_a_server_already_answers(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(services, "STATE", tmp_path / "services.json")
    monkeypatch.setattr(services, "healthy", lambda port: True)
    assert services.cmd_start(4200) == 1
    assert "already answers on 127.0.0.1:4200" in capsys.readouterr().err
    assert not services.STATE.exists()
