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

.PHONY: setup system-deps run test test-fast lint images manifests audit clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/r1zero run --config configs/tiny.yaml --out $(OUT)

test: setup system-deps
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# Builds need a Docker engine and registry access (neither exists on the CPU dev machine).
images: setup
	docker build -f images/runtime.Dockerfile -t $$($(PY) -m r1zero.images runtime) .
	docker build -f images/train.Dockerfile -t $$($(PY) -m r1zero.images train) .

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
