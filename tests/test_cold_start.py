"""Cold start: every command's --help answers without importing torch, and a question imports only its reader family.

Each command runs as ``python -m`` runs it (``runpy``, as ``__main__``) in a fresh interpreter, which
then writes the names in ``sys.modules``: every module the command imported, however it imported it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reader.assets import wikipedia_sample

HEAVY = ("torch", "transformers", "faiss", "prefect")
COMMANDS = ["reader.answer", "reader.serve", "reader.evaluate", "flows.index_wikipedia", "bench.reader"]
RUN = """
import json, runpy, sys
out, module, sys.argv = sys.argv[1], sys.argv[2], sys.argv[2:]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit as end:
    status = end.code
else:
    status = 0
open(out, "w").write(json.dumps({"status": status, "modules": sorted(sys.modules)}))
"""


def imported(tmp_path, *argv: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, int, set[str]]:
    """Run ``python -m ARGV`` in a fresh interpreter: the process, the command's exit status, the modules it imported."""
    out = tmp_path / "modules.json"
    process = subprocess.run([sys.executable, "-c", RUN, str(out), *argv], capture_output=True, text=True, timeout=timeout)
    assert out.exists(), process.stderr[-2000:]
    result = json.loads(out.read_text())
    return process, result["status"], set(result["modules"])


@pytest.mark.parametrize("command", COMMANDS)
def test_help_imports_no_model_library(command, tmp_path):
    process, status, modules = imported(tmp_path, command, "--help")
    assert status == 0 and "usage:" in process.stdout
    assert command in modules or "__main__" in modules
    assert not {name for name in modules if name.split(".")[0] in HEAVY}


def test_a_bad_flag_is_refused_before_any_model_library(tmp_path):
    process, status, modules = imported(tmp_path, "reader.answer", "who?", "--device", "gpu")
    assert status == 2 and "--device: expected auto, cpu, cuda or cuda:N, got 'gpu'" in process.stderr
    assert "torch" not in modules


def test_answer_main_help_in_process_leaves_torch_unimported():
    code = ("import sys\nfrom reader.answer import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'reader.query' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.splitlines()[-1].split() == ["False", "False"]


def test_an_extractive_question_does_not_import_the_t5_family(tmp_path, tmp_path_factory, answering_index):
    index = answering_index(tmp_path_factory.mktemp("cold") / "index", wikipedia_sample(20, min_words=30))
    process, status, modules = imported(tmp_path, "reader.answer", "Who wrote Hamlet?", "--index", str(index), "--k", "2", "--json")
    assert status == 0, process.stderr[-2000:]
    assert '"answer"' in process.stdout
    assert "reader.extractive" in modules and "reader.query" in modules
    assert "reader.fid" not in modules and not any(name.startswith("transformers.models.t5") for name in modules)
    # a BERT reader and question encoder on disk are read without transformers at all (reader.bert): seconds of imports
    assert "reader.bert" in modules and not {name for name in modules if name.split(".")[0] == "transformers"}


def test_every_console_script_answers_help_without_a_model_library():
    """The commands ``pip install`` gives (pyproject's [project.scripts]), each called as its script calls it."""
    import tomllib
    from pathlib import Path

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"btr-answer", "btr-serve", "btr-evaluate", "btr-index"} <= set(scripts)
    for name, target in scripts.items():
        module, function = target.split(":")
        code = (f"import sys\nsys.argv = [{name!r}, '--help']\nfrom {module} import {function}\ntry:\n    {function}()\n"
                "except SystemExit as end:\n    assert end.code == 0, end.code\n"
                f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "usage:" in out.stdout, (name, out.stderr[-1000:])
        assert out.stdout.splitlines()[-1] == "[]", (name, out.stdout.splitlines()[-1])
