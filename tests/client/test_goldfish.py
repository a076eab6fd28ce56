from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from pydantic import ValidationError

from fedlora_common.plans import GoldfishPlan, LoraSpec, TrainingPlan
from fedlora_worker import training
from fedlora_worker.data import TokenizedData
from fedlora_worker.goldfish import goldfish_mask
from fedlora_worker.modeling import LoadedModel
from fedlora_worker.training import train_locally

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def random_ids(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50_000, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [2, 4, 8])
def test_about_one_in_k_tokens_is_dropped(k: int) -> None:
    h = 13
    ids = random_ids(64, 1024 + h)

    mask = goldfish_mask(ids, GoldfishPlan(k=k, h=h, seed=0))

    dropped = float((~mask[:, h:]).float().mean())
    n = 64 * 1024
    # Each drop is a Bernoulli(1/k) trial when the hash is uniform: 5 binomial sigmas (~0.009 at
    # k = 4) fail a correct hash once in ~2 million runs, while a bias of 1/(2k) is many sigmas out.
    assert abs(dropped - 1 / k) < 5 * math.sqrt((1 / k) * (1 - 1 / k) / n)


def test_the_mask_is_pinned_across_processes_and_versions() -> None:
    # Computed once with splitmix64 chaining; Python's salted hash() would change it every run.
    ids = torch.arange(100, 140).unsqueeze(0)

    mask = goldfish_mask(ids, GoldfishPlan(k=4, h=3, seed=0))

    assert (~mask[0]).nonzero().flatten().tolist() == [7, 16, 20, 21, 35, 36]


def test_a_sequence_is_masked_the_same_every_time_and_in_every_row() -> None:
    sequence = random_ids(1, 300, seed=1)[0]
    batch = random_ids(5, 300, seed=2)
    batch[3] = sequence

    alone = goldfish_mask(sequence.unsqueeze(0), GoldfishPlan(k=3, h=5, seed=7))
    again = goldfish_mask(sequence.unsqueeze(0), GoldfishPlan(k=3, h=5, seed=7))
    in_batch = goldfish_mask(batch, GoldfishPlan(k=3, h=5, seed=7))

    assert torch.equal(alone, again)
    assert torch.equal(in_batch[3], alone[0])


def test_changing_a_token_changes_the_mask_only_in_the_h_positions_after_it() -> None:
    h, j = 6, 40
    ids = random_ids(1, 100, seed=3)
    edited = ids.clone()
    edited[0, j] += 1

    before = goldfish_mask(ids, GoldfishPlan(k=2, h=h, seed=0))[0]
    after = goldfish_mask(edited, GoldfishPlan(k=2, h=h, seed=0))[0]

    changed = (before != after).nonzero().flatten().tolist()
    assert changed
    assert all(j + 1 <= t <= j + h for t in changed)


def test_the_first_h_positions_always_count() -> None:
    ids = random_ids(200, 30, seed=4)

    mask = goldfish_mask(ids, GoldfishPlan(k=2, h=9, seed=0))

    assert mask[:, :9].all()
    assert not mask[:, 9:].all()


def test_a_sequence_no_longer_than_h_is_kept_whole() -> None:
    assert goldfish_mask(random_ids(2, 13), GoldfishPlan(k=2, h=13)).all()


def test_a_different_seed_drops_different_tokens() -> None:
    ids = random_ids(4, 200, seed=5)

    assert not torch.equal(goldfish_mask(ids, GoldfishPlan(seed=0)), goldfish_mask(ids, GoldfishPlan(seed=1)))


@pytest.mark.parametrize(("k", "h", "name"), [(1, 13, "k"), (0, 13, "k"), (4, 0, "h"), (4, -1, "h")])
def test_bad_k_or_h_is_rejected_naming_the_field(k: int, h: int, name: str) -> None:
    with pytest.raises(ValidationError, match=rf"(?m)^{name}\n  Input should be greater than or equal to"):
        GoldfishPlan(k=k, h=h)


def test_goldfish_training_leaves_the_masked_tokens_out_of_the_loss(
    load_tiny: Callable[..., LoadedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load_tiny("lora", lora=LoraSpec(rank=4))
    rows = random_ids(8, 64, seed=6).remainder(500).add(3).tolist()
    data = TokenizedData(input_ids=rows, labels=[list(r) for r in rows])
    counts: list[int] = []
    token_losses = training.token_losses

    def spy(
        logits: torch.Tensor, labels: torch.Tensor, *, loss_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        losses, counted = token_losses(logits, labels, loss_mask=loss_mask)
        counts.append(int(counted.sum()))
        return losses, counted

    monkeypatch.setattr(training, "token_losses", spy)
    plain = TrainingPlan(local_steps=4, batch_size=4, learning_rate=1e-3, grad_clip_norm=1.0, seed=0)
    goldfish = GoldfishPlan(k=2, h=2, seed=0)

    train_locally(loaded.model, data, plain, pad_id=loaded.pad_id)
    train_locally(
        loaded.model, data, TrainingPlan(**{**plain.model_dump(), "goldfish": goldfish}), pad_id=loaded.pad_id
    )

    everything, kept = counts[:4], counts[4:]
    assert everything == [4 * 63] * 4
    # Four batches of four are two epochs over the eight rows: each row's kept targets count twice.
    assert sum(kept) == 2 * int(goldfish_mask(torch.tensor(rows), GoldfishPlan(k=2, h=2))[:, 1:].sum())
    # 61 of each row's 63 targets are hashed at k = 2: about half of them drop.
    assert all(0.35 < n / (4 * 63) < 0.65 for n in kept)
