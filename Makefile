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

# The default reader (reader/checkpoint): the three training stages with the reader heads (question-word
# match, passage relevance), warm-started from the previous default (taken from git history: itself 800 +
# 1,000 + 400 steps from all-MiniLM-L6-v2, see the model card), and the control trained as long as the
# split and bits stages (120 + 180 unsplit steps against 120 + 120 + 60); then the answer rule chosen
# on held-out dev (written into each stage's btr.json), and the export (fp16, with the rule) into
# reader/checkpoint. About 25 minutes on a 2-core CPU with nothing else running; a rerun resumes.
PREVIOUS_DEFAULT := 80e1b07
checkpoints/previous-default/btr.json:
	mkdir -p checkpoints/previous-default
	for f in model.safetensors config.json tokenizer.json tokenizer_config.json btr.json; do \
		git show $(PREVIOUS_DEFAULT):reader/checkpoint/$$f > checkpoints/previous-default/$$f; done
train: data checkpoints/previous-default/btr.json
	$(BIN)/python -m flows.train_reader --base checkpoints/previous-default --out checkpoints/warm --split-layer 3 \
		--steps 120 --split-steps 120 --bits-steps 60 --control-steps 180 --max-passage-tokens 128
	$(BIN)/python -c 'from pathlib import Path; from flows.evaluate_reader import eval_index, corpus_passages; \
		eval_index(Path("checkpoints/warm/plain+split+bits"), corpus_passages(None), Path("indexes"), Path("data/qa/retriever"), None)'
	$(BIN)/python -m flows.tune_answer --index $$(ls -d indexes/eval-warm-plain+split+bits-* | head -1) \
		--relevance 0,0.5,1,2,4 --retrieval 0,5,10,20,40 --out results/answer-rule-dev.json --write
	$(BIN)/python -m flows.train_reader --base checkpoints/previous-default --out checkpoints/warm --split-layer 3 \
		--steps 120 --split-steps 120 --bits-steps 60 --max-passage-tokens 128 --export reader/checkpoint

# The accuracy table (docs/accuracy.md, results/real-questions.json): stage 1 / control / split / btr
# on NQ-open and TriviaQA test questions with the answer in the sample (needs `make train`'s checkpoints).
evaluate: install
	$(BIN)/python -m flows.evaluate_reader --checkpoints checkpoints/warm --sets nq-test-in-sample,trivia-test-in-sample

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
