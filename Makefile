# The two set-up commands of the README:
#   make train   installs the trainer and runs the embedded default RLSD training to the end
#   make test    installs the test dependencies and runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= trainer/src/rlsd_trainer/configs/embedded.yaml

.PHONY: train test lint k8s-assets chart-tools bench-learning bench-cost bench-memory bench-peer bench-packing bench-weight-sync \
	bench-checkpoint bench-scaling bench-rollout bench-gpu bench-operator clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.trainer-installed: $(BIN)/python trainer/pyproject.toml
	$(BIN)/pip install -e 'trainer[test]'
	touch $@

$(VENV)/.operator-installed: $(BIN)/python operator/pyproject.toml
	$(BIN)/pip install -e 'operator[test]'
	touch $@

$(VENV)/.chart-installed: $(BIN)/python tests/chart/requirements.txt
	$(BIN)/pip install -r tests/chart/requirements.txt
	touch $@

# The real control plane for tests/k8s (kube-apiserver, etcd, scheduler, controller-manager, kwok),
# built from the Go module proxy into a cache; a no-op once built (see tests/k8s/README.md).
k8s-assets:
	nice -n 19 tests/k8s/build-control-plane.sh

# helm, promtool and the prometheus-operator CRDs for tests/chart, built the same way and cached (a
# cold build takes about 17 min on 2 cores; a no-op once built).
chart-tools:
	nice -n 19 tests/k8s/build-chart-tools.sh

train: $(VENV)/.trainer-installed
	$(BIN)/rlsd-trainer local --config $(CONFIG)

lint: $(VENV)/.trainer-installed $(VENV)/.operator-installed
	$(BIN)/ruff check trainer operator tests benchmarks charts
	$(BIN)/ruff format --check trainer operator tests benchmarks charts

test: lint k8s-assets chart-tools $(VENV)/.chart-installed
	$(BIN)/python -m pytest -q

bench-learning: $(VENV)/.trainer-installed
	$(BIN)/python benchmarks/learning.py

bench-cost: $(VENV)/.trainer-installed
	$(BIN)/python benchmarks/cost.py

bench-memory: $(VENV)/.trainer-installed
	$(BIN)/python benchmarks/logprob_memory.py

bench-peer: $(VENV)/.trainer-installed
	benchmarks/peer_trl.sh

bench-packing: $(VENV)/.trainer-installed
	$(BIN)/python benchmarks/packing.py

# The distributed trainer's benchmarks (each sets the threads of every process it starts).
bench-weight-sync: $(VENV)/.trainer-installed
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/weight_sync.py

bench-checkpoint: $(VENV)/.trainer-installed
	OMP_NUM_THREADS=2 $(BIN)/python benchmarks/checkpoint_io.py

bench-scaling: $(VENV)/.trainer-installed
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/learner_scaling.py

bench-rollout: $(VENV)/.trainer-installed
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/rollout_throughput.py

# On a GPU machine (torchrun over all GPUs); `$(BIN)/python benchmarks/gpu_learner.py --tiny` on CPU.
bench-gpu: $(VENV)/.trainer-installed
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/gpu_learner.py

# The operator's reaction times (apply -> pods, preemption -> next attempt) on the real control plane
# of tests/k8s with kwok GPU nodes; `rlsd-operator` runs as a subprocess. The PNG needs matplotlib.
bench-operator: $(VENV)/.operator-installed k8s-assets
	$(BIN)/python benchmarks/operator_latency.py

clean:
	rm -rf $(VENV) runs
