"""Dockerfiles are hadolint-clean, pinned, run as the manifests' non-root uid; `make images` uses r1zero.images.

The built images themselves are tested in tests/images/test_built.py (slow, needs a Docker engine)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from r1zero.images import IMAGES, RUNTIME_IMAGE, TAG, TRAIN_IMAGE, UID, VLLM_IMAGE, VLLM_PACKAGE, vllm_requirements

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "images").glob("*.Dockerfile"))
HADOLINT = Path(sys.executable).parent / "hadolint"


def test_three_images():
    assert {p.name for p in DOCKERFILES} == {"runtime.Dockerfile", "train.Dockerfile", "vllm.Dockerfile"}
    assert set(IMAGES) == {"runtime", "train", "vllm"} and VLLM_IMAGE.split(":")[1] == TAG


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(path):
    out = subprocess.run([str(HADOLINT), str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_runtime_multistage_pinned():
    text = (REPO / "images" / "runtime.Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert len(froms) >= 2, "multi-stage: build tools and the CA bundle stay in the build stage"
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(d for d in pins if d.startswith("torch=="))
    assert f"ARG TORCH_VERSION={torch_pin.split('==')[1]}" in text
    # the final stage carries neither pip's CA bundle nor the wheels
    final = text[text.rindex("\nFROM "):]
    assert "/certs" not in final and "/wheels" not in final


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_one_nonroot_uid_for_images_and_manifests(path):
    text = path.read_text()
    assert f"ARG UID={UID}" in text and UID != 0
    assert re.findall(r"^USER\s+(\S+)$", text, flags=re.M)[-1] == "${UID}"
    for manifest in sorted((REPO / "manifests").rglob("*.yaml")):
        for uid in re.findall(r"runAs(?:User|Group): (\d+)", manifest.read_text()):
            assert int(uid) == UID, f"{manifest.relative_to(REPO)} runs as {uid}, the images as {UID}"


@pytest.mark.parametrize("name", ["train.Dockerfile", "vllm.Dockerfile"])
def test_train_image_apt_packages_pinned(name):
    text = (REPO / "images" / name).read_text()
    install = text[text.index("apt-get install"):text.index("rm -rf /var/lib/apt/lists")]
    pkgs = [w for w in install.split() if re.match(r"^[a-z][a-z0-9+.-]+=", w)]
    assert {p.split("=")[0] for p in pkgs} >= {"openssh-server", "openssh-client", "pdsh", "g++"}
    assert all(re.search(r'=\"\$\{[A-Z_]+_VERSION\}\"', p) for p in pkgs), pkgs
    for arg in re.findall(r"\$\{([A-Z_]+_VERSION)\}", install):
        assert re.search(rf"^ARG {arg}=\S+", text, flags=re.M), f"{arg} has no pinned default"


def test_make_images_takes_names_from_one_place():
    out = subprocess.run(["make", "-n", "images", "STAMP=/dev/null"], capture_output=True, text=True, cwd=REPO)
    assert "python -m r1zero.images build --push" in out.stdout.replace(".venv/bin/python", "python")
    names = subprocess.run([sys.executable, "-m", "r1zero.images", "runtime"], capture_output=True, text=True)
    assert names.stdout.strip() == RUNTIME_IMAGE
    assert TRAIN_IMAGE.split(":")[1] == RUNTIME_IMAGE.split(":")[1]


def test_vllm_image_pins_follow_the_vllm_env_and_pyproject():
    text = (REPO / "images" / "vllm.Dockerfile").read_text()
    make = (REPO / "Makefile").read_text()
    assert f"ARG VLLM_PACKAGE={VLLM_PACKAGE}" in text and f"pip install -q {VLLM_PACKAGE}" in make
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(d for d in pins if d.startswith("torch=="))
    assert f"ARG TORCH_VERSION={torch_pin.split('==')[1]}" in text
    assert set(vllm_requirements()) <= set(pins)
    # PyPI's torchvision/torchaudio/torchcodec break imports beside the CPU torch (Makefile vllm-env)
    assert "pip uninstall -y torchvision torchaudio torchcodec" in text
    final = text[text.rindex("\nFROM "):]
    assert "/certs" not in final and "/wheels" not in final
