"""The indexing flow as `make demo` builds its index (offline merge 0.2, prefect.yaml's setting; the
default retriever), run directly in fresh processes: failed by a full disk inside the flow, rerun and
killed mid-merge, rerun again: every file of the index byte for byte that of an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from workers.quiet import QUIET_ENV
from reader.config import BTRConfig

ROOT = Path(__file__).resolve().parent.parent
PASSAGES, SHARD_SIZE = 36, 9  # four shards
# Files that record when and how long, not what: the run's figures (flows.progress) differ run to run.
TIMED = {"run.json", "progress.json"}

# Run in every process of the flow (the driver and Ray's workers inherit PYTHONPATH): with
# BTR_TEST_FULL_DISK=<row>, writing the LMDB block of that first row raises ENOSPC, as a full disk does.
FULL_DISK_HOOK = textwrap.dedent('''
    import errno, importlib.abc, os, sys

    ROW = os.environ.get("BTR_TEST_FULL_DISK")

    class FullKey:
        def __init__(self, key):
            self.key, self.size = key, key.size
        def pack(self, row):
            if row == int(ROW):
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.key.pack(row)

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "storage.shard":
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            run = spec.loader.exec_module
            def exec_module(module):
                run(module)
                module.KEY = FullKey(module.KEY)
            spec.loader.exec_module = exec_module
            return spec

    if ROW:
        import importlib.util
        sys.meta_path.insert(0, Finder())
''')

# The direct command, with the driver SIGKILLing its whole process group (Ray included) once two
# of the four merged shards are rewritten: the merge's scratch folder and the staging stay behind.
KILLED_IN_MERGE = textwrap.dedent('''
    import os, signal, sys
    import workers.offline
    from storage import offline

    real = workers.offline.cluster_runner

    def dying():
        run = real()
        def wrapped(fn, calls, done=None):
            if fn is offline.rewrite_shard:
                run(fn, calls[:2])
                os.killpg(0, signal.SIGKILL)
            return run(fn, calls, done)
        return wrapped

    workers.offline.cluster_runner = dying
    from flows.index_wikipedia import main
    main(sys.argv[1:])
''')


def test_the_demo_deployment_merges_offline_at_a_fifth():
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    indexing = next(d for d in deployments if d["entrypoint"].endswith(":index_wikipedia"))
    assert indexing["parameters"]["offline_merge"] == 0.2  # what the runs below use


@pytest.fixture(scope="module")
def flow(tmp_path_factory, make_extractive_module, write_flow_inputs):
    """``run(script=None, **env)``: the direct command into ``root/index``, in a fresh process group; and ``root``."""
    reader = make_extractive_module(BTRConfig(split_layer=2, max_passage_tokens=64), hidden_size=32)
    root = write_flow_inputs(tmp_path_factory.mktemp("demo-flow"), reader, PASSAGES)
    (root / "hooks").mkdir()
    (root / "hooks" / "sitecustomize.py").write_text(FULL_DISK_HOOK)
    (root / "killed.py").write_text(KILLED_IN_MERGE)
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in QUIET_ENV}
    base |= {"PREFECT_HOME": str(root / "prefect-home"), "PYTHONPATH": f"{root / 'hooks'}{os.pathsep}{ROOT}"}

    def run(script: Path | None = None, **env: str) -> subprocess.CompletedProcess:
        # The default retriever (the packaged MiniLM), as make demo's; one index path for every run,
        # since the index records where its corpus copy lies.
        command = [sys.executable, str(script)] if script else [sys.executable, "-m", "flows.index_wikipedia"]
        command += ["--index", str(root / "index"), "--corpus", str(root / "corpus.jsonl"), "--corpus-format", "jsonl",
                    "--shard-size", str(SHARD_SIZE), "--reader-checkpoint", str(root / "reader"), "--split-layer", "2",
                    "--max-passage-tokens", "64", "--codec-sample", str(PASSAGES), "--offline-merge", "0.2", "--workers", "1"]
        process = subprocess.Popen(command, cwd=root, env=base | env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=600)
        finally:
            try:  # whatever the run left of its own process group (Ray's processes) goes with it
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return subprocess.CompletedProcess(command, process.returncode, output)

    return run, root


def files(index: Path) -> dict[str, str]:
    """sha256 of every file under an index folder, by relative path; the run's timings and the
    manifests' creation times left out (they say when, not what)."""
    out = {}
    for path in sorted(index.rglob("*")):
        if not path.is_file() or path.name in TIMED:
            continue
        data = path.read_bytes()
        if path.name == "manifest.json":
            data = json.dumps({k: v for k, v in json.loads(data).items() if k != "created"}, sort_keys=True).encode()
        out[str(path.relative_to(index))] = hashlib.sha256(data).hexdigest()
    return out


@pytest.mark.bench
def test_a_full_disk_and_a_kill_mid_merge_each_resume_to_every_file_of_an_uninterrupted_run(flow):
    """About five minutes on a shared 2-core machine (four fresh processes, each starting Prefect and Ray): `make bench`."""
    run, root = flow
    index = root / "index"
    done = run()
    assert done.returncode == 0, done.stdout[-3000:]
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["extra"]["offline_merge"]["ratio"] == 0.2 and manifest["extra"]["offline_merge"]["changed_tokens"] > 0
    assert not (index / ".work" / "merge").exists() and not (index / ".work" / "lossless" / "shards").exists()
    expected = files(index)
    assert len([name for name in expected if name.startswith("shards/")]) == 8  # four shards, data and seal each
    index.rename(root / "uninterrupted")

    # A full disk inside the flow: shard 2's write fails (the task's retries too), the flow says why.
    failed = run(BTR_TEST_FULL_DISK=str(2 * SHARD_SIZE))  # shard 2's first block
    assert failed.returncode != 0
    assert "shard-00002: no space left on the device" in failed.stdout and "rerun the flow" in failed.stdout
    assert not (index / "manifest.json").exists()
    assert not list(index.rglob(".tmp-shard-*"))  # its space given back
    sealed = index / ".work" / "lossless" / "shards"
    assert (sealed / "shard-00000").exists() and not (sealed / "shard-00002").exists()

    # Rerun with space, killed (SIGKILL, Ray too) half-way through the merge's rewrite.
    killed = run(root / "killed.py")
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert "resumed from an earlier run" not in killed.stdout
    assert (index / ".work" / "merge" / "plan.json").exists() and not (index / "manifest.json").exists()

    # Run again: it resumes, and every file is the uninterrupted run's.
    resumed = run()
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "(4 resumed from an earlier run" in resumed.stdout
    assert files(index) == expected
