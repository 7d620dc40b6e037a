# syntax=docker/dockerfile:1
#
# The captioning service image; the offline jobs (training, batch captioning) run from the same image
# with another command. Multi-stage: the builder resolves and installs everything into /opt/venv, the
# runtime stage copies only that (no compilers, no uv, no build caches) and runs as a non-root user.
#
#   CPU (default): docker build -t captioner:cpu .
#   GPU (CUDA):    docker build -t captioner:gpu \
#                    --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
#                    --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# torch/torchvision come from the PyTorch wheel index named by TORCH_INDEX_URL (CPU-only wheels by
# default: none of the CUDA libraries that make PyPI's torch about 5 GB), at the versions pinned in
# requirements.lock; every other dependency is installed at its requirements.lock version. A base
# without Python 3.11 (the CUDA images) gets a standalone CPython from uv in /opt/python.

ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.5

FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------------------------------------- builder
FROM ${BASE_IMAGE} AS builder
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PYTHON_VERSION=3.11
SHELL ["/bin/bash", "-euo", "pipefail", "-c"]
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_NO_CACHE=1
WORKDIR /src

# 1. torch + torchvision from the chosen PyTorch index, at the locked versions (cached layer).
COPY requirements.lock ./
RUN mkdir -p /opt/python \
 && uv venv --python "${PYTHON_VERSION}" /opt/venv \
 && uv pip install --python /opt/venv/bin/python --index-url "${TORCH_INDEX_URL}" \
      "$(grep -E '^torch==' requirements.lock)" "$(grep -E '^torchvision==' requirements.lock)"

# 2. The project's runtime dependencies (not the dev extras), constrained to the lock; torch already
#    satisfies its pin. opencv-python is swapped for the headless build of the same version, which needs
#    no X11/OpenGL system libraries in the runtime stage.
#    EXTRAS=ray adds the Ray engine (`captioner batch --engine ray`; the image k8s/jobs/ray runs).
ARG EXTRAS=""
COPY pyproject.toml README.md ./
RUN uv pip install --python /opt/venv/bin/python -r pyproject.toml ${EXTRAS:+--extra "${EXTRAS}"} \
    --constraint requirements.lock \
 && opencv="$(grep -E '^opencv-python==' requirements.lock | cut -d= -f3)" \
 && uv pip uninstall --python /opt/venv/bin/python opencv-python \
 && uv pip install --python /opt/venv/bin/python --no-deps "opencv-python-headless==${opencv}"

# 3. The project itself (not editable: the runtime stage has no source tree).
COPY captioning/ captioning/
COPY training/ training/
COPY service/ service/
RUN uv pip install --python /opt/venv/bin/python --no-deps . \
 && /opt/venv/bin/captioner --help > /dev/null

# ---------------------------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE} AS runtime
ARG UID=10001
SHELL ["/bin/bash", "-euo", "pipefail", "-c"]
LABEL org.opencontainers.image.title="captioner" \
      org.opencontainers.image.description="Image-captioning service (LightCap, UCM distillation captioner), training and batch jobs" \
      org.opencontainers.image.licenses="MIT"

RUN groupadd --system --gid "${UID}" captioner \
 && useradd --system --uid "${UID}" --gid captioner --home-dir /home/captioner --create-home \
      --shell /usr/sbin/nologin captioner \
 && mkdir -p /var/lib/captioner \
 && chown captioner:captioner /var/lib/captioner

COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv
# Small standard-library helpers: HEALTHCHECK, seeding a store volume (k8s init containers), model reload.
COPY deploy/healthcheck.py deploy/seed_store.py deploy/reload.py /opt/captioner/
# The embedded default models. CAPTIONER_MODEL_STORE points here; a volume mounted on /models takes
# precedence. Docker seeds an empty named volume with these files and their owner (the service user, so
# the compose train profile can publish into it); Kubernetes pods seed their PVC with seed_store.py.
COPY --chown=${UID}:${UID} model_store/ /models/

# Settings are the service's CAPTIONER_* variables (service/settings.py); the rest keeps libraries from
# writing under $HOME or the read-only root filesystem (only /tmp, /models and the data dir are writable).
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CAPTIONER_HOST=0.0.0.0 \
    CAPTIONER_PORT=8000 \
    CAPTIONER_MODEL_STORE=/models \
    CAPTIONER_DATA_DIR=/var/lib/captioner \
    CAPTIONER_NO_PROGRESS=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    YOLO_OFFLINE=1 \
    YOLO_CONFIG_DIR=/tmp/ultralytics \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/cache \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    NUMBA_CACHE_DIR=/tmp/numba

USER ${UID}
WORKDIR /var/lib/captioner
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/captioner/healthcheck.py"]
CMD ["captioner", "serve"]
