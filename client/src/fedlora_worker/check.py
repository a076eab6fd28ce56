"""What a worker checks before it joins, and what `fedlora-worker check-config` and `--check` run.

- `check_site`: the settings' files (token, identity key, and the TLS files as `fedlora_worker.tls.check_tls`
  checks them: key and certificate a pair, the certificate for worker_id, signed by a CA, in its dates, the name
  dialed one a certificate can hold), every data and canary file row by row (`fedlora_worker.datafiles`), and the
  base model: a local directory with config, tokenizer and weights, or a hub id found in the Hugging Face cache or
  on the Hub (HF_HUB_OFFLINE honoured); chat records need a chat template. Each fault is a `SiteError` (or
  `DataError`): one line, exit code 2. What is only worth a warning (a certificate near its end) is in
  `SiteCheck.warnings`.
- `coordinator_health`: the coordinator's gRPC health check, with the worker's TLS settings; a TLS failure is
  named by its cause (`fedlora_worker.tls.HandshakeDoctor`).

No torch, transformers or datasets here: checking a configuration takes well under two seconds.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedlora_worker.config import DataSection, TlsClientSettings, WorkerSettings
from fedlora_worker.datafiles import DataError, RecordSet, read_canaries, read_records
from fedlora_worker.records import CanaryRecord
from fedlora_worker.tls import HandshakeDoctor, TlsCheck, TlsFault, check_tls

__all__ = ["BaseModelSource", "SiteCheck", "SiteError", "check_site", "coordinator_health", "resolve_base_model"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tiktoken.model")
"""Any one of these lets AutoTokenizer build a tokenizer (fast, sentencepiece, BPE, WordPiece, tiktoken)."""
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_TRUE = {"1", "ON", "YES", "TRUE"}


class SiteError(ValueError):
    """A setting this site cannot start with; the message is one line naming the setting and the fault."""


@dataclass(frozen=True)
class BaseModelSource:
    """Where the base model will load from, and what is known of it before loading."""

    name: str
    where: Literal["local", "cache", "hub"]
    architecture: str
    """From config.json (architectures[0], else model_type); empty when only the Hub's file list was read."""
    chat_template: bool | None
    """Whether the tokenizer has a chat template; None when its files are not at hand (hub, not cached)."""


@dataclass(frozen=True)
class SiteCheck:
    """Everything checked before joining."""

    train: RecordSet
    eval: RecordSet | None
    canaries: list[CanaryRecord]
    base_model: BaseModelSource
    tls: TlsCheck = field(default_factory=TlsCheck)

    @property
    def warnings(self) -> list[str]:
        """What may fail later, one line each (a certificate near its end); nothing refused."""
        return self.tls.warnings

    def summary(self) -> list[str]:
        sets = [("train", self.train), ("eval", self.eval)]
        lines = [
            f"data.{name}: {len(records)} records ({records.format}) in {len(records.files)} file(s)"
            for name, records in sets
            if records is not None
        ]
        if self.canaries:
            controls = sum(canary["group"] == "control" for canary in self.canaries)
            lines.append(f"data.canaries: {len(self.canaries)} records ({controls} of them controls)")
        model = self.base_model
        template = {True: "yes", False: "no", None: "not checked"}[model.chat_template]
        lines.append(
            f"base_model: {model.name} ({model.where}{', ' + model.architecture if model.architecture else ''}; "
            f"chat template: {template})"
        )
        return lines + self.tls.summary


def check_site(settings: WorkerSettings, *, environ: Mapping[str, str] | None = None) -> SiteCheck:
    """Check the files the settings name, the data and the base model; raise SiteError or DataError."""
    tls = _check_files(settings)
    train, eval_, canaries = _check_data(settings.data)
    model = resolve_base_model(settings.base_model, environ=os.environ if environ is None else environ)
    chat = [name for name, records in (("train", train), ("eval", eval_)) if records and records.format == "messages"]
    if chat and model.chat_template is False:
        raise SiteError(
            f"data.{chat[0]}: chat records ('messages') are rendered with the tokenizer's chat template, and the "
            f"tokenizer of {model.name} has none; add one (chat_template.jinja) or use 'text' or 'prompt'/'completion'"
        )
    return SiteCheck(train=train, eval=eval_, canaries=canaries, base_model=model, tls=tls)


def _check_data(data: DataSection) -> tuple[RecordSet, RecordSet | None, list[CanaryRecord]]:
    train = _records("train", data.train)
    eval_ = _records("eval", data.eval) if data.eval else None
    try:
        canaries = read_canaries(list(data.canaries))
    except DataError as exc:
        raise exc.within("data.canaries") from None
    return train, eval_, canaries


def _records(name: str, paths: tuple[Path, ...]) -> RecordSet:
    try:
        return read_records(list(paths))
    except DataError as exc:
        raise exc.within(f"data.{name}") from None


def _check_files(settings: WorkerSettings) -> TlsCheck:
    if settings.token_file is not None:
        _readable("token_file", settings.token_file)
    if settings.identity_key is not None:
        key = _readable("identity_key", settings.identity_key).strip()
        if not re.fullmatch(r"[0-9a-fA-F]{64}", key):
            raise SiteError(f"identity_key: {settings.identity_key} does not hold a key from `fedlora-worker keygen`")
    if settings.tls is None:
        return TlsCheck()
    try:
        return check_tls(settings.tls, worker_id=settings.worker_id, coordinator=settings.coordinator)
    except TlsFault as exc:
        raise SiteError(str(exc)) from None


def _readable(setting: str, path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SiteError(f"{setting}: {path}: no such file") from None
    except UnicodeDecodeError:
        raise SiteError(f"{setting}: {path}: not UTF-8 text") from None
    except OSError as exc:
        raise SiteError(f"{setting}: {path}: {exc.strerror}") from None


# ---- base model ---------------------------------------------------------------------------


def resolve_base_model(name: str, *, environ: Mapping[str, str]) -> BaseModelSource:
    """A local model directory, else a hub id from the cache or the Hub; SiteError names what is missing."""
    path = Path(name).expanduser()
    if path.exists():
        return _local(name, path, "local")
    if not _HUB_ID.match(name) or name.startswith((".", "~")):
        raise SiteError(f"base_model: {name}: no such directory")
    offline = any(environ.get(var, "").upper() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    cached = _cached_snapshot(name)
    if offline:
        if cached is None:
            raise SiteError(
                f"base_model: {name} is not a local directory nor in the Hugging Face cache, and HF_HUB_OFFLINE is "
                "set; download it first or set base_model to a local directory"
            )
        return _local(name, cached, "cache")
    return _hub(name, cached)


def _local(name: str, directory: Path, where: Literal["local", "cache"]) -> BaseModelSource:
    label = f"base_model: {name}" + (" (Hugging Face cache)" if where == "cache" else "")
    if not directory.is_dir():
        raise SiteError(f"{label}: not a directory")
    config = _json_object(directory / "config.json", label, "no config.json: not a transformers model directory")
    if not isinstance(config.get("model_type"), str):
        raise SiteError(f"{label}: config.json names no model_type")
    present = {p.name for p in directory.iterdir()}
    if not present & set(TOKENIZER_FILES):
        raise SiteError(f"{label}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    weights = present & set(WEIGHT_FILES) or {n for n in present if n.endswith(".safetensors")}
    if not weights:
        raise SiteError(f"{label}: no weights (model.safetensors or pytorch_model.bin)")
    architectures = config.get("architectures")
    architecture = architectures[0] if isinstance(architectures, list) and architectures else config["model_type"]
    return BaseModelSource(name, where, str(architecture), _has_chat_template(directory, present))


def _json_object(path: Path, label: str, missing: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SiteError(f"{label}: {missing}") from None
    except (OSError, ValueError) as exc:
        raise SiteError(f"{label}: {path.name} is unreadable ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise SiteError(f"{label}: {path.name} is not a JSON object")
    return value


def _has_chat_template(directory: Path, present: set[str]) -> bool:
    if present & set(CHAT_TEMPLATE_FILES) or (directory / "additional_chat_templates").is_dir():
        return True
    try:
        tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(tokenizer_config, dict) and bool(tokenizer_config.get("chat_template"))


def _cached_snapshot(name: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def _hub(name: str, cached: Path | None) -> BaseModelSource:
    """Ask the Hub once (no retries) for the model's files; an unreachable Hub falls back to a complete cache."""
    from huggingface_hub import HfApi, auth_check
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    label = f"base_model: {name}"
    try:
        info = HfApi().model_info(name, timeout=10)
        if info.gated:
            auth_check(name)
    except GatedRepoError:
        raise SiteError(
            f"{label} is gated on the Hugging Face Hub and this site has no access; accept its license and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise SiteError(
            f"{label}: no such directory, nor a model on the Hugging Face Hub (if it is private: set HF_TOKEN)"
        ) from None
    except HfHubHTTPError as exc:
        raise SiteError(f"{label}: the Hugging Face Hub answered {_first_line(exc)}") from None
    except Exception as exc:  # the connection: httpx's errors, OSError, timeouts
        if cached is not None:
            return _local(name, cached, "cache")
        raise SiteError(
            f"{label}: cannot reach the Hugging Face Hub ({type(exc).__name__}: {_first_line(exc)}) and it is not "
            "in the cache; set base_model to a local directory, or download it first"
        ) from None
    files = {sibling.rfilename for sibling in info.siblings or []}
    if "config.json" not in files:
        raise SiteError(f"{label}: the Hub repository has no config.json: not a transformers model")
    if not files & set(TOKENIZER_FILES):
        raise SiteError(f"{label}: the Hub repository has no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    if not files & set(WEIGHT_FILES) and not any(f.endswith(".safetensors") for f in files):
        raise SiteError(f"{label}: the Hub repository has no weights (model.safetensors or pytorch_model.bin)")
    chat = True if files & set(CHAT_TEMPLATE_FILES) else None
    architecture = (info.config or {}).get("architectures", [""])[0] if info.config else ""
    return BaseModelSource(name, "hub", str(architecture or ""), chat)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---- coordinator health ---------------------------------------------------------------------


def coordinator_health(target: str, tls: TlsClientSettings | None, *, timeout_s: float = 5.0) -> str | None:
    """None when the coordinator answers its gRPC health check SERVING; else one line saying what it answered."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        channel = _channel(target, tls)
    except OSError as exc:
        return f"coordinator {target}: cannot read the TLS files ({exc})"
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            code = exc.code()
            details = " ".join((exc.details() or "").split())
            if tls is not None and code is grpc.StatusCode.UNAVAILABLE:
                details = HandshakeDoctor(target=target, tls=tls).explain(details) or details
            return f"coordinator {target}: {code.name if code else 'no answer'}: {details}"
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        return f"coordinator {target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}"
    return None


def _channel(target: str, tls: TlsClientSettings | None) -> Any:
    import grpc

    if tls is None:
        return grpc.insecure_channel(target)
    options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(),
        private_key=tls.key.read_bytes() if tls.key else None,
        certificate_chain=tls.cert.read_bytes() if tls.cert else None,
    )
    return grpc.secure_channel(target, credentials, options=options)
