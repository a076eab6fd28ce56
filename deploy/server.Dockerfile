# syntax=docker/dockerfile:1.7
# The coordinator image: fedlora-common + fedlora-server only (no torch, no CUDA).
# Build from the repository root:  docker build -f deploy/server.Dockerfile -t fedlora-server:0.1.0 .
# Run:  docker run -v $PWD/run.yaml:/etc/fedlora/run.yaml:ro -p 50051:50051 -p 9100:9100 fedlora-server:0.1.0
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY constraints.txt /src/constraints.txt
COPY common/pyproject.toml /src/common/pyproject.toml
COPY common/src /src/common/src
COPY server/pyproject.toml /src/server/pyproject.toml
COPY server/src /src/server/src
# Versions come from constraints.txt (which also pins torch: it is never installed here).
RUN pip install -c /src/constraints.txt /src/common /src/server \
 && pip check \
 && if python -c "import torch" 2>/dev/null; then echo "torch must not be in the server image" >&2; exit 1; fi

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="fedlora-server" \
      org.opencontainers.image.description="FedLoRA coordinator (no torch, no GPU)"
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 fedlora \
 && useradd --system --uid 10001 --gid fedlora --home-dir /home/fedlora --create-home --shell /usr/sbin/nologin fedlora \
 && install -d -o fedlora -g fedlora -m 0750 /var/lib/fedlora /var/lib/fedlora/state \
 && install -d -m 0755 /etc/fedlora
COPY --from=build /opt/venv /opt/venv

# Health check: `fedlora-server --check` asks the gRPC health service of the coordinator that the config
# describes (listen.host/port; TLS and mTLS as listen.tls says, presenting the coordinator's own
# certificate, which `fedlora-server certs` makes valid for client authentication too). Exit 0 only on
# SERVING: NOT_SERVING until the state is restored and the server started, and after a failed run.
USER 10001:10001
WORKDIR /var/lib/fedlora
EXPOSE 50051 9100
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=3 \
    CMD ["fedlora-server", "--check", "--config", "/etc/fedlora/run.yaml"]
ENTRYPOINT ["fedlora-server"]
CMD ["--config", "/etc/fedlora/run.yaml"]
