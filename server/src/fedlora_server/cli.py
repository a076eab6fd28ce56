"""`fedlora-server`: run one federation to its end, check a config, probe health, make certificates."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from types import FrameType

import structlog

from fedlora_common.logs import configure_logging, quiet_grpc_core
from fedlora_common.settings import ConfigError, load_settings, settings_flags, settings_reference
from fedlora_server.commandline import OneLineParser, config_error
from fedlora_server.config import RunSettings
from fedlora_server.operate import COMMANDS
from fedlora_server.state_commands import backup, export, restore

__all__ = ["main"]

REFERENCE = "docs/reference/settings.md"
STOPPED = 128 + signal.SIGTERM
"""Exit status of a coordinator stopped by a signal before its run ended: not success (a Kubernetes Job starts
a new pod, which resumes the run at its last committed round)."""

USAGE = """\
usage: fedlora-server --config run.yaml [--SETTING VALUE ...] [--serve]
                                                                  run a federation to its end (a run already over:
                                                                  say where it stands and exit; --serve: stay up,
                                                                  read-only, until a signal)
       fedlora-server status --config run.yaml [--json]          phase, round, attempt, sites, last commit, failure
                                                                  and the run's journal, from its state (whether or
                                                                  not the coordinator runs)
       fedlora-server stop --config run.yaml [--now] [--reason T] end the run after the round in progress (--now: at
                                                                  once); workers are told it finished
       fedlora-server retry --config run.yaml                    a failed or stopped run resumes from its last
                                                                  committed round at the coordinator's next start
       fedlora-server amend --config run.yaml [KEY=VALUE ...]    pin the run to changed settings: more rounds,
                                                                  sites added, revoked or rotated, min_workers
       fedlora-server check-config run.yaml [--SETTING VALUE ...]  check the settings and the files they name;
                                                                  starts nothing (exit 0 valid, 2 not)
       fedlora-server --check --config run.yaml                   health probe for containers: exit 0 when the
                                                                  coordinator at listen.host:listen.port answers
                                                                  SERVING on the gRPC health service, else 1
       fedlora-server certs --out DIR [--workers ID,ID] [--san NAME,...] [--days N]
                                                                  a CA (kept if DIR has one), the coordinator's
                                                                  certificate (SANs: coordinator, localhost,
                                                                  127.0.0.1 and each --san), and a key and client
                                                                  certificate per worker named (CN = worker id)
       fedlora-server certs sign --ca-dir DIR --csr FILE.csr --out FILE.crt [--days N]
                                                                  a client certificate for a key a site made and
                                                                  keeps (fedlora-worker csr), CN = the request's
                                                                  worker id, signed by the CA in DIR
       fedlora-server config-reference                            every run.yaml setting as markdown
       fedlora-server backup (--config run.yaml | --state-dir DIR) --out FILE.tar.gz
                                                                  a consistent backup, also while the coordinator
                                                                  runs: database, committed versions, adapter link
       fedlora-server restore --from FILE.tar.gz --state-dir DIR  put a backup into DIR (absent or empty); then
                                                                  fedlora-server --config run.yaml --state_dir DIR
       fedlora-server export (--config run.yaml | --state-dir DIR) --out DIR
                                                                  the final adapter as files, report.json and a
                                                                  model card (README.md)

Settings come from the YAML file, then FEDLORA_* variables (a section's keys joined by __:
FEDLORA_LORA__RANK=8), then flags (--lora.rank 8). A bad setting exits with code 2 and one line
naming it. Every setting, its type, default and meaning: {reference} in the FedLoRA
repository, or `fedlora-server config-reference`.

settings:
"""


def _help() -> str:
    rows = settings_flags(RunSettings)
    width = max(len(flag) for flag, _, _ in rows) + 2
    lines = [f"  {flag:<{width}}{kind} ({default.replace('*', '')})" for flag, kind, default in rows]
    return USAGE.format(reference=REFERENCE) + "\n".join(lines) + "\n"


def _readable(settings: RunSettings) -> None:
    """The files the settings name must be readable now, not at the first connection."""
    tls = settings.listen.tls
    if tls is None:
        return
    for field, path in (("cert", tls.cert), ("key", tls.key), ("client_ca", tls.client_ca)):
        if path is None:
            continue
        try:
            with path.open("rb") as f:
                head = f.read(64)
        except OSError as exc:
            raise ConfigError(f"listen.tls.{field}: {path}: {exc.strerror}") from None
        if b"-----BEGIN" not in head:
            raise ConfigError(f"listen.tls.{field}: {path} is not a PEM file")


def check_config(argv: Sequence[str]) -> int:
    """`check-config run.yaml [--SETTING VALUE ...]`: validate as the coordinator would at start; start nothing."""
    args = list(argv)
    if args and not args[0].startswith("-"):
        args = ["--config", *args]
    if "--config" not in args and not any(a.startswith("--config=") for a in args):
        sys.stderr.write("fedlora-server check-config: usage: fedlora-server check-config run.yaml [--SETTING VALUE]\n")
        return 2
    from fedlora_server.certs import check_listen_tls

    try:
        settings = load_settings(RunSettings, args)
        _readable(settings)
        check_listen_tls(settings.listen.tls, warn=lambda line: sys.stderr.write(f"fedlora-server: warning: {line}\n"))
    except ConfigError as exc:
        return config_error(exc)
    tls = settings.listen.tls
    transport = "plaintext" if tls is None else ("mutual TLS" if tls.client_ca else "TLS")
    secure = "on" if settings.secure_aggregation.enabled else "off"
    sys.stdout.write(
        f"ok: run {settings.run_id}, {len(settings.workers)} workers allowed (min {settings.min_workers}), "
        f"{settings.rounds} rounds, secure aggregation {secure}, {transport} on "
        f"{settings.listen.host}:{settings.listen.port}\n"
    )
    return 0


def check(argv: Sequence[str]) -> int:
    """`--check --config run.yaml`: exit 0 when the coordinator answers SERVING, else 1 (2: bad settings)."""
    from fedlora_server.probe import probe

    try:
        settings = load_settings(RunSettings, argv)
    except ConfigError as exc:
        return config_error(exc)
    if settings.listen.port == 0:
        return config_error(ConfigError("listen.port: 0 picks a port at start; --check needs it: --listen.port N"))
    try:
        result = probe(settings.listen)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"fedlora-server: check: {exc}\n")
        return 1
    (sys.stdout if result.serving else sys.stderr).write(f"fedlora-server: {result.line()}\n")
    return 0 if result.serving else 1


def certs(argv: Sequence[str]) -> int:
    """`certs --out DIR [--workers a,b] [--san NAME,...] [--days N]`, or `certs sign --ca-dir DIR --csr FILE
    --out FILE [--days N]` (a site's request, from `fedlora-worker csr`: its key never leaves the site)."""
    from fedlora_server.certs import issue_certificates, sign_request

    if argv and argv[0] == "sign":
        signer = OneLineParser(prog="fedlora-server certs sign", description="Sign a site's certificate request.")
        signer.add_argument("--ca-dir", type=Path, required=True, help="directory of ca.crt and ca.key")
        signer.add_argument("--csr", type=Path, required=True, help="the request fedlora-worker csr made at the site")
        signer.add_argument("--out", type=Path, required=True, help="where to write the certificate (a new file)")
        signer.add_argument("--days", type=int, default=365, help="validity of the certificate")
        try:
            request = signer.parse_args(argv[1:])
        except SystemExit as exc:  # a bad argument: OneLineParser has written its one line
            return int(exc.code or 0)
        try:
            signed = sign_request(request.ca_dir, request.csr, request.out, days=request.days)
        except ValueError as exc:
            sys.stderr.write(f"fedlora-server certs sign: {exc}\n")
            return 2
        except OSError as exc:
            sys.stderr.write(f"fedlora-server certs sign: {exc.filename}: {exc.strerror}\n")
            return 2
        sys.stdout.write(
            f"wrote {signed.path} (CN={signed.worker_id}, client authentication, valid until "
            f"{signed.not_after:%Y-%m-%d}): send it and ca.crt to the site\n"
            f"public key sha256: {signed.public_key_sha256} (fedlora-worker csr printed it at the site: compare)\n"
        )
        return 0
    parser = OneLineParser(prog="fedlora-server certs", description="Make the certificates for mutual TLS.")
    parser.add_argument("--out", type=Path, required=True, help="directory for ca, coordinator and worker files")
    parser.add_argument(
        "--workers",
        default="",
        help="comma-separated worker ids (each its certificate's CN); sites that make their own keys: certs sign",
    )
    parser.add_argument(
        "--san",
        action="append",
        default=[],
        help="comma-separated names or addresses workers dial (DNS:name, IP:address, or bare); repeatable",
    )
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates (the CA: 3x)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a bad argument: OneLineParser has written its one line
        return int(exc.code or 0)
    workers = [w.strip() for w in args.workers.split(",") if w.strip()]
    sans = [s.strip() for group in args.san for s in group.split(",") if s.strip()]
    try:
        issued = issue_certificates(args.out, workers=workers, sans=sans, days=args.days)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"fedlora-server certs: {exc}\n")
        return 2
    sys.stdout.write(f"{'kept' if issued.reused_ca else 'wrote'} {issued.ca} (keep ca.key offline)\n")
    sys.stdout.write(f"wrote {issued.coordinator} and its key\n")
    for worker, path in issued.workers.items():
        sys.stdout.write(f"wrote {path} and its key (CN={worker})\n")
    return 0


def config_reference(argv: Sequence[str]) -> int:
    if argv:
        sys.stderr.write("fedlora-server config-reference: takes no arguments\n")
        return 2
    sys.stdout.write(settings_reference(RunSettings, file="run.yaml", program="fedlora-server, the coordinator"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    quiet_grpc_core()  # before anything imports grpc
    if "-h" in args or "--help" in args:
        sys.stdout.write(_help())
        return 0
    commands = {
        "check-config": check_config,
        "certs": certs,
        "config-reference": config_reference,
        "backup": backup,
        "restore": restore,
        "export": export,
        **COMMANDS,
    }
    if args and args[0] in commands:
        return commands[args[0]](args[1:])
    if "--check" in args:
        return check([a for a in args if a != "--check"])
    return run(args)


def run(argv: Sequence[str]) -> int:
    """Run the federation run.yaml describes until it finishes (0), fails (1) or is stopped by a signal (143).

    A run that was already over (finished, stopped or failed) prints where it stands and exits at once (0, or 1
    for a failed run) without waiting for workers; with --serve it stays up, answering health, status polls
    (FINISHED) and metrics, until a signal.
    """
    args = list(argv)
    serve = "--serve" in args
    args = [a for a in args if a != "--serve"]
    try:
        settings = load_settings(RunSettings, args)
    except ConfigError as exc:
        return config_error(exc)
    from fedlora_server.server import CannotListen, CoordinatorServer
    from fedlora_server.store import StateError

    configure_logging(json=True)
    structlog.contextvars.bind_contextvars(run_id=settings.run_id, component="coordinator")
    try:
        server = CoordinatorServer(settings=settings)
    except StateError as exc:
        sys.stderr.write(f"fedlora-server: state error: {exc}\n")
        return 2
    if server.coordinator.finished.is_set() and not serve:
        try:
            server.write_report()
            sys.stdout.write("".join(line + "\n" for line in server.status().lines()))
        finally:
            server.shutdown()
        return 0 if server.coordinator.failure is None else 1
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
        sys.stdout.write(
            json.dumps({"event": "listening", "port": server.port, "metrics_port": server.metrics_port}) + "\n"
        )
        sys.stdout.flush()
        while not stop.is_set() and not server.wait_finished(timedelta(seconds=0.5)):
            pass
        if stop.is_set():
            structlog.get_logger().info("coordinator_stopping", reason="signal")
            return STOPPED
        server.write_report()
        if serve:  # read-only from here: health, FINISHED to every poll, metrics
            stop.wait()
        else:  # every worker polls once more and sees FINISHED, and Prometheus scrapes the end
            stop.wait(max(2 * settings.timeouts.poll_wait_ms / 1000 + 1, settings.listen.metrics_linger_s))
        if server.coordinator.failure is not None:
            sys.stderr.write(f"fedlora-server: the run failed: {server.coordinator.failure}\n")
            return 1
    except CannotListen as exc:
        sys.stderr.write(f"fedlora-server: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"fedlora-server: {exc}\n")
        return 1
    finally:
        server.shutdown()
    return 0
