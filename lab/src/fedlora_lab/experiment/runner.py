"""`fedlora-lab experiment`: the paper's comparison (methods x seeds) in one command.

Every (method, seed) pair is an independent local federation in ``OUT/runs/<method>/seed-<s>/``;
``parallel`` of them run side by side, each worker on one thread. After a federation ends, its
final global model is audited on every site's canaries and controls, one ``fedlora-lab audit``
process per site (transformers' loading is not thread-safe, so audits are isolated in processes).
Each run leaves ``result.json``; a run whose result exists (for the same settings) is not redone,
so an interrupted experiment resumes where it stopped. Finally ``OUT/results.json`` gathers the
runs and ``experiment_report`` turns it into ``report.md`` and ``report.html``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Final, Literal, TypeGuard

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from tqdm import tqdm

from fedlora_common.files import atomic_write
from fedlora_common.settings import ConfigError, StrictModel, describe, merge, read_yaml_mapping
from fedlora_lab.datagen import DataSpec
from fedlora_lab.experiment_report import write_experiment_report
from fedlora_lab.federation import FederationPlan, LocalFederation, site_names
from fedlora_lab.model_factory import LabModelConfig, ProgressFn, cached_model
from fedlora_server.config import RunSettings

__all__ = [
    "AuditSection",
    "DataSection",
    "ExperimentConfig",
    "ExperimentOutcome",
    "FederationSection",
    "MethodConfig",
    "ModelSection",
    "RunSpec",
    "load_experiment_config",
    "merge_memorization",
    "plan_runs",
    "run_experiment",
]

EXPERIMENT_VERSION: Final = 1
RESULTS_VERSION: Final = 1
_NAME_PATTERN: Final = r"^[A-Za-z0-9._-]+$"
_COUNT_KEYS: Final = frozenset({"n", "count", "records", "pii_secrets", "seconds"})
# A rate and the count it was measured over, in an audit summary.
_WEIGHT_OF: Final[Mapping[str, str]] = {"pii_extraction_rate": "pii_secrets", "mean_exposure": "exposure_count"}
_DATA_DEFAULTS: Final = DataSpec()


# --------------------------------------------------------------------------- config


class ModelSection(StrictModel):
    """The base model: a lab model built (and cached) here, or an existing model directory or hub id."""

    lab: Literal["default", "tiny"] | None = "default"
    path: str | None = Field(None, min_length=1, description="A model directory or hub id; replaces `lab`")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if self.path is not None and self.lab is not None and "lab" in self.model_fields_set:
            raise ValueError("give either lab or path, not both")
        if self.path is None and self.lab is None:
            raise ValueError("give lab (default|tiny) or path")
        return self


class DataSection(StrictModel):
    """Per-site data, as ``DataSpec`` (the seed comes from the run's seed)."""

    n_train: int = Field(_DATA_DEFAULTS.n_train, ge=1)
    n_eval: int = Field(_DATA_DEFAULTS.n_eval, ge=1)
    n_canaries: int = Field(_DATA_DEFAULTS.n_canaries, ge=0)
    n_controls: int = Field(_DATA_DEFAULTS.n_controls, ge=0)
    frac_10x: float = Field(_DATA_DEFAULTS.frac_10x, ge=0, le=1)

    def spec(self, seed: int) -> DataSpec:
        return DataSpec(seed=seed, **self.model_dump())


class FederationSection(StrictModel):
    """What every run shares: one site per lab domain (clinical, legal, finance), rounds, local work."""

    sites: int = Field(3, ge=2, description="Workers; the first three are clinical, legal, finance")
    rounds: int = Field(8, ge=1)
    local_steps: int = Field(50, ge=1, description="Optimizer steps per worker per round")
    batch_size: int = Field(8, ge=1)
    max_seq_len: int = Field(256, ge=8)
    timeout_minutes: float = Field(60.0, gt=0, description="A run still going after this is stopped and failed")


class AuditSection(StrictModel):
    prefixes: tuple[int, ...] = Field((10, 50, 100, 200), min_length=1)
    candidates: int = Field(128, ge=2, description="Random secrets each true secret is ranked among (exposure)")

    @field_validator("prefixes")
    @classmethod
    def _positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(p < 1 for p in value):
            raise ValueError("every prefix length must be at least 1")
        return tuple(sorted(set(value)))


class MethodConfig(StrictModel):
    """One compared configuration: a set of run.yaml overrides on top of the shared settings."""

    name: str = Field(min_length=1, max_length=64, pattern=_NAME_PATTERN)
    label: str | None = Field(None, description="Shown in the report; the name when absent")
    mode: Literal["lora", "qlora", "full"] = "lora"
    learning_rate: float = Field(3e-3, gt=0, lt=1)
    lora: dict[str, Any] | None = Field(None, description="run.yaml `lora:` overrides (rank, alpha, ...)")
    secure_aggregation: bool = False
    privacy: dict[str, Any] | None = Field(None, description="run.yaml `privacy:` (client_dp, record_dp, goldfish)")
    run: dict[str, Any] = Field(default_factory=dict, description="Any further run.yaml overrides")

    @property
    def display(self) -> str:
        return self.label or self.name

    @property
    def lora_rank(self) -> int | None:
        if self.mode == "full":
            return None
        rank = (self.lora or {}).get("rank", RunSettings.model_fields["lora"].default.rank)
        return int(rank)


class ExperimentConfig(StrictModel):
    """An experiment file (`experiments/*.yaml`); every key is checked, unknown keys are refused."""

    version: Literal[1] = EXPERIMENT_VERSION
    name: str = Field("experiment", min_length=1)
    description: str = ""
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    federation: FederationSection = FederationSection()
    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=1)
    parallel: int = Field(2, ge=1)
    audit: AuditSection = AuditSection()
    methods: tuple[MethodConfig, ...] = Field(min_length=1)

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(s < 0 for s in value):
            raise ValueError("every seed must be >= 0")
        if len(set(value)) != len(value):
            raise ValueError("must be distinct")
        return value

    @field_validator("methods")
    @classmethod
    def _distinct_names(cls, value: tuple[MethodConfig, ...]) -> tuple[MethodConfig, ...]:
        names = [m.name for m in value]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"method names must be distinct; repeated: {', '.join(duplicated)}")
        return value

    @model_validator(mode="after")
    def _runs_are_valid(self) -> ExperimentConfig:
        """Every method's run.yaml must pass the coordinator's own schema, checked before anything runs."""
        for index, method in enumerate(self.methods):
            try:
                RunSettings.model_validate(_run_yaml(self, method, seed=self.seeds[0], probe=True))
            except ValidationError as exc:
                raise ValueError(f"methods.{index} ({method.name}): run.yaml {describe(exc)}") from None
        return self

    def varies_rank(self) -> bool:
        ranks = {m.lora_rank for m in self.methods if m.lora_rank is not None}
        return len(ranks) > 1

    def fingerprint(self, method: MethodConfig, seed: int) -> str:
        """What a run's result depends on; a stored result with another fingerprint is redone."""
        payload = {
            "version": self.version,
            "model": self.model.model_dump(),
            "data": self.data.model_dump(),
            "federation": self.federation.model_dump(),
            "audit": self.audit.model_dump(),
            "method": method.model_dump(exclude={"label"}),
            "seed": seed,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _run_yaml(config: ExperimentConfig, method: MethodConfig, *, seed: int, probe: bool = False) -> dict[str, Any]:
    """The run.yaml overrides of one run (merged by ``LocalFederation`` over its generated run.yaml).

    With ``probe`` the result is a complete run.yaml (placeholder workers) for validation only.
    """
    fed = config.federation
    run: dict[str, Any] = {
        "run_id": f"{method.name}-seed-{seed}",
        "mode": method.mode,
        "training": {
            "local_steps": fed.local_steps,
            "batch_size": fed.batch_size,
            "max_seq_len": fed.max_seq_len,
            "learning_rate": method.learning_rate,
        },
        "secure_aggregation": {"enabled": method.secure_aggregation},
    }
    if method.lora:
        run["lora"] = dict(method.lora)
    if method.privacy is not None:
        run["privacy"] = dict(method.privacy)
    run = merge(run, method.run)
    if probe:
        workers = [
            {"id": worker_id, "token_sha256": "0" * 64, "identity_public": "0" * 64}
            for worker_id, _ in site_names(fed.sites)
        ]
        run = merge(
            {
                "base_model": "probe",
                "rounds": fed.rounds,
                "min_workers": fed.sites,
                "workers": workers,
                "seed": seed,
                "listen": {"port": 0, "metrics_port": 0},
            },
            run,
        )
    return run


def load_experiment_config(path: Path) -> ExperimentConfig:
    """Read and validate an experiment file; raise ConfigError with one line naming the field."""
    data = read_yaml_mapping(path)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunSpec:
    method: MethodConfig
    seed: int
    out_dir: Path

    @property
    def key(self) -> str:
        return f"{self.method.name}/seed-{self.seed}"


@dataclass(frozen=True)
class ExperimentOutcome:
    out_dir: Path
    results: dict[str, Any]
    report_paths: list[Path]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.results["runs"] if r["status"] != "ok"]


def plan_runs(config: ExperimentConfig, out_dir: Path) -> list[RunSpec]:
    """Seed-major order, so that an interrupted experiment has every method at the first seeds."""
    return [
        RunSpec(method, seed, out_dir / "runs" / method.name / f"seed-{seed}")
        for seed in config.seeds
        for method in config.methods
    ]


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    atomic_write(path, json.dumps(payload, indent=2) + "\n")


def _stored_result(spec: RunSpec, fingerprint: str) -> dict[str, Any] | None:
    path = spec.out_dir / "result.json"
    try:
        stored: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if stored.get("status") != "ok" or stored.get("fingerprint") != fingerprint:
        return None
    return stored


def _is_count(key: str) -> bool:
    return key in _COUNT_KEYS or key.startswith("n_") or key.endswith("count")


def _is_worst(key: str) -> bool:
    return key.startswith(("max", "worst")) or key.endswith(("_max", "_worst"))


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _weight(summary: Mapping[str, Any], key: str | None = None) -> float | None:
    """How much a (sub)summary counts: the count that goes with ``key``, else its record count."""
    names = [_WEIGHT_OF[key]] if key is not None and key in _WEIGHT_OF else []
    for name in [*names, "count", "n"]:
        value = summary.get(name)
        if _number(value):
            return float(value)
    records = summary.get("records")
    if isinstance(records, Mapping):  # an audit summary's top level: the trained canaries
        trained = [float(v) for group, v in records.items() if group != "control" and _number(v)]
        return sum(trained) if trained else None
    return None


def merge_memorization(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge per-site audit summaries into one: count-weighted means, counts summed, worst cases maxed.

    A rate is weighted by the count it was measured over (``count`` records, ``pii_secrets``
    pairs, ``exposure_count`` records); without one, the parent's weight is used, and without
    that the sites weigh equally. Keys present at only some sites are merged over those sites;
    ``None`` values are skipped.
    """
    return _merge_level(list(summaries), [None] * len(summaries), counts=False)


def _merge_level(items: list[Mapping[str, Any]], parent_weights: list[float | None], *, counts: bool) -> dict[str, Any]:
    keys: list[str] = []
    for item in items:
        keys.extend(k for k in item if k not in keys)
    out: dict[str, Any] = {}
    for key in keys:
        present = [
            (item[key], _weight(item, key) or parent)
            for item, parent in zip(items, parent_weights, strict=True)
            if item.get(key) is not None
        ]
        values = [v for v, _ in present]
        if not present:
            out[key] = None
        elif all(isinstance(v, Mapping) for v in values):
            out[key] = _merge_level(values, [w for _, w in present], counts=counts or _is_count(key))
        elif all(_number(v) for v in values):
            if counts or _is_count(key):
                out[key] = sum(values)
            elif all(v == values[0] for v in values):
                out[key] = values[0]
            elif _is_worst(key):
                out[key] = max(values)
            else:
                weights = [w if w is not None else 1.0 for _, w in present]
                total = sum(weights)
                out[key] = sum(v * w for v, w in zip(values, weights, strict=True)) / total if total else None
        else:
            out[key] = values[0] if all(v == values[0] for v in values) else values
    return out


def _with_tokenizer(model_dir: Path, tokenizer_dir: Path, out: Path) -> Path:
    """A directory of links: a full fine-tuned model (saved without a tokenizer) plus the base's tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    for source in [*model_dir.iterdir(), *tokenizer_dir.glob("*token*"), *tokenizer_dir.glob("*.model")]:
        link = out / source.name
        if source.is_file() and not link.exists():
            link.symlink_to(source.resolve())
    return out


def _audit_site(
    run_dir: Path, site: str, base: Path, adapter: Path | None, audit: AuditSection, deadline: float
) -> dict[str, Any]:
    """Audit the final model on one site's canaries and controls in a separate process."""
    site_dir = run_dir / "sites" / site
    out = run_dir / "audit" / f"{site}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "fedlora_lab", "audit", "--base", str(base)]
    if adapter is not None:
        argv += ["--adapter", str(adapter)]
    for name in ("canaries.jsonl", "controls.jsonl"):
        if (site_dir / name).exists():
            argv += ["--records", str(site_dir / name)]
    argv += [
        "--prefixes",
        ",".join(str(p) for p in audit.prefixes),
        "--candidates",
        str(audit.candidates),
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with (run_dir / "logs" / f"audit-{site}.log").open("wb") as log_file:
        completed = subprocess.run(
            argv, stdout=log_file, stderr=log_file, env=env, timeout=max(60.0, deadline - time.monotonic())
        )
    if completed.returncode != 0:
        raise RuntimeError(f"audit of {site} exited with code {completed.returncode}; see logs/audit-{site}.log")
    payload: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    summary = payload.get("summary", payload)
    if not isinstance(summary, dict):
        raise RuntimeError(f"audit of {site}: {out} holds no summary")
    return summary


def _final(rounds: Sequence[Mapping[str, Any]], key: str) -> Any:
    """The last non-null value of a per-round field."""
    for record in reversed(rounds):
        if record.get(key) is not None:
            return record[key]
    return None


def _summarize_report(report: Mapping[str, Any]) -> dict[str, Any]:
    rounds = [r for r in report.get("rounds", []) if r.get("round", 1) >= 1]
    eval_loss = _final(rounds, "eval_loss")
    upload = sum(int(r.get("upload_bytes") or 0) for r in report.get("rounds", []))
    download = sum(int(r.get("download_bytes") or 0) for r in report.get("rounds", []))
    return {
        "rounds_completed": len(rounds),
        "eval_loss": eval_loss,
        "perplexity": math.exp(eval_loss) if eval_loss is not None and eval_loss < 700 else None,
        "base_eval_loss": report.get("base_eval_loss"),
        "base_perplexity": (
            math.exp(report["base_eval_loss"])
            if report.get("base_eval_loss") is not None and report["base_eval_loss"] < 700
            else None
        ),
        "train_loss": _final(rounds, "train_loss"),
        "epsilon": _final(rounds, "epsilon"),
        "delta": _final(rounds, "delta"),
        "upload_bytes": upload,
        "download_bytes": download,
        "adapter_path": report.get("adapter_path"),
    }


def _execute(config: ExperimentConfig, spec: RunSpec, base_model: Path) -> dict[str, Any]:
    """One federation, then the audit of its final model; never raises, the outcome is in the result."""
    method, fed = spec.method, config.federation
    result: dict[str, Any] = {
        "method": method.name,
        "label": method.display,
        "seed": spec.seed,
        "mode": method.mode,
        "lora_rank": method.lora_rank,
        "secure_aggregation": method.secure_aggregation,
        "privacy": method.privacy,
        "fingerprint": config.fingerprint(method, spec.seed),
        "out_dir": str(spec.out_dir),
        "status": "failed",
        "error": None,
        "exit_codes": {},
        "memorization": None,
        "memorization_by_site": {},
    }
    for stale in ("result.json", "report.json", "report.md", "report.html", "audit"):
        target = spec.out_dir / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    plan = FederationPlan(
        out_dir=spec.out_dir,
        base_model=base_model,
        workers=fed.sites,
        rounds=fed.rounds,
        mode=method.mode,
        seed=spec.seed,
        data=config.data.spec(spec.seed),
        run=_run_yaml(config, method, seed=spec.seed),
        secure_aggregation=method.secure_aggregation,
        threads_per_worker=1,
        timeout=timedelta(minutes=fed.timeout_minutes),
    )
    started = time.monotonic()
    deadline = started + timedelta(minutes=fed.timeout_minutes).total_seconds() * 2
    try:
        federation = LocalFederation(plan).run()
    except Exception as exc:  # a failed run is recorded, the experiment goes on
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["duration_s"] = time.monotonic() - started
        return result
    result["duration_s"] = time.monotonic() - started
    result["exit_codes"] = federation.exit_codes
    result.update(_summarize_report(federation.report))
    failed = {name: code for name, code in federation.exit_codes.items() if code != 0}
    if failed:
        result["error"] = f"processes failed: {failed}"
        return result
    adapter_path = federation.report.get("adapter_path")
    if not adapter_path:
        result["error"] = "the report names no final model (adapter_path)"
        return result
    final_model = Path(adapter_path)
    base_dir = spec.out_dir / "base-model"
    if method.mode == "full":
        base, adapter = _with_tokenizer(final_model, base_dir, spec.out_dir / "audit" / "final-model"), None
    else:
        base, adapter = base_dir, final_model
    audit_started = time.monotonic()
    try:
        by_site = {
            site: _audit_site(spec.out_dir, site, base, adapter, config.audit, deadline)
            for site, _ in site_names(fed.sites)
        }
    except (RuntimeError, subprocess.TimeoutExpired, OSError, json.JSONDecodeError) as exc:
        result["error"] = f"audit failed: {exc}"
        result["audit_duration_s"] = time.monotonic() - audit_started
        return result
    result["audit_duration_s"] = time.monotonic() - audit_started
    result["memorization_by_site"] = by_site
    result["memorization"] = merge_memorization(list(by_site.values()))
    result["status"] = "ok"
    return result


def _resolve_base(config: ExperimentConfig, cache_dir: Path, progress: ProgressFn | None) -> Path:
    if config.model.path is not None:
        local = Path(config.model.path).expanduser()
        if local.is_dir():
            return local
        from huggingface_hub import snapshot_download  # only for a hub id (the GPU config)

        return Path(snapshot_download(config.model.path))
    lab = LabModelConfig.tiny() if config.model.lab == "tiny" else LabModelConfig()
    return cached_model(cache_dir, lab, progress=progress).path


def run_experiment(
    config: ExperimentConfig,
    out_dir: Path,
    *,
    cache_dir: Path,
    show_progress: bool = True,
    model_progress: ProgressFn | None = None,
    execute: Callable[[ExperimentConfig, RunSpec, Path], dict[str, Any]] = _execute,
) -> ExperimentOutcome:
    """Run every (method, seed) not already done, ``parallel`` at a time; write results and reports."""
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "experiment.yaml").write_text(
        yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
    )
    base_model = _resolve_base(config, cache_dir, model_progress)
    specs = plan_runs(config, out_dir)
    results: dict[str, dict[str, Any]] = {}
    todo: list[RunSpec] = []
    for spec in specs:
        stored = _stored_result(spec, config.fingerprint(spec.method, spec.seed))
        if stored is not None:
            results[spec.key] = stored
        else:
            todo.append(spec)
    started = time.monotonic()
    bar = tqdm(
        total=len(specs),
        initial=len(results),
        desc=f"{config.name}: runs",
        unit="run",
        file=sys.stderr,
        disable=not show_progress,
        dynamic_ncols=True,
    )
    try:
        if results:
            bar.write(f"{len(results)} of {len(specs)} runs already done in {out_dir}; resuming")
        with ThreadPoolExecutor(max_workers=config.parallel, thread_name_prefix="experiment-run") as pool:
            futures = {pool.submit(execute, config, spec, base_model): spec for spec in todo}
            failed = 0
            for future in as_completed(futures):
                spec = futures[future]
                result = future.result()
                spec.out_dir.mkdir(parents=True, exist_ok=True)
                _write_json(spec.out_dir / "result.json", result)
                results[spec.key] = result
                if result["status"] != "ok":
                    failed += 1
                    bar.write(f"{spec.key}: FAILED ({result['error']})")
                else:
                    bar.write(
                        f"{spec.key}: eval loss {result['eval_loss']:.3f} in {result['duration_s']:.0f} s "
                        f"+ audit {result.get('audit_duration_s', 0):.0f} s"
                    )
                bar.set_postfix(failed=failed)
                bar.update(1)
    finally:
        bar.close()
    payload = {
        "results_version": RESULTS_VERSION,
        "experiment": config.name,
        "description": config.description,
        "config": config.model_dump(mode="json"),
        "base_model": str(base_model),
        "varies_rank": config.varies_rank(),
        "methods": [
            {
                "name": m.name,
                "label": m.display,
                "mode": m.mode,
                "lora_rank": m.lora_rank,
                "learning_rate": m.learning_rate,
                "secure_aggregation": m.secure_aggregation,
                "privacy": m.privacy,
            }
            for m in config.methods
        ],
        "seeds": list(config.seeds),
        "wall_time_s": time.monotonic() - started,
        "runs": [results[spec.key] for spec in specs],
    }
    _write_json(out_dir / "results.json", payload)
    paths = write_experiment_report(payload, out_dir)
    return ExperimentOutcome(out_dir, payload, paths)
