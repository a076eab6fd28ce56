"""Secure aggregation changes who sees an update, not what the federation learns: the one-seed check.

One method at one seed runs twice for a few rounds, in the clear and masked (Bonawitz et al.), and
the two committed models are compared coordinate by coordinate. Each site quantizes its weighted
update (w_i / M) * delta_i with stochastic rounding to a step of clip_range / (2**(bits-1) - 1); the
coordinator divides the dequantized sum by sum_i w_i / M, so after one round no coordinate can differ
by more than n * step * M / sum_i w_i, plus float32 rounding of the values themselves. Later rounds
train from two models that already differ by that much, so only round 1 is held to the bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from fedlora_common.secagg import max_bits, quantization_step
from fedlora_lab.engines import run_federation
from fedlora_lab.experiment.config import ExperimentConfig, coordinator_settings, federation_plan
from fedlora_lab.federation import FederationPlan, site_names

__all__ = ["compare_models", "quantization_bound", "run_secagg_check"]

_FLOAT32_ULPS = 4  # float32 sum, cast and add on either side of the comparison


def _tensors(model_dir: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(path)))
    if not out:
        raise ValueError(f"{model_dir}: no safetensors files")
    return out


def compare_models(plain: Mapping[str, np.ndarray], secure: Mapping[str, np.ndarray]) -> tuple[float, float]:
    """(max |plain - secure|, max |value|) over every coordinate; the two must hold the same tensors."""
    if plain.keys() != secure.keys():
        raise ValueError(f"the models hold different tensors: {sorted(set(plain) ^ set(secure))[:4]}")
    diff = max(float(np.abs(plain[k].astype(np.float64) - secure[k].astype(np.float64)).max()) for k in plain)
    largest = max(float(np.abs(plain[k]).max()) for k in plain)
    return diff, largest


def quantization_bound(*, sites: int, clip_range: float, bits: int, max_examples: int, examples: int) -> float:
    """The most one coordinate of a securely aggregated mean can differ from the plain mean after one round."""
    return sites * quantization_step(clip_range, bits) * max_examples / examples


def _site_examples(out_dir: Path, sites: int) -> int:
    """What the workers weigh their updates by: the records in each site's training file."""
    total = 0
    for site, _ in site_names(sites):
        lines = (out_dir / "sites" / site / "train.jsonl").read_text(encoding="utf-8").splitlines()
        total += sum(1 for line in lines if line.strip())
    return total


def run_secagg_check(config: ExperimentConfig, out_dir: Path, base_model: Path) -> dict[str, Any]:
    """Run the configured method in the clear and masked; what they committed, compared against the bound."""
    check = config.secagg_check
    if check is None:
        raise ValueError("the experiment has no secagg_check")
    method = config.method(check.method)

    def plan(secure: bool) -> FederationPlan:
        base = federation_plan(config, method, check.seed, out_dir=out_dir, base_model=base_model)
        return dataclasses.replace(
            base,
            out_dir=out_dir / ("secure" if secure else "plain"),
            rounds=check.rounds,
            secure_aggregation=secure,
            run={k: v for k, v in base.run.items() if k != "audit"},  # the check compares models only
            run_id=f"secagg-check-{method.name}-{'secure' if secure else 'plain'}",
        )

    adapters: dict[bool, dict[str, np.ndarray]] = {}
    for secure in (False, True):
        federation = run_federation(plan(secure), engine=config.engine)
        failed = {who: code for who, code in federation.exit_codes.items() if code != 0}
        if failed or not federation.report.get("adapter_path"):
            raise RuntimeError(f"secagg check ({'secure' if secure else 'plain'} run) failed: {failed}")
        adapters[secure] = _tensors(federation.out_dir / federation.report["adapter_path"])
    settings = coordinator_settings(plan(True))
    sites = config.federation.sites
    bound = quantization_bound(
        sites=sites,
        clip_range=settings.secure_aggregation.clip_range,
        bits=settings.secure_aggregation.bits or max_bits(sites),
        max_examples=settings.max_examples,
        examples=_site_examples(out_dir / "secure", sites),
    )
    diff, largest = compare_models(adapters[False], adapters[True])
    bound += _FLOAT32_ULPS * float(np.finfo(np.float32).eps) * largest
    return {
        "method": method.name,
        "seed": check.seed,
        "rounds_compared": check.rounds,
        "max_abs_diff": diff,
        "bound": bound,
        "within_bound": diff <= bound if check.rounds == 1 else None,
    }
