"""`fedlora-lab plan --site`: one row per site of its own rank, base precision and GPU, the run's bytes, and
rank=auto as the largest rank of 4, 8, 16, ... that fits; a bad --site is one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedlora_common.plans import LoraSpec
from fedlora_lab.plan import largest_fitting_rank, memory, meta_model, model_config, rank_ladder
from tests.lab import test_plan
from tests.lab.test_plan import ACTIVATIONS_WITHIN, run_plan, saved_bytes

comm, block_llama = test_plan.comm, test_plan.block_llama  # test_plan's fixtures: its three-block Llama on disk
Plan = dict[str, Any]


def plan_json(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> Plan:
    code, out, err = run_plan(capsys, "--model", str(config / "config.json"), "--seq-len", "256", *args, "--json")
    assert (code, err) == (0, "")
    plan: Plan = json.loads(out)
    return plan


def sites(plan: Plan) -> dict[str, Plan]:
    return {site["name"]: site for site in plan["sites"]}


def test_each_site_is_a_row_in_the_order_given_with_the_runs_bytes(
    capsys: pytest.CaptureFixture[str], block_llama: Path
) -> None:
    given = ["zeta:rank=8,precision=nf4", "alpha:rank=16,precision=bfloat16,gpu=8x80GiB", "mid:rank=4"]

    plan = plan_json(capsys, block_llama, "--rank", "16", "--aggregation", "hetlora", *(f"--site={s}" for s in given))

    assert [site["name"] for site in plan["sites"]] == ["zeta", "alpha", "mid"]
    assert [site["rank"] for site in plan["sites"]] == [8, 16, 4]
    assert [site["precision"] for site in plan["sites"]] == ["nf4", "bfloat16", "bfloat16"]  # lora's by default
    alpha = sites(plan)["alpha"]
    assert (alpha["gpus"], alpha["gpu_bytes"], alpha["fits"]) == (8, 80 * 2**30, True)
    assert sites(plan)["zeta"]["fits"] is None  # no GPU stated
    assert alpha["peak_bytes"] == plan["memory"]["peak"]  # the run's rank and the mode's precision: the run's peak
    for site in plan["sites"]:  # the wire carries the run's rank-16 layout whatever a site trains
        assert (site["down_bytes"], site["up_plain_bytes"], site["up_masked_bytes"]) == (
            plan["down_bytes"],
            plan["up_plain_bytes"],
            plan["up_masked_bytes"],
        )
    assert plan["secure_aggregation"]["sites"] == 3  # the --site count


def test_the_table_prints_a_row_per_site(capsys: pytest.CaptureFixture[str], block_llama: Path) -> None:
    args = ["--model", str(block_llama / "config.json"), "--rank", "16", "--aggregation", "hetlora"]

    code, out, _ = run_plan(capsys, *args, "--site", "big:rank=16,gpu=8x80GiB", "--site", "small:rank=4,precision=nf4")

    assert code == 0
    rows = out[out.index("per site:") :].splitlines()
    assert rows[1].split()[:3] == ["site", "rank", "precision"]
    assert rows[2].split()[:3] == ["big", "16", "bfloat16"]
    assert "8 x 80.00 GiB  yes" in rows[2]
    assert rows[3].split()[:3] == ["small", "4", "nf4"]


def test_without_sites_the_plan_has_none(capsys: pytest.CaptureFixture[str], block_llama: Path) -> None:
    plan = plan_json(capsys, block_llama)
    code, table, _ = run_plan(capsys, "--model", str(block_llama / "config.json"))

    assert "sites" not in plan
    assert code == 0
    assert "per site:" not in table


def test_a_bigger_rank_needs_more_memory_and_nf4_less_than_bfloat16_less_than_float32(
    capsys: pytest.CaptureFixture[str], block_llama: Path
) -> None:
    given = [
        "r4:rank=4,precision=bfloat16",
        "r16:rank=16,precision=bfloat16",
        "nf4:rank=16,precision=nf4",
        "f32:rank=16,precision=float32",
    ]

    peaks = {
        name: site["peak_bytes"]
        for name, site in sites(
            plan_json(capsys, block_llama, "--rank", "16", "--aggregation", "hetlora", *(f"--site={s}" for s in given))
        ).items()
    }

    assert peaks["r4"] < peaks["r16"]
    assert peaks["nf4"] < peaks["r16"] < peaks["f32"]


def test_checkpointing_lowers_every_sites_peak(capsys: pytest.CaptureFixture[str], block_llama: Path) -> None:
    args = ["--site", "one:precision=nf4", "--site", "two:precision=float32"]

    plain = sites(plan_json(capsys, block_llama, *args))
    checkpointed = sites(plan_json(capsys, block_llama, *args, "--gradient-checkpointing"))

    assert all(checkpointed[name]["peak_bytes"] < plain[name]["peak_bytes"] for name in plain)
    assert all(site["checkpointing"] for site in checkpointed.values())


def test_rank_auto_picks_the_largest_rank_that_fits_the_gpu(
    capsys: pytest.CaptureFixture[str], block_llama: Path
) -> None:
    run = ["--rank", "32", "--aggregation", "hetlora"]
    explicit = sites(plan_json(capsys, block_llama, *run, "--site", "r8:rank=8", "--site", "r16:rank=16"))
    between = (explicit["r8"]["peak_bytes"] + explicit["r16"]["peak_bytes"]) // 2

    plan = plan_json(
        capsys, block_llama, *run, "--site", f"auto:rank=auto,gpu={between}B", "--site", "roomy:rank=auto,gpu=1TiB"
    )

    auto, roomy = sites(plan)["auto"], sites(plan)["roomy"]
    assert (auto["rank"], auto["auto_rank"], auto["fits"]) == (8, True, True)
    assert auto["peak_bytes"] == explicit["r8"]["peak_bytes"]
    assert (roomy["rank"], roomy["fits"]) == (32, True)  # the run's rank, no more


def test_rank_auto_without_hetlora_is_the_runs_rank_fitting_or_not(
    capsys: pytest.CaptureFixture[str], block_llama: Path
) -> None:
    plan = plan_json(capsys, block_llama, "--site", "roomy:rank=auto,gpu=1TiB", "--site", "tiny:rank=auto,gpu=1MiB")

    roomy, tiny = sites(plan)["roomy"], sites(plan)["tiny"]
    assert (roomy["rank"], roomy["fits"]) == (16, True)  # fedavg: every site trains the run's rank
    assert (tiny["rank"], tiny["fits"]) == (16, False)


def test_the_ladder_offers_powers_of_two_from_4_up_to_the_runs_rank() -> None:
    peak = {4: 10, 8: 20, 16: 40, 32: 80, 64: 160}.__getitem__

    assert rank_ladder(64) == (64, 32, 16, 8, 4)
    assert rank_ladder(24) == (16, 8, 4)
    assert rank_ladder(2) == (2,)
    assert largest_fitting_rank(64, 50, peak) == 16
    assert largest_fitting_rank(24, 1000, peak) == 16
    assert largest_fitting_rank(64, 9, peak) is None


def test_rank_auto_that_nothing_fits_shows_the_least_rank_not_fitting(
    capsys: pytest.CaptureFixture[str], block_llama: Path
) -> None:
    plan = plan_json(capsys, block_llama, "--aggregation", "hetlora", "--site", "tiny:rank=auto,gpu=1MiB")

    assert (sites(plan)["tiny"]["rank"], sites(plan)["tiny"]["fits"]) == (4, False)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_float32_base_counts_what_autograd_keeps(block_llama: Path, checkpointing: bool) -> None:
    lora = LoraSpec(rank=8, dropout=0.0)
    name, config = model_config(str(block_llama))
    planned = memory(
        meta_model(name, config, "lora", lora, "fedavg"), "lora", lora, seq_len=512, micro_batch=1, precision="float32"
    )

    counted = saved_bytes(block_llama, "lora", lora, tokens=512, checkpointing=checkpointing, dtype="float32")

    estimate = planned.activations_checkpointed if checkpointing else planned.activations
    assert counted * (1 - ACTIVATIONS_WITHIN) <= estimate <= counted * (1 + ACTIVATIONS_WITHIN)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--site", "nocolon"], "--site nocolon: expected NAME:"),
        (["--site", ":rank=4"], "expected NAME:"),
        (["--site", "a:rank=four"], "--site a: rank=four is neither a whole number"),
        (["--site", "a:precision=fp8"], "--site a: precision=fp8 is not one of nf4, bfloat16, float32"),
        (["--site", "a:gpu=lots"], "--site a: gpu=lots is not a card's memory"),
        (["--site", "a:colour=red"], "--site a: 'colour=red' is not one of rank=, precision=, gpu="),
        (["--site", "a:rank=4,rank=8"], "(each once)"),
        (["--site", "a:rank=32"], "--site a: rank 32 exceeds the run's --rank 16"),
        (["--site", "a:rank=8"], "--site a: rank 8 is below the run's 16, which only --aggregation hetlora"),
        (["--aggregation", "hetlora", "--site", "a:rank=auto"], "--site a: rank=auto needs gpu="),
        (["--site", "a:rank=16", "--site", "a:rank=16"], "--site: a given more than once"),
        (["--mode", "full", "--site", "a:precision=float32"], "--site: a site's rank and base precision are LoRA's"),
    ],
)
def test_a_bad_site_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], block_llama: Path, args: list[str], named: str
) -> None:
    code, out, err = run_plan(capsys, "--model", str(block_llama / "config.json"), "--rank", "16", *args)

    assert code == 2
    assert out == ""
    assert err.startswith("fedlora-lab plan: error: ")
    assert named in err
    assert err.count("\n") == 1


def test_a_hetlora_masked_update_carries_a_weight_per_rank_and_one_for_the_rest(
    capsys: pytest.CaptureFixture[str], block_llama: Path
) -> None:
    rate = ["--sites", "2", "--keystream-mbps", "1000"]

    fedavg = plan_json(capsys, block_llama, "--rank", "8", *rate)
    hetlora = plan_json(capsys, block_llama, "--rank", "8", "--aggregation", "hetlora", *rate)

    assert hetlora["trainable"] == fedavg["trainable"]
    masked = 4 * (hetlora["trainable"] + 1 + 8)  # blocks.block_groups: group 0, then one group per rank index
    assert hetlora["secure_aggregation"]["masking_s"] == pytest.approx(2 * masked / 1e9)
    assert hetlora["up_masked_bytes"] > fedavg["up_masked_bytes"]
