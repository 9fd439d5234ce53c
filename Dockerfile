# syntax=docker/dockerfile:1
# softprompt-server: the CUDA image users deploy.
#
#   docker build -t softprompt-server:0.1.0 .
#   docker run --gpus all -p 8000:8000 -v models:/models -v adapters:/data/adapters \
#       -e SOFTPROMPT_MODEL=Qwen/Qwen2.5-0.5B softprompt-server:0.1.0
#
# Base image: PyTorch's official CUDA *runtime* image (no compilers, no CUDA headers), tagged
# with the same torch release that constraints.txt pins for CPU CI (2.13.0), so the image runs the
# torch the tests ran. The tag follows the pytorch/pytorch scheme
# <torch>-cuda<major.minor>-cudnn<N>-runtime; CI has no Docker engine and never pulls it, so if
# your registry lacks this exact tag pass another one with the same torch minor:
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:<tag> .
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Non-root user with a fixed uid/gid (the Kubernetes manifests run as 10001:10001), and the
# directories that must stay writable under a read-only root filesystem.
RUN groupadd --system --gid 10001 softprompt \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin softprompt \
    && mkdir -p /models /data/adapters \
    && chown -R 10001:10001 /models /data

WORKDIR /app

# Layer 1: third-party dependencies only, plus the s3 extra (boto3) so --store s3://... works
# (changes when pyproject/constraints change, not on every source edit). torch comes from the
# base image and must not be replaced: constraints.txt pins the CPU CI build (torch==2.13.0),
# so drop that line and pin torch to the exact build already
# installed (e.g. 2.13.0+cu128); pip then sees the requirement satisfied and keeps the CUDA build.
COPY pyproject.toml constraints.txt ./
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/constraints.txt \
    && grep -v -E '^torch(==|[[:space:]]|$)' constraints.txt >> /tmp/constraints.txt \
    && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['s3']))" > /tmp/requirements.txt \
    && python -m pip install --no-cache-dir -r /tmp/requirements.txt -c /tmp/constraints.txt \
    && python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'torch lost its CUDA build')" \
    && rm /tmp/requirements.txt /tmp/constraints.txt

# Layer 2: the project itself, without touching the dependencies installed above.
COPY README.md ./
COPY adapters_store ./adapters_store
COPY server ./server
RUN python -m pip install --no-cache-dir --no-deps . \
    && rm -rf /app/build /app/*.egg-info

# Configuration is SOFTPROMPT_* variables (pydantic-settings); every one can be overridden at
# `docker run -e` or from a Kubernetes ConfigMap. HF_HOME keeps Hugging Face downloads on the
# model-cache volume too. HOME=/tmp: libraries that cache under ~ (torch, triton) write to /tmp,
# the one other writable place when Kubernetes mounts the root filesystem read-only.
ENV HOME=/tmp \
    SOFTPROMPT_HOST=0.0.0.0 \
    SOFTPROMPT_PORT=8000 \
    SOFTPROMPT_STORE=/data/adapters \
    SOFTPROMPT_MODEL_CACHE=/models \
    HF_HOME=/models/huggingface

# /models: downloaded weights and the built-in model; /data/adapters: the local adapter store.
VOLUME ["/models", "/data/adapters"]

USER 10001:10001
EXPOSE 8000

# No curl in the base image: probe with the Python already there. urlopen raises on connection
# errors and on any non-2xx answer, so python exits 1 (unhealthy).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SOFTPROMPT_PORT', '8000'), timeout=4)"]

# The server handles SIGTERM itself (graceful drain); exec form keeps it PID 1 so it receives it.
ENTRYPOINT ["softprompt-server", "serve"]
