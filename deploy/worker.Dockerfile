# syntax=docker/dockerfile:1.7
# The worker image: torch 2.13.0 + fedlora-common + fedlora-worker, and fedlora-lab beside them (its
# make-model/make-data/audit/demo, faker and fedlora-server) for the compose stack's lab steps.
# Build from the repository root:  docker build -f deploy/worker.Dockerfile -t fedlora-worker:0.1.0 .
#
# CPU by default. For NVIDIA GPUs, pick the CUDA wheel index of torch 2.13.0 that matches the hosts'
# driver (see https://download.pytorch.org/whl/), e.g.
#   docker build -f deploy/worker.Dockerfile --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       -t fedlora-worker:0.1.0-cuda .
# The CUDA wheels carry their CUDA runtime (nvidia-* packages from PyPI), so the slim base works with the
# NVIDIA container toolkit; BASE_IMAGE may name another base (e.g. a CUDA image) if it provides Python
# 3.11 as `python`. Then set `device: cuda` in worker.yaml and give the container the GPUs.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch alone from its own index (without dependencies, so nothing else comes from there); its
# dependencies are resolved from PyPI in the next step, under constraints.txt, which pins torch==2.13.0.
RUN pip install --no-deps --index-url "${TORCH_INDEX_URL}" torch==2.13.0
COPY constraints.txt /src/constraints.txt
COPY common/pyproject.toml /src/common/pyproject.toml
COPY common/src /src/common/src
COPY server/pyproject.toml /src/server/pyproject.toml
COPY server/src /src/server/src
COPY client/pyproject.toml /src/client/pyproject.toml
COPY client/src /src/client/src
COPY lab/pyproject.toml /src/lab/pyproject.toml
COPY lab/src /src/lab/src
RUN pip install -c /src/constraints.txt /src/common /src/server /src/client /src/lab \
 && pip check \
 && python -c "import torch; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__"

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="fedlora-worker" \
      org.opencontainers.image.description="FedLoRA worker daemon and lab tools (torch, transformers, peft)"
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/home/fedlora/.cache/huggingface
RUN groupadd --system --gid 10001 fedlora \
 && useradd --system --uid 10001 --gid fedlora --home-dir /home/fedlora --create-home --shell /usr/sbin/nologin fedlora \
 && install -d -o fedlora -g fedlora -m 0750 /data /home/fedlora/.cache \
 && install -d -o fedlora -g fedlora -m 0755 /etc/fedlora
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
# /data and /etc/fedlora are owned by the fedlora user, so fresh named volumes mounted there are writable
# (compose's init writes the lab data to one, identities, certificates and configs to the other).
WORKDIR /data
EXPOSE 9101
ENTRYPOINT ["fedlora-worker"]
CMD ["--config", "/etc/fedlora/worker.yaml"]
