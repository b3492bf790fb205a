# r1zero runtime image: runs the KFP components, the job launcher, `r1zero pipeline submit` (the
# retraining CronJob, with the compiled pipeline as package data) and the code sandbox.
# Built by `make images` (r1zero/images.py), which assembles the build context: src/ (the project),
# requirements.txt (the pins of pyproject.toml, torch excluded), wheels/ (the local CPU torch wheel)
# and certs/ca.crt.
#
# CPU (default): BASE_IMAGE is Debian bookworm bootstrapped with mmdebstrap (no Docker Hub).
# CUDA target of the same file: --build-arg BASE_IMAGE=<a CUDA runtime image with Python 3.11 and
# python3.11-venv> --build-arg PYTHON=python3.11 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# with an empty wheels/ (torch then comes from that index, NCCL included).
ARG BASE_IMAGE=r1zero-base:bookworm

FROM ${BASE_IMAGE} AS build
ARG PYTHON=python3
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# certs/ca.crt: the CA bundle pip trusts on the building machine (build stage only).
COPY certs/ca.crt /certs/ca.crt
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/certs/ca.crt PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN ${PYTHON} -m venv /opt/venv
# Dependencies first (own layers: a source change does not reinstall them).
COPY wheels/ /wheels/
RUN if compgen -G "/wheels/torch-${TORCH_VERSION}*.whl" >/dev/null; then \
        pip install /wheels/torch-"${TORCH_VERSION}"*.whl; \
    else pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; fi
COPY requirements.txt /tmp/requirements.txt
RUN pip install --requirement /tmp/requirements.txt "torch==${TORCH_VERSION}"
# The project as a wheel: a source change rebuilds only this and the final install (the venv
# copied into the final stage stays a cached layer).
COPY src/ /src/
RUN pip wheel --no-deps --wheel-dir /dist /src

FROM ${BASE_IMAGE}
ARG UID=10001
LABEL org.opencontainers.image.source="https://github.com/r1zero/r1zero" \
      org.opencontainers.image.description="r1zero runtime (KFP components, launcher, pipeline submit)"
COPY --from=build /opt/venv /opt/venv
COPY --from=build /dist /tmp/dist
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/home/r1zero
RUN PIP_NO_CACHE_DIR=1 pip install --no-deps --no-index /tmp/dist/*.whl && rm -rf /tmp/dist
# One non-root uid for images and manifests (r1zero.images.UID; pods set runAsUser to it).
RUN groupadd --gid "${UID}" r1zero && useradd --create-home --uid "${UID}" --gid "${UID}" r1zero
USER ${UID}
WORKDIR /home/r1zero
ENTRYPOINT ["r1zero"]
CMD ["--help"]
