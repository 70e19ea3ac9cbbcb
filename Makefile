# The two set-up commands of the README:
#   make train   installs the trainer and runs the embedded default RLSD training to the end
#   make test    installs the test dependencies and runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= trainer/src/rlsd_trainer/configs/embedded.yaml

.PHONY: train test lint k8s-assets bench-learning bench-cost bench-memory bench-peer clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.trainer-installed: $(BIN)/python trainer/pyproject.toml
	$(BIN)/pip install -e 'trainer[test]'
	touch $@

$(VENV)/.operator-installed: $(BIN)/python operator/pyproject.toml
	$(BIN)/pip install -e 'operator[test]'
	touch $@

# The real control plane for tests/k8s (kube-apiserver, etcd, scheduler, controller-manager, kwok),
# built from the Go module proxy into a cache; a no-op once built (see tests/k8s/README.md).
k8s-assets:
	nice -n 19 tests/k8s/build-control-plane.sh

train: $(VENV)/.trainer-installed
	$(BIN)/rlsd-trainer local --config $(CONFIG)

lint: $(VENV)/.trainer-installed $(VENV)/.operator-installed
	$(BIN)/ruff check trainer operator tests benchmarks
	$(BIN)/ruff format --check trainer operator tests benchmarks

test: lint k8s-assets
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
