"""The experiment report's comparisons: reduction factors with a bootstrap interval, per-round curves,
and each run's trainable parameters."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from fedlora_lab.experiment import write_experiment_report
from fedlora_lab.experiment.execute import _parameter_counts, _summarize_report
from fedlora_lab.experiment.summary import (
    BOOTSTRAP_SEED,
    format_factor,
    reduction_factor,
    reduction_factors,
    round_curves,
)
from tests.lab.test_experiment import _synthetic_results

FULL = [0.6, 0.4, 0.5]
LORA = [0.1, 0.05, 0.15]


def _rng() -> np.random.Generator:
    return np.random.default_rng(BOOTSTRAP_SEED)


# --------------------------------------------------------------------------- reduction factor


def test_factor_is_the_ratio_of_mean_rates_inside_its_bootstrap_interval() -> None:
    factor = reduction_factor(FULL, LORA, trials=30, rng=_rng())

    assert factor.factor == pytest.approx(np.mean(FULL) / np.mean(LORA))
    assert factor.factor == pytest.approx(5.0)
    assert factor.low is not None
    assert factor.high is not None
    # a ratio of resampled means lies between the most extreme ratios of single seeds
    assert min(FULL) / max(LORA) <= factor.low < factor.factor < factor.high <= max(FULL) / min(LORA)
    assert (factor.n_reference, factor.n_method, factor.lower_bound) == (3, 3, None)
    assert format_factor(factor) == f"5.00 [{factor.low:.2f}, {factor.high:.2f}]"


def test_the_same_inputs_and_seed_give_the_same_interval() -> None:
    first = reduction_factor(FULL, LORA, trials=30, rng=_rng())
    again = reduction_factor(FULL, LORA, trials=30, rng=_rng())
    results = _synthetic_results()

    assert first == again
    assert reduction_factors(results) == reduction_factors(results)


def test_a_method_that_extracted_nothing_has_a_lower_bound_from_the_rule_of_three() -> None:
    trials = 30

    factor = reduction_factor(FULL, [0.0, 0.0, 0.0], trials=trials, rng=_rng())

    expected = np.mean(FULL) / (3 / trials)
    assert factor.factor is None
    assert (factor.low, factor.high) == (None, None)
    assert factor.lower_bound == pytest.approx(expected)
    assert format_factor(factor) == f"> {expected:.2f} (0 of {trials})"


def test_resamples_that_extracted_nothing_make_the_upper_end_infinite() -> None:
    # P(a resample of three seeds draws only the two zeros) = (2/3)^3, far above 2.5%
    factor = reduction_factor(FULL, [0.0, 0.0, 0.3], trials=30, rng=_rng())

    assert factor.factor == pytest.approx(5.0)
    assert factor.low is not None
    assert 0 < factor.low < 5.0
    assert factor.high == math.inf
    assert format_factor(factor).endswith(", ∞]")


def test_one_seed_gives_a_factor_without_an_interval() -> None:
    factor = reduction_factor(FULL, [0.1], trials=10, rng=_rng())

    assert factor.factor == pytest.approx(5.0)
    assert (factor.low, factor.high, factor.n_method) == (None, None, 1)
    assert format_factor(factor) == "5.00 (n=1)"


def test_nothing_extracted_anywhere_has_no_factor() -> None:
    factor = reduction_factor([0.0, 0.0], [0.0, 0.0], trials=20, rng=_rng())

    assert (factor.factor, factor.lower_bound) == (None, None)
    assert format_factor(factor) == "—"


def test_every_method_is_compared_with_full_fine_tuning_on_its_successful_seeds() -> None:
    results = _synthetic_results()  # full: 0.5, 0.6, 0.7; lora-r4: 0 x 3 (10 canaries each); lora-r16: 0.1, 1 ok

    factors = {f.name: f for f in reduction_factors(results)}

    assert set(factors) == {"lora-r4", "lora-r16"}
    assert factors["lora-r4"].reference == "Full fine-tuning"
    r4 = factors["lora-r4"].factors["exact_match_rate"]
    assert (r4.factor, r4.trials, r4.n_reference, r4.n_method) == (None, 30, 3, 3)
    assert r4.lower_bound == pytest.approx(0.6 / (3 / 30))
    r16 = factors["lora-r16"].factors["approx_match_rate"]
    assert r16.factor == pytest.approx(0.6 / 0.1)
    assert r16.n_method == 1


def test_without_a_full_fine_tuning_method_there_are_no_factors() -> None:
    results = _synthetic_results()
    results["methods"] = [{**m, "mode": "lora"} for m in results["methods"]]

    assert reduction_factors(results) == []


# --------------------------------------------------------------------------- per-round curves


def _rates(exact: float, exposure: float) -> dict[str, Any]:
    return {
        "count": 6,
        "exact_match_rate": exact,
        "approx_match_rate": exact + 0.1,
        "token_accuracy": 0.5,
        "pii_extraction_rate": 0.0,
        "mean_exposure": exposure,
    }


def test_each_round_keeps_its_loss_and_the_audit_of_the_10x_canaries_and_controls() -> None:
    audited = {"exact_match_rate": 0.2, "sites": 2, "by_duplication": {"10x": _rates(0.25, 4.0), "control": None}}
    report = {
        "aggregation": "ffa",
        "rounds": [
            {"round": 1, "eval_loss": 2.5, "train_loss": 2.7, "memorization": None},
            {"round": 2, "eval_loss": 2.1, "train_loss": 2.2, "memorization": audited},
        ],
    }

    summary = _summarize_report(report)

    assert summary["aggregation"] == "ffa"
    assert summary["rounds"] == [
        {
            "round": 1,
            "eval_loss": 2.5,
            "exact_match_10x": None,
            "approx_match_10x": None,
            "exposure_10x": None,
            "exposure_control": None,
            "canaries_10x": None,
        },
        {
            "round": 2,
            "eval_loss": 2.1,
            "exact_match_10x": 0.25,
            "approx_match_10x": 0.35,
            "exposure_10x": 4.0,
            "exposure_control": None,
            "canaries_10x": 6,
        },
    ]


def test_round_curves_average_each_round_over_the_successful_seeds() -> None:
    curves = {c.name: c for c in round_curves(_synthetic_results())}

    full = curves["full"].points
    assert [p.round for p in full] == [1, 2]
    assert full[0].eval_loss == pytest.approx(np.mean([2.4, 2.5, 2.6]))
    assert full[0].exact_match_10x is None
    assert full[1].exact_match_10x == pytest.approx(0.6)
    assert full[1].exposure_10x == pytest.approx(1.0 + 4 * 0.6)
    assert curves["lora-r16"].points[1].eval_loss == pytest.approx(2.0)  # the failed seed is not averaged in


# --------------------------------------------------------------------------- trainable parameters


@pytest.fixture
def tiny_llama(tmp_path: Path) -> tuple[Path, LlamaConfig]:
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    config.save_pretrained(tmp_path)
    return tmp_path, config


@pytest.mark.parametrize("aggregation", ["fedavg", "ffa"])
def test_trainable_parameters_are_the_adapter_or_its_b_matrices_under_ffa(
    tiny_llama: tuple[Path, LlamaConfig], aggregation: str
) -> None:
    path, config = tiny_llama
    rank = 4
    hidden, kv = config.hidden_size, config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    report = {
        "mode": "lora",
        "aggregation": aggregation,
        "lora": {"rank": rank, "alpha": 8, "targets": ["q_proj", "v_proj"]},
    }

    counts = _parameter_counts(report, path)

    modules = [(hidden, hidden), (hidden, kv)]  # (in, out) of q_proj and v_proj in every layer
    a = sum(rank * fan_in for fan_in, _ in modules) * config.num_hidden_layers
    b = sum(fan_out * rank for _, fan_out in modules) * config.num_hidden_layers
    total = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert counts["trainable_parameters"] == (b if aggregation == "ffa" else a + b)
    assert counts["total_parameters"] == total
    assert counts["trainable_fraction"] == pytest.approx(counts["trainable_parameters"] / total)


def test_full_fine_tuning_trains_every_parameter(tiny_llama: tuple[Path, LlamaConfig]) -> None:
    path, config = tiny_llama

    counts = _parameter_counts({"mode": "full", "aggregation": "fedavg", "lora": None}, path)

    assert counts["trainable_parameters"] == counts["total_parameters"]
    assert counts["total_parameters"] == sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert counts["trainable_fraction"] == 1.0


# --------------------------------------------------------------------------- report


def test_report_leads_with_the_main_table_and_the_reduction_factors(tmp_path: Path) -> None:
    results = _synthetic_results()
    r4 = next(f for f in reduction_factors(results) if f.name == "lora-r4").factors

    write_experiment_report(results, tmp_path)

    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert markdown.index("## Main results") < markdown.index("## Reduction factor (full / method)")
    assert markdown.index("## Reduction factor (full / method)") < markdown.index("## Utility and cost")
    assert "| method | aggregation | trainable % | runs ok | exact match 10x |" in markdown
    assert "| Full fine-tuning | fedavg | 100% | 3/3 |" in markdown
    assert "| LoRA r=4 | fedavg | 0.4% | 3/3 |" in markdown
    assert "| method | seeds (full, method) | exact match (10x) | approx match (10x) |" in markdown
    expected = (
        f"| LoRA r=4 | 3, 3 | {format_factor(r4['exact_match_rate'])} | {format_factor(r4['approx_match_rate'])} |"
    )
    assert expected in markdown
    assert "> 6.00 (0 of 30)" in markdown
    assert "compare methods at equal held-out loss" in markdown.lower()
    assert "](memorization_vs_loss_by_round.png)" in markdown
    assert "Secure aggregation check" not in markdown


def test_report_shows_the_secure_aggregation_check_when_results_have_one(tmp_path: Path) -> None:
    check = {
        "method": "lora-secagg",
        "seed": 0,
        "max_abs_diff": 1.5e-7,
        "bound": 1e-5,
        "within_bound": True,
        "rounds_compared": 3,
    }

    write_experiment_report({**_synthetic_results(), "secagg_check": check}, tmp_path)

    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "## Secure aggregation check" in markdown
    assert "| lora-secagg | 0 | 3 | 1.5e-07 | 1e-05 | yes |" in markdown
