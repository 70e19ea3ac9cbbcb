# The two set-up commands of the README:
#   make train   installs the trainer and runs the embedded default RLSD training to the end
#   make test    installs the test dependencies and runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= trainer/src/rlsd_trainer/configs/embedded.yaml

.PHONY: train test test-vllm vllm-venv-start lint k8s-assets chart-tools kueue node images test-tools bench-learning bench-learning-async bench-cost bench-memory bench-peer bench-packing bench-weight-sync \
	bench-checkpoint bench-scaling bench-rollout bench-async bench-gpu bench-operator stress-multirank stress-suite clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# What the trainer and the operator agree on (config schema, exit codes, ports): both depend on it.
$(VENV)/.contracts-installed: $(BIN)/python trainer/contracts/pyproject.toml
	$(BIN)/pip install -e trainer/contracts
	touch $@

$(VENV)/.trainer-installed: $(VENV)/.contracts-installed trainer/pyproject.toml
	$(BIN)/pip install -e 'trainer[test]'
	touch $@

$(VENV)/.operator-installed: $(VENV)/.contracts-installed operator/pyproject.toml
	$(BIN)/pip install -e 'operator[test]'
	touch $@

$(VENV)/.chart-installed: $(BIN)/python tests/chart/requirements.txt
	$(BIN)/pip install -r tests/chart/requirements.txt
	touch $@

# The real control plane for tests/k8s (kube-apiserver, etcd, scheduler, controller-manager, kwok),
# built from the Go module proxy into a cache; a no-op once built (see tests/k8s/README.md).
k8s-assets:
	nice -n 19 tests/k8s/build-control-plane.sh

# helm, promtool, the Prometheus server and the prometheus-operator CRDs for tests/chart, built the same
# way and cached (a cold build takes about 20 min on 2 cores; a no-op once built).
chart-tools:
	nice -n 19 tests/k8s/build-chart-tools.sh

# The Kueue manager, its CRDs and webhooks for the queueing tests (tests/operator/test_kueue.py),
# built the same way and cached (about 8 minutes cold on 2 cores; a no-op once built). After the
# control plane, whose k8s.io packages of the same versions it can take from the Go build cache.
kueue: | k8s-assets
	nice -n 19 tests/k8s/build-kueue.sh

# The real node of tests/e2e: kubelet and kube-proxy (from the control plane's module, after it, whose
# packages they share in the Go build cache), CoreDNS, the pause binary, and containerd, runc, the CNI
# plugins and iptables from Debian's packages (tests/k8s/build-node.sh; a no-op once built).
node: | k8s-assets
	nice -n 19 tests/k8s/build-node.sh

# The images tests/e2e runs, built from the Dockerfile with buildah (operator, trainer-cpu; a local
# debootstrap base and the wheels from PyPI, cached; tests/k8s/build-images.sh; a no-op once built).
images:
	nice -n 19 tests/k8s/build-images.sh

# Every tool and image of the test bed, side by side (module downloads, single-threaded links and the
# images' I/O overlap the other builds' compiles).
test-tools:
	@$(MAKE) --no-print-directory -j3 k8s-assets chart-tools images kueue node

# The environment of the vLLM conformance suite (tests/conformance/build-vllm-venv.sh): the vLLM of
# trainer/requirements-vllm.txt with its torch and transformers, plus the trainer and the operator,
# cached in ~/.cache/rlsd/vllm (about 5 minutes cold, mostly downloads; a no-op afterwards). `make
# test` starts it first, in the background, so it overlaps the Go builds; `test-vllm` then waits for
# it (the script holds a lock) and would rebuild it, showing the error, had it failed.
VLLM_BUILD_LOG := build/vllm-venv.log

vllm-venv-start:
	@mkdir -p build
	@echo "building the vLLM environment in the background (log: $(VLLM_BUILD_LOG))"
	@nice -n 10 tests/conformance/build-vllm-venv.sh >/dev/null 2>$(VLLM_BUILD_LOG) &

# Run under the vLLM environment (the main .venv never holds vLLM): the conformance suite, which runs
# vLLM's own request/response models, RL routers and CLI parser against our client, servers and
# operator, and the trainer's fast tests under the torch and transformers the GPU image gets from
# vLLM's pins (unit tests, the multi-process server tests and the sharding test; the end-to-end runs
# of test_local_run and test_distributed stay in the main suite only, as they take minutes).
VLLM_TRAINER_TESTS := tests/trainer/test_algorithms.py tests/trainer/test_loss_gradients.py \
	tests/trainer/test_config.py tests/trainer/test_data.py tests/trainer/test_rollout.py \
	tests/trainer/test_metrics.py tests/trainer/test_checkpoint.py tests/trainer/test_verifiers.py \
	tests/trainer/test_servers.py tests/trainer/test_sharding.py tests/trainer/test_loss.py

test-vllm:
	@venv=$$(tests/conformance/build-vllm-venv.sh) && \
	PYTHONPATH=$(CURDIR)/trainer/contracts/src:$(CURDIR)/trainer/src:$(CURDIR)/operator/src $$venv/bin/python -m pytest -q -p no:cacheprovider \
		--confcutdir=tests/conformance tests/conformance $(VLLM_TRAINER_TESTS)

train: $(VENV)/.trainer-installed
	$(BIN)/rlsd-trainer local --config $(CONFIG)

lint: $(VENV)/.trainer-installed $(VENV)/.operator-installed
	$(BIN)/ruff check trainer operator tests benchmarks charts
	$(BIN)/ruff format --check trainer operator tests benchmarks charts

test: vllm-venv-start lint test-tools $(VENV)/.chart-installed
	$(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory test-vllm

# The learning study: rlsd, grpo, opsd, grpo+opsd x 8 paired seeds on the embedded task and its
# two-digit variant, two one-thread runs at a time (under an hour on 2 cores).
bench-learning: $(VENV)/.trainer-installed
	$(BIN)/python benchmarks/learning.py

# Learning parity of asynchronous RL: the embedded default on-policy and one step off-policy.
bench-learning-async: $(VENV)/.trainer-installed
	$(BIN)/python benchmarks/learning.py --tasks embedded --seeds 0 1 2 --steps 50 --algorithms rlsd \
		--max-staleness 0 1 --name learning_async

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

# Learner pinned to core 0, rollout + teacher servers to core 1: rollout.max_staleness 0 / 1 / 2.
bench-async: $(VENV)/.trainer-installed
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/async_rl.py

# On a GPU machine (torchrun over all GPUs); `$(BIN)/python benchmarks/gpu_learner.py --tiny` on CPU.
bench-gpu: $(VENV)/.trainer-installed
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/gpu_learner.py

# The operator's reaction times (apply -> pods, preemption -> next attempt) on the real control plane
# of tests/k8s with kwok GPU nodes; `rlsd-operator` runs as a subprocess. The PNG needs matplotlib.
bench-operator: $(VENV)/.operator-installed k8s-assets
	$(BIN)/python benchmarks/operator_latency.py

# The tests' multi-rank jobs (FSDP sharding; checkpoint save on 2 ranks, resume on 1 and 3; the learner
# to the end, preempted and with a bad config, at rollout.max_staleness 0 and 1) ROUNDS times each while
# LOAD cores are kept busy, counting every run's and every rank's exit code: aborts at exit, unexpected
# codes (benchmarks/stress_multirank.py; a table, and benchmarks/results/stress_multirank.json).
# STRESS_ARGS adds options, e.g. --cores (gdb backtraces of aborting ranks) or --scenarios exit-race.
ROUNDS ?= 6
LOAD ?= 1
STRESS_ARGS ?=
stress-multirank: $(VENV)/.trainer-installed
	nice -n 10 $(BIN)/python benchmarks/stress_multirank.py --rounds $(ROUNDS) --load $(LOAD) $(STRESS_ARGS)

# The whole test suite as CI runs it (.ci/run, on a clean clone of HEAD's committed work), RUNS times
# in a row while LOAD cores are kept busy; stops at the first red run (benchmarks/stress_suite.py; a
# table, logs under runs/stress-suite, benchmarks/results/stress_suite.json). About 40 min a run.
RUNS ?= 3
stress-suite: $(VENV)/.trainer-installed
	$(BIN)/python benchmarks/stress_suite.py --runs $(RUNS) --load $(LOAD)

clean:
	rm -rf $(VENV) runs
