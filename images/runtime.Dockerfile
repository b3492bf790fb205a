# syntax=docker/dockerfile:1.7
# r1zero runtime image (CPU, slim): runs the KFP components, the PyTorchJob launcher and
# `r1zero pipeline submit`. Built by `make images`; its name and tag come from r1zero/images.py.

FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# CPU torch from PyTorch's CPU index keeps the image small; the rest is pinned in pyproject.toml.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY r1zero ./r1zero
COPY components ./components
COPY pipelines ./pipelines
RUN pip install .

FROM python:3.11.11-slim-bookworm
LABEL org.opencontainers.image.source="https://github.com/r1zero/r1zero" \
      org.opencontainers.image.description="r1zero runtime (KFP components, launcher)"
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 1000 r1zero
USER 1000
WORKDIR /home/r1zero
ENTRYPOINT ["r1zero"]
CMD ["--help"]
