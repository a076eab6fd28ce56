"""The round plans the coordinator hands out: the learning-rate schedule's place of each round."""

from __future__ import annotations

from pathlib import Path

from fedlora_server.planning import RoundPlans
from tests.server.conftest import run_settings


def test_each_round_takes_the_next_stretch_of_one_run_long_schedule(tmp_path: Path) -> None:
    settings = run_settings(
        tmp_path,
        rounds=4,
        training={"local_steps": 5, "lr_schedule": "cosine", "warmup_steps": 3, "micro_batch_size": 2},
    )
    plans = RoundPlans(settings, None)

    rounds = [plans.training(r) for r in range(1, 5)]

    assert [(p.schedule_start, p.schedule_steps) for p in rounds] == [(0, 20), (5, 20), (10, 20), (15, 20)]
    assert {(p.lr_schedule, p.warmup_steps, p.micro_batch_size) for p in rounds} == {("cosine", 3, 2)}


def test_a_retried_round_and_the_evaluation_of_the_base_get_the_same_plans_again(tmp_path: Path) -> None:
    plans = RoundPlans(run_settings(tmp_path, training={"local_steps": 5}), None)

    assert plans.training(2) == plans.training(2)  # an attempt's plan follows from the round alone
    assert (plans.training(0).schedule_start, plans.training(0).schedule_steps) == (0, 10)
