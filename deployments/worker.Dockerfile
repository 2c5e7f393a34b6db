# Worker image: this project installed, started as a Prefect process worker for one pool.
#
# Build from the repository root (the context must be the checkout; BuildKit reads
# deployments/worker.Dockerfile.dockerignore, so .venv/ and outputs stay out of it):
#
#   DOCKER_BUILDKIT=1 docker build -f deployments/worker.Dockerfile -t prostate-cohort-worker .
#
# Run one container per worker host, with the shared data and output folders mounted at the
# same paths as on every other host, and the environment file of the site
# (deployments/prostate-cohort.env.example):
#
#   docker run -d --name prostate-cohort-worker --restart unless-stopped \
#       --env-file /etc/prostate-cohort.env \
#       -v /data:/data prostate-cohort-worker cpu-pool
#
# GPU hosts: the same image. The torch wheel pinned in pyproject.toml brings its own CUDA
# runtime libraries, so the host needs only the NVIDIA driver and the NVIDIA Container
# Toolkit; start the worker for the GPU pool with the GPUs passed through:
#
#   docker run -d --gpus all --env-file /etc/prostate-cohort.env -v /data:/data \
#       prostate-cohort-worker gpu-pool
#
# (check with: docker run --rm --gpus all --entrypoint python prostate-cohort-worker \
#  -c "import torch; print(torch.cuda.is_available())"). With several GPUs in one host, run
# one container per GPU (--gpus device=N) and give each its own worker name (--name).
#
# The image is about 7 GB (PyTorch and its CUDA libraries); the build takes a while.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
COPY . /opt/prostate-cohort
# The README's install: the project and its pinned dependencies, then without the obsolete
# PyPI package `argparse` that nnU-Net's dependencies pull in (it shadows the standard
# library's inside Prefect's processes; see README.md).
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir /opt/prostate-cohort \
    && /opt/venv/bin/pip uninstall -y argparse

FROM ${PYTHON_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 cohort
COPY --from=build /opt/venv /opt/venv
# The flows run from this checkout (prefect.yaml's pull step: PROSTATE_COHORT_CHECKOUT).
COPY --from=build /opt/prostate-cohort /opt/prostate-cohort
ENV PATH=/opt/venv/bin:$PATH \
    PROSTATE_COHORT_CHECKOUT=/opt/prostate-cohort \
    PREFECT_HOME=/home/cohort/.prefect \
    PYTHONUNBUFFERED=1
USER cohort
WORKDIR /opt/prostate-cohort
ENTRYPOINT ["/opt/prostate-cohort/deployments/start-worker.sh"]
CMD ["cpu-pool"]
