# syntax=docker/dockerfile:1
# The IsoQuant service as an image. Two targets:
#   gpu (the default: the last stage)  docker build -t isoquant-service:gpu .
#       CUDA base; torch's CUDA build from PyPI with the Triton release that torch itself pins; gcc and
#       the Python headers, which Triton needs at run time to build its launcher on first compile.
#   cpu                                docker build --target cpu -t isoquant-service:cpu .
#       python slim; the CPU build of torch (no CUDA libraries); the torch backend on the CPU.
# Both: the project installed with its `server` extra in /opt/venv, a non-root user, the Triton kernel
# cache on a volume, a HEALTHCHECK on /health/ready, `python -m service` as the command.
# TORCH_VERSION and TRITON_VERSION default to the Makefile's pins (tests/deploy checks that they agree).

ARG TORCH_VERSION=2.13.0
ARG TRITON_VERSION=3.6.0

# ---------------------------------------------------------------------------------------------------
FROM python:3.11.11-slim-bookworm AS cpu
ARG TORCH_VERSION
ARG TRITON_VERSION
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# torch first, in its own layer: it is the large, rarely changing part. The server extra asks for
# triton on Linux; pin it to the Makefile's release rather than take whatever is newest.
RUN python -m venv /opt/venv \
 && pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
 && pip install "triton==${TRITON_VERSION}"
WORKDIR /opt/isoquant/src
COPY pyproject.toml README.md ./
COPY kernels ./kernels
COPY service ./service
COPY clients ./clients
COPY isoquant_format ./isoquant_format
RUN pip install ".[server]" && python -c "import service, kernels, torch; print('torch', torch.__version__)"
COPY deploy/healthcheck.py /opt/isoquant/healthcheck.py
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/isoquant isoquant \
 && mkdir -p /var/cache/isoquant/triton \
 && chown -R isoquant:isoquant /var/cache/isoquant
# The cache directory exists and belongs to the user before VOLUME: a new named volume mounted there
# starts as a copy of it, so the non-root user can write compiled kernels into it.
ENV ISOQUANT_HOST=0.0.0.0 ISOQUANT_PORT=8000 ISOQUANT_DEVICE=cpu \
    ISOQUANT_TRITON_CACHE_DIR=/var/cache/isoquant/triton TRITON_CACHE_DIR=/var/cache/isoquant/triton
VOLUME ["/var/cache/isoquant/triton"]
# Run from the home directory: `service` is imported from the installed package, not the source copy.
WORKDIR /home/isoquant
USER isoquant:isoquant
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "/opt/isoquant/healthcheck.py"]
CMD ["python", "-m", "service", "--host", "0.0.0.0"]

# ---------------------------------------------------------------------------------------------------
FROM nvidia/cuda:12.8.1-base-ubuntu24.04 AS gpu
ARG TORCH_VERSION
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# python3-dev and gcc/libc6-dev: Triton compiles a small C launcher against Python.h the first time it
# loads a kernel; without a C compiler every GPU kernel fails at warm-up.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# PyPI's Linux torch wheel is the CUDA build; it depends on the exact triton release it was built with,
# so pip installs the matching Triton here (the server extra's triton>=3.6, which the Gluon kernels need,
# is then already met). The CUDA runtime libraries come with the wheel; the host needs only an NVIDIA driver recent enough for it
# and the NVIDIA container toolkit. Another CUDA build: --build-arg TORCH_INDEX_URL=<PyTorch wheel index>.
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN python3 -m venv /opt/venv \
 && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /opt/isoquant/src
COPY pyproject.toml README.md ./
COPY kernels ./kernels
COPY service ./service
COPY clients ./clients
COPY isoquant_format ./isoquant_format
RUN pip install ".[server]" && python -c "import service, kernels, torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
COPY deploy/healthcheck.py /opt/isoquant/healthcheck.py
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/isoquant isoquant \
 && mkdir -p /var/cache/isoquant/triton \
 && chown -R isoquant:isoquant /var/cache/isoquant
ENV ISOQUANT_HOST=0.0.0.0 ISOQUANT_PORT=8000 ISOQUANT_DEVICE=cuda \
    ISOQUANT_TRITON_CACHE_DIR=/var/cache/isoquant/triton TRITON_CACHE_DIR=/var/cache/isoquant/triton
VOLUME ["/var/cache/isoquant/triton"]
WORKDIR /home/isoquant
USER isoquant:isoquant
EXPOSE 8000
# Warm-up compiles the warm set's Triton kernels on a cold cache: allow minutes before failures count.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "/opt/isoquant/healthcheck.py"]
CMD ["python", "-m", "service", "--host", "0.0.0.0"]
