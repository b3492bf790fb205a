# syntax=docker/dockerfile:1.7
# r1zero training image (CUDA, A100/H100): torch + DeepSpeed + NCCL for the PyTorchJob/MPIJob
# pretraining and GRPO jobs. Built by `make images`; name and tag from r1zero/images.py.

FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04 AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev build-essential ninja-build git \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# CUDA 12.8 build of torch (includes NCCL); DeepSpeed ops JIT-compile at first use against it.
RUN pip install --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0
COPY pyproject.toml README.md ./
COPY r1zero ./r1zero
COPY components ./components
COPY pipelines ./pipelines
RUN pip install .

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 libibverbs1 librdmacm1 openssh-client \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    NCCL_DEBUG=WARN NCCL_IB_DISABLE=0 NCCL_SOCKET_IFNAME=eth0 \
    DS_ACCELERATOR=cuda
RUN useradd --create-home --uid 1000 r1zero
USER 1000
WORKDIR /home/r1zero
# PyTorchJob runs bare `torchrun` (the operator injects PET_*); MPIJob runs the deepspeed launcher.
ENTRYPOINT ["torchrun"]
