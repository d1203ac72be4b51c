# One source of truth for the torch pin: pyproject.toml.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := $(shell grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')

.PHONY: install test bench demo clean

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

# Local Prefect server + worker + Ray, the index-wikipedia deployment on the bundled sample, an answer.
demo: install
	$(BIN)/python -m flows.demo
