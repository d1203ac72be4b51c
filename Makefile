# One source of truth for the torch pin: pyproject.toml.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := $(shell grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')

.PHONY: install test bench demo clean data train evaluate loadtest browser

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

clean:
	rm -rf $(VENV) .pytest_cache

# Generated QA pairs from the bundled sample (deterministic), split by article.
data: install
	$(BIN)/python -m flows.qa_data --out data/qa

# The three training stages, the default checkpoint (fp16, reader/checkpoint), the baseline
# trained on as long as the btr reader (control: 150 + 1,800 steps against 150 + 1,200 + 600) and
# the two ablations. About five and a half hours on a 2-core CPU; a rerun resumes.
TRAIN = $(BIN)/python -m flows.train_reader --split-layer 3 --steps 150 --split-steps 1200 --bits-steps 600
train: data
	$(TRAIN) --export reader/checkpoint --control-steps 1800
	$(TRAIN) --no-recovery
	$(TRAIN) --no-distill

# The accuracy table of the README (results/accuracy.json).
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
