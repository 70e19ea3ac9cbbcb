# syntax=docker/dockerfile:1.7
# The images of RLSD, one target each:
#
#   docker build --target operator    -t rlsd/operator:0.1.0 .   # the kopf operator (slim, non-root)
#   docker build --target trainer     -t rlsd/trainer:gpu .      # learners + vLLM rollout (CUDA, torch, vLLM)
#   docker build --target trainer-cpu -t rlsd/trainer:cpu .      # learners + CPU rollout/teacher servers
#
# Bases are pinned by version (pass --build-arg PYTHON_IMAGE=...@sha256:... to pin by digest).
# Nothing secret is built in: a Hugging Face token reaches the pods from a Secret (RLSDRun
# spec.huggingFaceTokenSecret), never from the image. pip keeps its downloads in a build cache
# (`RUN --mount=type=cache`), not in the images.
#
# Build arguments for builders without Docker Hub or the PyTorch index: PYTHON_IMAGE (any Debian-like
# image with python, python -m venv and pip; tests/k8s/build-images.sh makes one with debootstrap) and
# TORCH_INDEX_URL (default: PyTorch's CPU wheels; PyPI's torch works too, with CUDA libraries on board).

ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG VERSION=0.1.0

# ---- operator ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS operator-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY trainer/contracts/pyproject.toml trainer/contracts/
COPY trainer/contracts/src trainer/contracts/src
COPY operator/pyproject.toml operator/
COPY operator/src operator/src
# rlsd-contracts (what the operator and the trainer agree on) is not on PyPI: installed from here.
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv /opt/venv && /opt/venv/bin/pip install ./trainer/contracts ./operator

FROM ${PYTHON_IMAGE} AS operator
ARG VERSION
LABEL org.opencontainers.image.title="rlsd-operator" \
      org.opencontainers.image.description="Kubernetes operator for RLSD training runs (RLSDRun)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://rlsd.io"
COPY --from=operator-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# The chart runs it with a read-only root filesystem as this user (values: podSecurityContext).
USER 65532:65532
EXPOSE 9090 8080
ENTRYPOINT ["rlsd-operator"]
CMD ["--metrics-port", "9090", "--liveness-port", "8080"]

# ---- trainer, CPU -------------------------------------------------------------------------------------
# One stage (nothing is compiled), torch in a layer of its own below the trainer's: a new trainer
# version rebuilds, pushes and pulls only the layers above it.
FROM ${PYTHON_IMAGE} AS trainer-cpu
ARG VERSION
ARG TORCH_VERSION=2.15.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
LABEL org.opencontainers.image.title="rlsd-trainer-cpu" \
      org.opencontainers.image.description="RLSD trainer on CPU: learners and CPU rollout/teacher servers" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://rlsd.io"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HF_HOME=/tmp/hf-home
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv /opt/venv \
 && /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY trainer/contracts/pyproject.toml trainer/contracts/
COPY trainer/contracts/src trainer/contracts/src
COPY trainer/pyproject.toml trainer/
COPY trainer/src trainer/src
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install ./trainer/contracts "./trainer[trackers]" \
 && useradd --uid 1000 --create-home rlsd
USER 1000:1000
WORKDIR /home/rlsd
# The operator sets each pod's command (rlsd-trainer learner | serve rollout | serve teacher).
ENTRYPOINT ["rlsd-trainer"]
CMD ["--help"]

# ---- trainer, GPU (CUDA, torch, vLLM) -----------------------------------------------------------------
FROM ${CUDA_IMAGE} AS trainer-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# The distribution's packages follow the pinned base image (their versions change with its updates).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY trainer/contracts/pyproject.toml trainer/contracts/
COPY trainer/contracts/src trainer/contracts/src
COPY trainer/pyproject.toml trainer/requirements-vllm.txt trainer/
COPY trainer/src trainer/src
# The project's one vLLM pin (trainer/requirements-vllm.txt; tests/conformance runs that version's
# code). vLLM pins the torch and transformers it was built against; the trainer accepts them, and
# `make test` runs the trainer's fast tests under them.
RUN --mount=type=cache,target=/root/.cache/pip \
    python3.12 -m venv /opt/venv \
 && /opt/venv/bin/pip install -r trainer/requirements-vllm.txt \
 && /opt/venv/bin/pip install ./trainer/contracts "./trainer[trackers]"

FROM ${CUDA_IMAGE} AS trainer
ARG VERSION
LABEL org.opencontainers.image.title="rlsd-trainer" \
      org.opencontainers.image.description="RLSD trainer on GPUs: torchrun learners (FSDP2) and vLLM rollout servers" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://rlsd.io"
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 libpython3.12 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 1000 --create-home rlsd
COPY --from=trainer-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HF_HOME=/tmp/hf-home
USER 1000:1000
WORKDIR /home/rlsd
ENTRYPOINT ["rlsd-trainer"]
CMD ["--help"]
