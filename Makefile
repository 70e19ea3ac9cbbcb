# The two set-up commands of the README:
#   make train   installs the trainer and runs the embedded default RLSD training to the end
#   make test    installs the test dependencies and runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= trainer/src/rlsd_trainer/configs/embedded.yaml

.PHONY: train test lint bench-learning bench-cost bench-memory bench-peer clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.trainer-installed: $(BIN)/python trainer/pyproject.toml
	$(BIN)/pip install -e 'trainer[test]'
	touch $@

train: $(VENV)/.trainer-installed
	$(BIN)/rlsd-trainer local --config $(CONFIG)

lint: $(VENV)/.trainer-installed
	$(BIN)/ruff check trainer tests benchmarks
	$(BIN)/ruff format --check trainer tests benchmarks

test: lint
	$(BIN)/python -m pytest -q

bench-learning: $(VENV)/.trainer-installed
	$(BIN)/python benchmarks/learning.py

bench-cost: $(VENV)/.trainer-installed
	$(BIN)/python benchmarks/cost.py

bench-memory: $(VENV)/.trainer-installed
	$(BIN)/python benchmarks/logprob_memory.py

bench-peer: $(VENV)/.trainer-installed
	benchmarks/peer_trl.sh

clean:
	rm -rf $(VENV) runs
