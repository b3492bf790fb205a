"""Dockerfiles are hadolint-clean, multi-stage, non-root, pinned; `make images` uses r1zero.images."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from r1zero.images import RUNTIME_IMAGE, TRAIN_IMAGE

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "images").glob("*.Dockerfile"))
HADOLINT = Path(sys.executable).parent / "hadolint"


def test_two_images():
    assert {p.name for p in DOCKERFILES} == {"runtime.Dockerfile", "train.Dockerfile"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(path):
    out = subprocess.run([str(HADOLINT), str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_multistage_nonroot_pinned(path):
    text = path.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert len(froms) >= 2, "multi-stage"
    assert all(":" in f and not f.endswith(":latest") for f in froms)
    assert re.search(r"^USER\s+1000$", text, flags=re.M)
    assert "torch==2.13.0" in text


def test_make_images_takes_names_from_one_place():
    out = subprocess.run(["make", "-n", "images", "STAMP=/dev/null"], capture_output=True, text=True, cwd=REPO)
    assert "python -m r1zero.images runtime" in out.stdout.replace(".venv/bin/python", "python")
    names = subprocess.run([sys.executable, "-m", "r1zero.images", "runtime"], capture_output=True, text=True)
    assert names.stdout.strip() == RUNTIME_IMAGE
    assert TRAIN_IMAGE.split(":")[1] == RUNTIME_IMAGE.split(":")[1]
