"""`fedlora-lab experiment`: the paper's comparison (methods x seeds) in one command.

Every (method, seed) pair is an independent federation in ``OUT/runs/<method>/seed-<s>/``
(``execute_run``) on the config's ``engine``; ``parallel`` of them run side by side (simulation: each
run one process with its share of the cores; processes: each worker on one thread), as threads of this
process or as Ray tasks (the config's ``executor``: ``executors``), and this process writes every
result. Each run leaves ``result.json``; a run whose result exists (for the same settings) is not
redone, so an interrupted experiment resumes where it stopped. Finally ``OUT/results.json`` gathers
the runs and ``report`` turns it into ``report.md`` and ``report.html``. A ``secagg_check`` (one
method at one seed, in the clear and masked) runs last, in this process, and is stored beside the runs.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml
from tqdm import tqdm

from fedlora_common.files import atomic_write
from fedlora_lab.experiment.config import ExperimentConfig
from fedlora_lab.experiment.execute import PlannedRun, execute_run
from fedlora_lab.experiment.executors import open_executor
from fedlora_lab.experiment.report import write_experiment_report
from fedlora_lab.experiment.secagg_check import run_secagg_check
from fedlora_lab.model_factory import LabModelConfig, ProgressFn, cached_model

__all__ = ["ExperimentOutcome", "plan_runs", "run_experiment"]

RESULTS_VERSION: Final = 1


@dataclass(frozen=True)
class ExperimentOutcome:
    """What an experiment left: results.json's payload and the report files."""

    out_dir: Path
    results: dict[str, Any]
    report_paths: list[Path]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.results["runs"] if r["status"] != "ok"]


def plan_runs(config: ExperimentConfig, out_dir: Path) -> list[PlannedRun]:
    """Seed-major order, so that an interrupted experiment has every method at the first seeds."""
    return [
        PlannedRun(method, seed, out_dir / "runs" / method.name / f"seed-{seed}")
        for seed in config.seeds
        for method in config.methods
    ]


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    atomic_write(path, json.dumps(payload, indent=2) + "\n")


def _stored_result(run: PlannedRun, fingerprint: str) -> dict[str, Any] | None:
    path = run.out_dir / "result.json"
    try:
        stored: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if stored.get("status") != "ok" or stored.get("fingerprint") != fingerprint:
        return None
    return stored


def _secagg_check(config: ExperimentConfig, out_dir: Path, base_model: Path) -> dict[str, Any] | None:
    """The stored check when its settings are unchanged, else a new one; a failed check is recorded, not raised."""
    check = config.secagg_check
    if check is None:
        return None
    check_dir = out_dir / "secagg-check"
    fingerprint = f"{config.fingerprint(config.method(check.method), check.seed)}-{check.rounds}"
    stored = _stored_result(PlannedRun(config.method(check.method), check.seed, check_dir), fingerprint)
    if stored is not None:
        return stored
    try:
        result = {**run_secagg_check(config, check_dir, base_model), "status": "ok"}
    except (RuntimeError, ValueError, OSError) as exc:
        result = {"method": check.method, "seed": check.seed, "status": "failed", "error": str(exc)}
    result["fingerprint"] = fingerprint
    check_dir.mkdir(parents=True, exist_ok=True)
    _write_json(check_dir / "result.json", result)
    return result


def _resolve_base(config: ExperimentConfig, cache_dir: Path, progress: ProgressFn | None) -> Path:
    """The base model's directory, absolute (a Ray worker may start elsewhere): given, downloaded from the hub,
    or the lab model built into the cache."""
    if config.model.path is not None:
        local = Path(config.model.path).expanduser()
        if local.is_dir():
            return local.resolve()
        from huggingface_hub import snapshot_download  # only for a hub id (the GPU config)

        return Path(snapshot_download(config.model.path))
    lab = LabModelConfig.named(config.model.lab or "default")
    return cached_model(cache_dir, lab, progress=progress).path.resolve()


def run_experiment(
    config: ExperimentConfig,
    out_dir: Path,
    *,
    cache_dir: Path,
    show_progress: bool = True,
    model_progress: ProgressFn | None = None,
    execute: Callable[[ExperimentConfig, PlannedRun, Path], dict[str, Any]] = execute_run,
) -> ExperimentOutcome:
    """Run every (method, seed) not already done, ``parallel`` at a time; write results and reports."""
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "experiment.yaml").write_text(
        yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
    )
    base_model = _resolve_base(config, cache_dir, model_progress)
    runs = plan_runs(config, out_dir)
    results: dict[str, dict[str, Any]] = {}
    todo: list[PlannedRun] = []
    for run in runs:
        stored = _stored_result(run, config.fingerprint(run.method, run.seed))
        if stored is not None:
            results[run.key] = stored
        else:
            todo.append(run)
    started = time.monotonic()
    bar = tqdm(
        total=len(runs),
        initial=len(results),
        desc=f"{config.name}: runs",
        unit="run",
        file=sys.stderr,
        disable=not show_progress,
        dynamic_ncols=True,
    )
    try:
        if results:
            bar.write(f"{len(results)} of {len(runs)} runs already done in {out_dir}; resuming")
        failed = 0
        with open_executor(config.executor, parallel=config.parallel, ray_address=config.ray_address) as executor:
            for run, result in executor.run(lambda cell: execute(config, cell, base_model), todo):
                run.out_dir.mkdir(parents=True, exist_ok=True)
                _write_json(run.out_dir / "result.json", result)
                results[run.key] = result
                if result["status"] != "ok":
                    failed += 1
                    bar.write(f"{run.key}: FAILED ({result['error']})")
                else:
                    bar.write(
                        f"{run.key}: eval loss {result['eval_loss']:.3f} in {result['duration_s']:.0f} s "
                        f"+ audit {result.get('audit_duration_s', 0):.0f} s"
                    )
                bar.set_postfix(failed=failed)
                bar.update(1)
    finally:
        bar.close()
    secagg_check = _secagg_check(config, out_dir, base_model)
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
                "aggregation": m.aggregation,
                "lora_rank": m.lora_rank,
                "learning_rate": m.learning_rate,
                "secure_aggregation": m.secure_aggregation,
                "privacy": m.privacy,
            }
            for m in config.methods
        ],
        "seeds": list(config.seeds),
        "wall_time_s": time.monotonic() - started,
        "runs": [results[run.key] for run in runs],
        "secagg_check": secagg_check,
    }
    _write_json(out_dir / "results.json", payload)
    paths = write_experiment_report(payload, out_dir)
    return ExperimentOutcome(out_dir, payload, paths)
