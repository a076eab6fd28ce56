"""`fedlora-worker`: take part in a federation, check a configuration, probe the coordinator, make keys.

Everything a site can get wrong on its own (settings, data files, base model) is checked before the
worker joins, with one line and exit code 2. torch, transformers and the daemon are imported only
after that, so `check-config` and `--help` answer at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import structlog
from pydantic import BaseModel

from fedlora_common.logs import quiet_grpc_core
from fedlora_common.secagg import identity_keypair
from fedlora_common.settings import ConfigError, load_settings
from fedlora_worker.check import SiteError, check_site, coordinator_health
from fedlora_worker.config import WorkerSettings
from fedlora_worker.datafiles import DataError

if TYPE_CHECKING:
    from fedlora_worker.daemon import WorkerOutcome

__all__ = ["SETTINGS_REFERENCE", "main", "usage"]

SETTINGS_REFERENCE = "docs/reference/settings.md"
"""The page that documents every setting (type, default, meaning), generated from WorkerSettings."""

_COMMANDS = (
    ("--config worker.yaml", "take part in the coordinator's run until it finishes"),
    ("check-config worker.yaml", "check the settings, TLS files, every data file and the base model; start nothing"),
    ("--check --config worker.yaml", "health probe: exit 0 if the coordinator answers SERVING, else 1"),
    ("keygen --out FILE", "write a new Ed25519 identity key (mode 0600), print its public half"),
    (
        "csr --key FILE --out FILE.csr --id WORKER_ID",
        "write a new TLS key (mode 0600; it stays here) and a request for the consortium CA to sign",
    ),
)


def usage() -> str:
    """The help text: commands, every setting as a flag (from WorkerSettings), exit codes, the reference page."""
    lines = ["usage: fedlora-worker " + _COMMANDS[0][0] + " [--SETTING VALUE ...]"]
    lines += [f"       fedlora-worker {command}" for command, _ in _COMMANDS[1:]]
    lines += ["", "commands:"]
    lines += [f"  {command:<30} {what}" for command, what in _COMMANDS]
    lines += [
        "",
        "settings: keys of worker.yaml, overridden by FEDLORA_* variables (nested with __, e.g.",
        "FEDLORA_RETRY__ATTEMPTS=3), then by flags (--retry.attempts 3):",
    ]
    lines += [f"  --{name:<28} {description}" for name, description in _flags(WorkerSettings)]
    lines += [
        "",
        f"Every setting, its type and default: {SETTINGS_REFERENCE}",
        "exit codes: 0 the run finished (or the check passed); 1 the run failed, the coordinator refused, or",
        "the health check failed; 2 a bad setting, data file or base model, a run this model cannot take, or",
        "a certificate, key or name TLS with the coordinator fails on (retry.tls_failures times; one line naming it)",
    ]
    return "\n".join(lines)


def _flags(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str]]:
    for name, field in model.model_fields.items():
        section = next(
            (t for t in (field.annotation, *getattr(field.annotation, "__args__", ())) if _is_section(t)), None
        )
        if section is not None:
            yield from _flags(section, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field.description or ""


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def keygen(argv: Sequence[str]) -> int:
    """Write a new long-term identity key (hex, mode 0600) and print the public key for the allow-list."""
    if len(argv) != 2 or argv[0] != "--out":
        sys.stderr.write("fedlora-worker keygen: usage: fedlora-worker keygen --out FILE\n")
        return 2
    path = Path(argv[1])
    if path.exists():
        sys.stderr.write(f"fedlora-worker keygen: {path} exists; refusing to overwrite an identity key\n")
        return 2
    keys = identity_keypair()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as f:
        f.write(keys.private.hex() + "\n")
    sys.stdout.write(keys.public.hex() + "\n")
    return 0


def csr(argv: Sequence[str]) -> int:
    """`csr --key FILE --out FILE.csr --id WORKER_ID`: a TLS key made at the site, which never leaves it, and a
    certificate signing request (CN = the worker id) for `fedlora-server certs sign` at the consortium's CA."""
    from fedlora_worker.tls import TlsFault, make_request

    usage = "fedlora-worker csr: usage: fedlora-worker csr --key FILE --out FILE.csr --id WORKER_ID\n"
    flags = dict(zip(argv[::2], argv[1::2], strict=False))
    if len(argv) != 6 or set(flags) != {"--key", "--out", "--id"}:
        sys.stderr.write(usage)
        return 2
    try:
        request = make_request(key=Path(flags["--key"]), csr=Path(flags["--out"]), worker_id=flags["--id"])
    except TlsFault as exc:
        sys.stderr.write(f"fedlora-worker csr: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"fedlora-worker csr: {exc.filename}: {exc.strerror}\n")
        return 2
    sys.stdout.write(
        f"wrote {request.key} (mode 0600; it never leaves this site) and {request.csr} (CN={request.worker_id})\n"
        f"send {request.csr.name} to the consortium's CA: fedlora-server certs sign --ca-dir DIR --csr "
        f"{request.csr.name} --out {request.worker_id}.crt; then set tls.key: {request.key} and tls.cert to the "
        "certificate it returns\n"
        f"public key sha256: {request.public_key_sha256} (the CA prints it when it signs: compare them)\n"
    )
    return 0


def _settings(argv: Sequence[str]) -> WorkerSettings:
    """The settings from --config, FEDLORA_* and flags, with the token readable; ConfigError otherwise."""
    try:
        settings = load_settings(WorkerSettings, argv)
        settings.bearer_token()
    except OSError as exc:
        raise ConfigError(f"token_file: {exc.strerror}") from None
    return settings


def check_config(argv: Sequence[str]) -> int:
    """`check-config worker.yaml [--SETTING VALUE ...]`: everything checked before a join, nothing started."""
    args = list(argv)
    if args and not args[0].startswith("-"):
        args = ["--config", *args]
    if "--config" not in args:
        sys.stderr.write("fedlora-worker check-config: usage: fedlora-worker check-config worker.yaml\n")
        return 2
    try:
        settings = _settings(args)
        checked = check_site(settings)
    except ConfigError as exc:
        sys.stderr.write(f"fedlora-worker: config error: {exc}\n")
        return 2
    except (SiteError, DataError) as exc:
        sys.stderr.write(f"fedlora-worker: {exc}\n")
        return 2
    for warning in checked.warnings:
        sys.stderr.write(f"fedlora-worker: warning: {warning}\n")
    config = args[args.index("--config") + 1]
    sys.stdout.write(f"{config}: ok\n")
    for line in checked.summary():
        sys.stdout.write(f"  {line}\n")
    tls = "TLS" if settings.tls else "plaintext"
    sys.stdout.write(f"  coordinator: {settings.coordinator} ({tls}; not contacted: --check probes it)\n")
    return 0


def health(argv: Sequence[str]) -> int:
    """`--check --config worker.yaml`: 0 if the coordinator is SERVING, else 1 (container health checks: never 2)."""
    try:
        settings = load_settings(WorkerSettings, argv)
    except ConfigError as exc:
        sys.stderr.write(f"fedlora-worker: config error: {exc}\n")
        return 1
    problem = coordinator_health(settings.coordinator, settings.tls)
    if problem is not None:
        sys.stderr.write(f"fedlora-worker: {problem}\n")
        return 1
    sys.stdout.write(f"coordinator {settings.coordinator}: SERVING\n")
    return 0


def entry() -> NoReturn:
    """The `fedlora-worker` program: main's exit status, without the interpreter's teardown.

    pyarrow (the parquet reader, and datasets under training) keeps native threads that the teardown can
    destroy while still joinable, which aborts a process whose work is done ("terminate called without an
    active exception", SIGABRT, apache/arrow#34314). A site's exit status must say how its run went: once
    main has returned, the streams and log handlers are flushed and the process ends there.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    quiet_grpc_core()  # before anything imports grpc
    if args and args[0] in ("-h", "--help", "help"):
        sys.stdout.write(usage() + "\n")
        return 0
    if args and args[0] == "keygen":
        return keygen(args[1:])
    if args and args[0] == "csr":
        return csr(args[1:])
    if args and args[0] == "check-config":
        return check_config(args[1:])
    if "--check" in args:
        return health([a for a in args if a != "--check"])
    try:
        settings = _settings(args)
        check_site(settings)
    except ConfigError as exc:
        sys.stderr.write(f"fedlora-worker: config error: {exc}\n")
        return 2
    except (SiteError, DataError) as exc:
        sys.stderr.write(f"fedlora-worker: {exc}\n")
        return 2
    return run(settings)


STOPPED = 128 + signal.SIGTERM
"""Exit status of a worker stopped by a signal before its run finished (as a shell reports one killed by it):
not success, so a Kubernetes Job replaces the pod and the site takes part again; compose does not restart a
container it stopped itself."""
STOP_GRACE_S = 4.0
"""How long a signalled worker may take to wind down before it exits regardless (orchestrators wait 5-30 s)."""


def _no_library_progress_bars() -> None:
    """Loading weights and mapping data sets draw bars of their own (transformers, datasets, the hub client):
    carriage-return lines that belong on a terminal, not in a log file."""
    import datasets
    import transformers

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    datasets.disable_progress_bars()


def run(settings: WorkerSettings) -> int:
    """Join and take part until the run finishes; torch and the daemon load only now.

    Under torchrun (WORLD_SIZE > 1) only rank 0 joins; the other ranks train with it (SiteGroup).
    """
    import structlog
    import torch

    from fedlora_common.logs import configure_logging
    from fedlora_worker.distributed import Launch, SiteGroup, site_model

    configure_logging(json=True)
    structlog.contextvars.bind_contextvars(worker_id=settings.worker_id, component="worker")
    if not (settings.progress and sys.stderr.isatty()):
        _no_library_progress_bars()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    launch = Launch.from_environment()
    group = SiteGroup(launch, site_model(settings, launch)) if launch.distributed else None
    if group is not None:
        structlog.contextvars.bind_contextvars(rank=launch.rank)
        if launch.rank > 0:
            try:
                group.follow(settings)
            finally:
                group.close()
            return 0
    try:
        return _take_part(settings, group.worker_hooks() if group else {})
    finally:
        if group is not None:
            group.close()


def _take_part(settings: WorkerSettings, hooks: dict[str, Any]) -> int:
    """The daemon's life: join, do the coordinator's tasks, leave; hooks are a multi-process site's."""
    import structlog
    from prometheus_client import CollectorRegistry, start_http_server

    from fedlora_common.certificates import not_valid_after
    from fedlora_worker.coordinator import CONFIGURATION_REFUSALS, Misconfigured, Refused, TlsMisconfigured
    from fedlora_worker.daemon import Worker, WorkerFailed
    from fedlora_worker.metrics import WorkerMetrics, labelled
    from fedlora_worker.modeling import SiteMismatch
    from fedlora_worker.transport import CoordinatorClient

    log = structlog.get_logger()
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    client = CoordinatorClient(
        target=settings.coordinator,
        worker_id=settings.worker_id,
        token=settings.bearer_token(),
        retry=settings.retry,
        tls=settings.tls,
        on_retry=metrics.retries.inc,
        on_tls_failure=metrics.tls_failures.inc,
    )
    if settings.tls is not None:
        for name, path in (("client", settings.tls.cert), ("ca", settings.tls.ca)):
            if path is not None:
                metrics.certificate_expiry.labels(certificate=name).set(not_valid_after(path))
    stopped = threading.Event()
    worker: Worker | None = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("worker_stopping", signal=signal.Signals(signum).name)
        stopped.set()
        client.stop()
        if worker is not None:
            worker.shutdown()
        threading.Thread(target=_exit_after, args=(STOP_GRACE_S,), name="stop-grace", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)  # from here on: loading the records can take a while too
    signal.signal(signal.SIGINT, on_signal)
    if settings.metrics_port is not None:
        try:
            http, _ = start_http_server(
                settings.metrics_port, settings.metrics_host, registry=labelled(registry, worker=settings.worker_id)
            )
        except OSError as exc:
            where = f"{settings.metrics_host}:{settings.metrics_port}"
            sys.stderr.write(f"fedlora-worker: metrics_port: cannot listen on {where}: {exc.strerror}\n")
            return 2
        log.info("metrics_listening", host=settings.metrics_host, port=http.server_port)
    try:
        worker = Worker(settings=settings, client=client, metrics=metrics, **hooks)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"fedlora-worker: data: {exc}\n")
        return 2
    if stopped.is_set():
        worker.shutdown()
    with worker:
        try:
            outcome = _linger(worker.run(), settings, stopped)
        except SiteMismatch as exc:
            sys.stderr.write(f"fedlora-worker: this site refuses the run: {exc}\n")
            return 2
        except TlsMisconfigured as exc:  # nothing reaches the coordinator: nothing to leave
            log.error("tls_misconfigured", reason=str(exc))
            sys.stderr.write(f"fedlora-worker: {exc}\n")
            return 2
        except Misconfigured as exc:
            sys.stderr.write(f"fedlora-worker: {exc}\n")
            return 2
        except WorkerFailed as exc:
            sys.stderr.write(f"fedlora-worker: cannot go on: {exc}\n")
            return 1
        except Refused as exc:  # at join, before the run is known: nothing to leave
            log.error("coordinator_refused", code=exc.code, reason=str(exc))
            sys.stderr.write(f"fedlora-worker: the coordinator refused: {exc}\n")
            return 2 if exc.code in CONFIGURATION_REFUSALS else 1
    if outcome.finished:
        return 0
    return STOPPED if stopped.is_set() else 1


def _linger(outcome: WorkerOutcome, settings: WorkerSettings, stopped: threading.Event) -> WorkerOutcome:
    """Keep the metrics endpoint up `metrics_linger_s` after the run ended for this site, unless a signal ends it."""
    if settings.metrics_port is not None and settings.metrics_linger_s and not stopped.is_set():
        stopped.wait(settings.metrics_linger_s)
    return outcome


def _exit_after(seconds: float) -> None:
    """A stopped worker ends within its grace even inside work nothing can interrupt (loading a model, a step
    of a collective): what it leaves half done, the coordinator already treats as a dropout."""
    time.sleep(seconds)
    structlog.get_logger().warning("worker_stopped_forcibly", grace_s=seconds)
    os._exit(STOPPED)
