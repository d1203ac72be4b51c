# One source of truth for the torch pin: pyproject.toml.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := $(shell grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')

.PHONY: install test bench demo services stop clean data train evaluate loadtest browser

install: $(STAMP)

# The pinned CPU torch goes in first: installed any other way, pip pulls several GB of CUDA wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python -m reader.bench --json
	$(BIN)/python -m storage.bench --json
	$(BIN)/python -m workers.bench --json
	$(BIN)/python -m pytest -m bench tests/test_cluster.py

clean:
	rm -rf $(VENV) .pytest_cache

# Human-written questions (NQ-open, TriviaQA, SQuAD from the pyserini wheel, sha256-checked, with a
# data card), distant supervision over the bundled sample, and the generated QA pairs. Deterministic.
data: install
	$(BIN)/python -m flows.qa_data --out data/qa

# The three training stages on real-train.jsonl, the default checkpoint (fp16, reader/checkpoint),
# the baseline trained on as long as the btr reader (control: 800 + 1,400 steps against
# 800 + 1,000 + 400) and the two ablations. About two and a half hours on a 2-core CPU; a rerun resumes.
# bf16 autocast only where the CPU computes in bf16 (AVX-512 BF16 or AMX): elsewhere it is emulated
# and a step takes 2.5x as long as in fp32 (10 s against 4 s on 2 cores). A GPU trains in bf16 anyway.
BF16 := $(shell grep -qsE 'avx512_bf16|amx_bf16' /proc/cpuinfo && echo --bf16)
TRAIN = $(BIN)/python -m flows.train_reader --out checkpoints/real --split-layer 3 --steps 800 \
	--split-steps 1000 --bits-steps 400 --max-passage-tokens 128 $(BF16)
train: data
	$(TRAIN) --export reader/checkpoint --control-steps 1400
	$(TRAIN) --no-recovery
	$(TRAIN) --no-distill

# The accuracy table of docs/accuracy.md (results/real-questions.json): control / split / btr / ablations
# on NQ-open and TriviaQA test questions (needs `make train`'s checkpoints).
evaluate: install
	$(BIN)/python -m flows.evaluate_reader

# QPS and latency of reader.serve at 1, 4 and 16 clients, batched and one at a time (needs `make demo`'s index).
loadtest: data
	$(BIN)/python -m reader.loadtest --questions data/qa/dev.jsonl

# Headless Chromium from Debian's packages (root): tests/test_serve_page.py drives reader.serve's page
# with it, and skips, saying so, without it.
browser:
	apt-get install -y chromium

# Local Prefect server + worker + Ray, the index-wikipedia deployment on the bundled sample, an answer.
demo: install
	$(BIN)/python -m flows.demo

# The same local stack as make demo, left up: a Prefect server on 127.0.0.1:$(PORT), the btr-local
# process work pool, the deployments of prefect.yaml and a worker. `make stop` stops them.
PORT ?= 4200
services: install
	$(BIN)/python -m flows.services start --port $(PORT)

stop:
	$(BIN)/python -m flows.services stop
