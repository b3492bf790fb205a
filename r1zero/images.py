"""The one place that names container images and their tags.

Components (``components/``), rendered manifests (``r1zero.cluster``), the Makefile's ``images``
target (which reads these through ``python -m r1zero.images``) and the config defaults all take
the names from here. Bump ``TAG`` on release.
"""

from __future__ import annotations

import sys

REGISTRY = "ghcr.io/r1zero"
TAG = "0.1.0"

# CPU, slim: runs the KFP components, the launcher and `r1zero pipeline submit`.
RUNTIME_IMAGE = f"{REGISTRY}/r1zero-runtime:{TAG}"
# CUDA (A100/H100) with torch, DeepSpeed and NCCL: runs pretraining and GRPO jobs.
TRAIN_IMAGE = f"{REGISTRY}/r1zero-train:{TAG}"

IMAGES = {"runtime": RUNTIME_IMAGE, "train": TRAIN_IMAGE}


if __name__ == "__main__":
    # `python -m r1zero.images runtime` prints one image name (used by `make images`).
    print(IMAGES[sys.argv[1]] if len(sys.argv) > 1 else "\n".join(f"{k} {v}" for k, v in IMAGES.items()))
