"""One run of an experiment: a federation for one (method, seed) on its engine, then the audit of its final model.

A run never raises: whatever happens is in the result it returns, which is what ``result.json``
and ``results.json`` hold for it.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from fedlora_common.memorization import combine_summaries
from fedlora_common.plans import LoraSpec
from fedlora_lab.engines import run_federation
from fedlora_lab.experiment.audit import audit_site, with_tokenizer
from fedlora_lab.experiment.config import ExperimentConfig, MethodConfig, federation_plan
from fedlora_lab.federation import site_names
from fedlora_lab.plan import capacity

__all__ = ["PlannedRun", "execute_run", "simulation_cores"]


@dataclass(frozen=True)
class PlannedRun:
    """One (method, seed) pair and the directory its federation runs in; an unaudited run (the sweep's)
    measures held-out loss alone, so nothing the audit sees can reach a choice made from it."""

    method: MethodConfig
    seed: int
    out_dir: Path
    audited: bool = True

    @property
    def key(self) -> str:
        return f"{self.method.name}/seed-{self.seed}"


def simulation_cores(config: ExperimentConfig) -> int:
    """The cores of one simulated run (its sites split them): this machine's, shared by the runs side by side."""
    return max(1, (os.cpu_count() or 1) // config.parallel)


def _final(rounds: Sequence[Mapping[str, Any]], key: str) -> Any:
    """The last non-null value of a per-round field."""
    for record in reversed(rounds):
        if record.get(key) is not None:
            return record[key]
    return None


def _perplexity(loss: float | None) -> float | None:
    return math.exp(loss) if loss is not None and loss < 700 else None


_ROUND_MEMORIZATION: Final = {
    "exact_match_10x": ("10x", "exact_match_rate"),
    "approx_match_10x": ("10x", "approx_match_rate"),
    "exposure_10x": ("10x", "mean_exposure"),
    "exposure_control": ("control", "mean_exposure"),
    "canaries_10x": ("10x", "count"),
}
"""A round's curve fields: (duplication group, rate) of the round's audit (report.json's combined sites)."""


def _round_curve(record: Mapping[str, Any]) -> dict[str, Any]:
    """One round's held-out loss and audit, kept so the report can compare methods at equal loss."""
    groups = (record.get("memorization") or {}).get("by_duplication") or {}
    return {
        "round": record["round"],
        "eval_loss": record.get("eval_loss"),
        **{key: (groups.get(group) or {}).get(rate) for key, (group, rate) in _ROUND_MEMORIZATION.items()},
    }


def _summarize_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """What a run's result keeps of its federation's report.json."""
    rounds = [r for r in report.get("rounds", []) if r.get("round", 1) >= 1]
    eval_loss = _final(rounds, "eval_loss")
    return {
        "aggregation": report.get("aggregation"),
        "rounds_completed": len(rounds),
        "rounds": [_round_curve(r) for r in rounds],
        "eval_loss": eval_loss,
        "perplexity": _perplexity(eval_loss),
        "base_eval_loss": report.get("base_eval_loss"),
        "base_perplexity": _perplexity(report.get("base_eval_loss")),
        "train_loss": _final(rounds, "train_loss"),
        "epsilon": _final(rounds, "epsilon"),
        "delta": _final(rounds, "delta"),
        "upload_bytes": sum(int(r.get("upload_bytes") or 0) for r in report.get("rounds", [])),
        "download_bytes": sum(int(r.get("download_bytes") or 0) for r in report.get("rounds", [])),
        "adapter_path": report.get("adapter_path"),
    }


def _parameter_counts(report: Mapping[str, Any], base_model: Path) -> dict[str, Any]:
    """Trainable and total parameters as `fedlora-lab plan` counts them, for what the coordinator ran (its
    report's mode, aggregation and LoRA): every parameter under mode full, the adapter (B alone under
    FFA) otherwise; the total is the base's, so the fraction is the planner's."""
    lora = report.get("lora")
    spec = None if not lora else LoraSpec(rank=lora["rank"], alpha=lora["alpha"], target_modules=lora["targets"])
    plan = capacity(str(base_model), mode=report["mode"], lora=spec, aggregation=report["aggregation"])
    return {
        "trainable_parameters": plan.trainable,
        "total_parameters": plan.parameters,
        "trainable_fraction": plan.trainable_fraction,
    }


def _clear(out_dir: Path) -> None:
    """Remove what an earlier attempt of this run left, so nothing stale is mistaken for its outcome."""
    for stale in ("result.json", "report.json", "report.md", "report.html", "audit"):
        target = out_dir / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def execute_run(config: ExperimentConfig, run: PlannedRun, base_model: Path) -> dict[str, Any]:
    """One federation, then the audit of its final model at every site; the outcome is in the result."""
    method = run.method
    result: dict[str, Any] = {
        "method": method.name,
        "label": method.display,
        "seed": run.seed,
        "mode": method.mode,
        "lora_rank": method.lora_rank,
        "secure_aggregation": method.secure_aggregation,
        "privacy": method.privacy,
        "fingerprint": config.fingerprint(method, run.seed),
        "out_dir": str(run.out_dir),
        "status": "failed",
        "error": None,
        "exit_codes": {},
        "memorization": None,
        "memorization_by_site": {},
    }
    _clear(run.out_dir)
    if not run.audited:
        config = config.model_copy(update={"audit": config.audit.model_copy(update={"every": None})})
    plan = federation_plan(config, method, run.seed, out_dir=run.out_dir, base_model=base_model)
    started = time.monotonic()
    deadline = started + plan.timeout.total_seconds() * 2
    try:
        federation = run_federation(plan, engine=config.engine, cores=simulation_cores(config))
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
    try:
        result.update(_parameter_counts(federation.report, base_model))
    except (KeyError, ValueError, OSError) as exc:  # the counts are context; the run's outcome stands
        result["parameter_count_error"] = f"{type(exc).__name__}: {exc}"
    if not run.audited:
        result["status"] = "ok"
        return result
    final_model, base_dir = federation.out_dir / adapter_path, run.out_dir / "base-model"
    if method.mode == "full":
        base, adapter = with_tokenizer(final_model, base_dir, run.out_dir / "audit" / "final-model"), None
    else:
        base, adapter = base_dir, final_model
    audit_started = time.monotonic()
    try:
        by_site = {
            site: audit_site(run.out_dir, site, base, adapter, config.audit, deadline)
            for site, _ in site_names(config.federation.sites)
        }
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        result["error"] = f"audit failed: {exc}"
        result["audit_duration_s"] = time.monotonic() - audit_started
        return result
    result["memorization_by_site"] = {site: summary.to_json() for site, summary in by_site.items()}
    result["memorization"] = combine_summaries(list(by_site.values())).to_json()
    second = config.audit.second_frequency_penalty
    if second is not None:
        try:
            again = [
                audit_site(run.out_dir, site, base, adapter, config.audit, deadline, frequency_penalty=second)
                for site, _ in site_names(config.federation.sites)
            ]
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
            result["error"] = f"audit with frequency penalty {second:g} failed: {exc}"
            result["audit_duration_s"] = time.monotonic() - audit_started
            return result
        result["second_decoding"] = {"frequency_penalty": second, "memorization": combine_summaries(again).to_json()}
    result["audit_duration_s"] = time.monotonic() - audit_started
    result["status"] = "ok"
    return result
