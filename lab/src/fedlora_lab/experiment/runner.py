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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml
from tqdm import tqdm

from fedlora_common.files import atomic_write
from fedlora_lab.experiment.config import ExperimentConfig, MethodConfig
from fedlora_lab.experiment.execute import PlannedRun, execute_run
from fedlora_lab.experiment.executors import CellExecutor, open_executor
from fedlora_lab.experiment.report import write_experiment_report
from fedlora_lab.experiment.secagg_check import run_secagg_check
from fedlora_lab.experiment.sweep import choose_rates, plan_sweep, sweep_json, with_chosen_rates
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


def plan_runs(
    config: ExperimentConfig, out_dir: Path, methods: Sequence[MethodConfig] | None = None
) -> list[PlannedRun]:
    """Seed-major order, so that an interrupted experiment has every method at the first seeds; `methods`: the
    config's at the rates its sweep chose."""
    return [
        PlannedRun(method, seed, out_dir / "runs" / method.name / f"seed-{seed}")
        for seed in config.seeds
        for method in methods or config.methods
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


class _Cells:
    """Runs lists of planned runs on the experiment's executor: a stored result is kept, every other run is
    executed and its result written to its result.json the moment it exists, and the progress bar counts both."""

    def __init__(
        self,
        config: ExperimentConfig,
        base_model: Path,
        executor: CellExecutor,
        execute: Callable[[ExperimentConfig, PlannedRun, Path], dict[str, Any]],
        bar: tqdm[Any],
    ) -> None:
        self._config = config
        self._base_model = base_model
        self._executor = executor
        self._execute = execute
        self._bar = bar
        self._failed = 0

    def run(self, runs: Sequence[PlannedRun], *, unrunnable: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """Each run's result, in the order of `runs`; a run of a method in `unrunnable` fails with its reason."""
        results: dict[Path, dict[str, Any]] = {}
        todo = []
        for run in runs:
            reason = (unrunnable or {}).get(run.method.name)
            stored = _stored_result(run, self._config.fingerprint(run.method, run.seed))
            if reason is not None:
                self._store(run, _not_run(self._config, run, reason), results)
            elif stored is not None:
                results[run.out_dir] = stored
                self._bar.update(1)
            else:
                todo.append(run)
        # the cell function closes over these alone, never over self: Ray pickles it, and the bar cannot be
        config, base_model, execute = self._config, self._base_model, self._execute
        for run, result in self._executor.run(lambda cell: execute(config, cell, base_model), todo):
            self._store(run, result, results)
        return [results[run.out_dir] for run in runs]

    def _store(self, run: PlannedRun, result: dict[str, Any], results: dict[Path, dict[str, Any]]) -> None:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run.out_dir / "result.json", result)
        results[run.out_dir] = result
        where = f"{run.key} (lr {run.method.learning_rate:g})"
        if result["status"] != "ok":
            self._failed += 1
            self._bar.write(f"{where}: FAILED ({result['error']})")
        else:
            self._bar.write(
                f"{where}: eval loss {result['eval_loss']:.3f} in {result['duration_s']:.0f} s "
                f"+ audit {result.get('audit_duration_s', 0):.0f} s"
            )
        self._bar.set_postfix(failed=self._failed)
        self._bar.update(1)


def _not_run(config: ExperimentConfig, run: PlannedRun, reason: str) -> dict[str, Any]:
    return {
        "method": run.method.name,
        "label": run.method.display,
        "seed": run.seed,
        "fingerprint": config.fingerprint(run.method, run.seed),
        "out_dir": str(run.out_dir),
        "status": "failed",
        "error": reason,
    }


def run_experiment(
    config: ExperimentConfig,
    out_dir: Path,
    *,
    cache_dir: Path,
    show_progress: bool = True,
    model_progress: ProgressFn | None = None,
    execute: Callable[[ExperimentConfig, PlannedRun, Path], dict[str, Any]] = execute_run,
) -> ExperimentOutcome:
    """Run the sweep (when methods sweep their learning rate), then every (method, seed) at the chosen rates,
    ``parallel`` at a time, each not already done; write results and reports."""
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "experiment.yaml").write_text(
        yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
    )
    base_model = _resolve_base(config, cache_dir, model_progress)
    sweep = plan_sweep(config, out_dir)
    started = time.monotonic()
    bar = tqdm(
        total=len(sweep) + len(config.seeds) * len(config.methods),
        desc=f"{config.name}: runs",
        unit="run",
        file=sys.stderr,
        disable=not show_progress,
        dynamic_ncols=True,
    )
    try:
        with open_executor(config.executor, parallel=config.parallel, ray_address=config.ray_address) as executor:
            cells = _Cells(config, base_model, executor, execute, bar)
            choices = choose_rates(sweep, cells.run(sweep))
            methods = with_chosen_rates(config, choices)
            unrunnable = {
                name: "no learning rate of the sweep finished" for name, c in choices.items() if c.learning_rate is None
            }
            runs = plan_runs(config, out_dir, methods)
            results = cells.run(runs, unrunnable=unrunnable)
    finally:
        bar.close()
    secagg_check = _secagg_check(config.model_copy(update={"methods": methods}), out_dir, base_model)
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
            for m in methods
        ],
        "seeds": list(config.seeds),
        "sweep": sweep_json(config.sweep_seed, choices),
        "wall_time_s": time.monotonic() - started,
        "runs": results,
        "secagg_check": secagg_check,
    }
    _write_json(out_dir / "results.json", payload)
    paths = write_experiment_report(payload, out_dir)
    return ExperimentOutcome(out_dir, payload, paths)
