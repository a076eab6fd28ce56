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

# Health check against the coordinator's gRPC health service (grpc.health.v1, from fedlora-common's
# grpcio-health-checking). Exit 0 only on SERVING. Plaintext by default; when the coordinator serves TLS,
# set HEALTHCHECK_TLS_CA (and, for mTLS, HEALTHCHECK_TLS_CERT/HEALTHCHECK_TLS_KEY: the coordinator's own
# certificate from deploy/tls/make-certs.sh is also valid as a client certificate).
COPY --chmod=0755 <<'EOF' /usr/local/bin/fedlora-healthcheck
#!/opt/venv/bin/python
"""Exit 0 when the gRPC health service at HEALTHCHECK_ADDR (default localhost:50051) reports SERVING."""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def main() -> int:
    env = os.environ.get
    address = env("HEALTHCHECK_ADDR", "localhost:50051")
    service = env("HEALTHCHECK_SERVICE", "")
    ca = env("HEALTHCHECK_TLS_CA")
    if ca:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(ca),
            private_key=_read(env("HEALTHCHECK_TLS_KEY")),
            certificate_chain=_read(env("HEALTHCHECK_TLS_CERT")),
        )
        name = env("HEALTHCHECK_TLS_SERVER_NAME")
        options = [("grpc.ssl_target_name_override", name)] if name else []
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=float(env("HEALTHCHECK_TIMEOUT_S", "3")),
            )
        except grpc.RpcError as exc:
            print(f"{address}: {exc.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
EOF

USER 10001:10001
WORKDIR /var/lib/fedlora
EXPOSE 50051 9100
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 CMD ["fedlora-healthcheck"]
ENTRYPOINT ["fedlora-server"]
CMD ["--config", "/etc/fedlora/run.yaml"]
