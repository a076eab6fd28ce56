"""Members that send well-formed lies, over the real wire, against a coordinator that must not stall.

Model-free sites (tests/sites.py) take part through the worker's real transport; one of them lies in one
step of secure aggregation, as a compromised or broken institution would. The coordinator names the liar,
and the honest sites' round commits: at once when the honest shares suffice, else on the retry without it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from fedlora_common.secagg import (
    SEALED_SHARE_BYTES,
    Advertisement,
    EncryptedShare,
    KeyPair,
    RevealedShare,
    Share,
    dequantize_sum,
    identity_keypair,
)
from fedlora_server.config import RunSettings
from fedlora_server.server import CoordinatorServer
from fedlora_server.store import RoundRecord
from fedlora_worker.coordinator import Misconfigured
from fedlora_worker.secagg_session import WorkerSession
from tests.server.conftest import ADAPTER_CONFIG, MANIFEST, initial_vector, run_settings, token_of
from tests.sites import Model, Site, make_sites, run_sites

MODEL = Model("test-run", MANIFEST, initial_vector(), ADAPTER_CONFIG)
EXAMPLES = {"clinical": 100, "finance": 300, "legal": 600}


class LyingRevealer(Site):
    """Reveals a share of a peer's self-mask seed at the right x with a wrong y."""

    def revealed_shares(
        self, session: WorkerSession, survivors: Sequence[str], dropped: Sequence[str]
    ) -> list[RevealedShare]:
        honest = session.reveal(survivors, dropped)
        victim = next(w for w in survivors if w != self.worker)
        return [
            RevealedShare(r.owner, r.kind, Share(Share.from_bytes(r.share).x, 424242).to_bytes())
            if (r.owner, r.kind) == (victim, "self_seed")
            else r
            for r in honest
        ]


class SilencingSender(Site):
    """Seals legal a share of the right length that no key opens, to have legal drop out of every round."""

    def sealed_shares(self, session: WorkerSession, roster: Sequence[Advertisement]) -> list[EncryptedShare]:
        return [
            EncryptedShare(s.sender, s.recipient, os.urandom(SEALED_SHARE_BYTES)) if s.recipient == "legal" else s
            for s in session.share_keys(roster)
        ]


def _settings(tmp_path: Path, identities: dict[str, KeyPair], **overrides: Any) -> RunSettings:
    plain = run_settings(tmp_path)
    workers = [
        {"id": w.id, "token_sha256": w.token_sha256, "identity_public": identities[w.id].public.hex()}
        for w in plain.workers
        if w.id in identities
    ]
    values: dict[str, Any] = {
        "rounds": 1,
        "min_workers": 2,
        "workers": workers,
        "secure_aggregation": {"enabled": True, "clip_range": 1.0},
        "timeouts": {"poll_wait_ms": 20},
        **overrides,
    }
    return run_settings(tmp_path, **values)


@dataclass(frozen=True)
class Outcome:
    """What a test reads of a finished secure round."""

    sites: list[Site]
    errors: dict[str, BaseException]
    rounds: list[RoundRecord]
    left: dict[str, str]
    committed: np.ndarray
    failure: str | None
    excluded_total: float | None


def _federate(
    tmp_path: Path,
    kinds: dict[str, type[Site]],
    *,
    keys_of: dict[str, str] | None = None,
    examples: dict[str, int] = EXAMPLES,
) -> Outcome:
    """Run one secure round with the sites of `examples` (all on the allow-list), of the given kinds; `keys_of`
    gives a site another's identity key."""
    identities = {w: identity_keypair() for w in examples}
    settings = _settings(tmp_path, identities)
    with CoordinatorServer(settings=settings) as server:
        sites = make_sites(
            server.port,
            MODEL,
            examples,
            token_of=token_of,
            identities=identities,
            kinds=kinds,
            chunk_bytes=settings.limits.chunk_bytes,
        )
        for site in sites:
            other = (keys_of or {}).get(site.worker)
            if other is not None:
                site.identities[site.worker] = identities[other]
        errors = run_sites(sites)
        assert server.wait_finished(timedelta(seconds=30)), (errors, server._store.rounds())
        server.write_report()
        current = server.coordinator._versions.current
        assert current is not None
        return Outcome(
            sites,
            errors,
            server._store.rounds(),
            {w.worker_id: w.left_reason for w in server._store.workers()},
            current.vector,
            server.coordinator.failure,
            server.registry.get_sample_value("fedlora_excluded_workers_total"),
        )


def _is_the_mean_of(outcome: Outcome, workers: set[str]) -> None:
    sites = outcome.sites
    weights = np.array([s.examples for s in sites if s.worker in workers], dtype=np.float64)
    mean = np.average([s.delta for s in sites if s.worker in workers], axis=0, weights=weights)
    params = next(s.session.params for s in sites if s.session is not None)
    step = float(dequantize_sum(np.array([1], dtype=np.uint32), clip=params.clip_range, bits=params.bits)[0])
    bound = len(workers) * step * params.max_examples / weights.sum() + 1e-6
    assert np.abs(outcome.committed - (MODEL.initial + mean)).max() <= bound


def test_a_revealer_lying_about_a_share_is_named_and_the_round_still_commits_every_update_at_once(
    tmp_path: Path,
) -> None:
    # Execute: finance reveals a wrong share of another survivor's self-mask seed.
    outcome = _federate(tmp_path, {"finance": LyingRevealer})

    # Assert: one attempt; the honest shares rebuilt the seed, the sum holds all three updates, finance is named.
    assert outcome.errors == {}
    attempts = [(r.round, r.attempt, r.status, r.excluded) for r in outcome.rounds]
    assert attempts == [(0, 0, "completed", ()), (1, 1, "completed", ("finance",))]
    _is_the_mean_of(outcome, set(EXAMPLES))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rounds"][0]["excluded"] == ["finance"]
    assert outcome.excluded_total == 1


def test_a_sender_sealing_one_peer_an_unopenable_share_is_excluded_and_that_peer_is_in_the_committed_round(
    tmp_path: Path,
) -> None:
    # Execute: finance seals legal garbage of the right length, the targeted-exclusion attack.
    outcome = _federate(tmp_path, {"finance": SilencingSender})

    # Assert: legal proved it; finance sat out the retry, which committed clinical's and legal's updates.
    assert outcome.errors == {}
    legal = next(s for s in outcome.sites if s.worker == "legal")
    assert legal.complained == [("finance",)]
    rounds = [(r.round, r.attempt, r.status, r.participants, r.excluded) for r in outcome.rounds]
    assert rounds == [
        (0, 0, "completed", ("clinical", "finance", "legal"), ()),
        (1, 1, "failed", ("clinical", "finance", "legal"), ("finance",)),
        (1, 2, "completed", ("clinical", "legal"), ()),
    ]
    failure = next(r.failure for r in outcome.rounds if r.status == "failed")
    assert "finance sealed a share to legal that does not open" in failure
    _is_the_mean_of(outcome, {"clinical", "legal"})


def test_a_site_configured_with_another_sites_identity_key_leaves_saying_so_and_the_others_commit(
    tmp_path: Path,
) -> None:
    # Execute: legal signs its round keys with finance's identity key.
    outcome = _federate(tmp_path, {}, keys_of={"legal": "finance"})

    # Assert: legal stopped as misconfigured (the program exits 2) and told the coordinator why; the round
    # went on without it.
    assert set(outcome.errors) == {"legal"}
    assert isinstance(outcome.errors["legal"], Misconfigured)
    assert "identity_key" in str(outcome.errors["legal"])
    assert "identity_public" in outcome.left["legal"]
    assert outcome.failure is None
    last = outcome.rounds[-1]
    assert (last.round, last.status) == (1, "completed")
    _is_the_mean_of(outcome, {"clinical", "finance"})


def test_with_two_sites_the_silencing_attack_fails_the_run_naming_the_sender_instead_of_looping(tmp_path: Path) -> None:
    # Execute: two sites, finance silencing legal: without finance nobody is left to aggregate with.
    outcome = _federate(tmp_path, {"finance": SilencingSender}, examples={"finance": 300, "legal": 600})

    # Assert: one failed attempt that excluded finance, then the run failed saying why (it used to retry forever).
    assert [(r.attempt, r.status, r.excluded) for r in outcome.rounds if r.round == 1] == [(1, "failed", ("finance",))]
    assert outcome.failure is not None
    assert outcome.failure.startswith("round 1 cannot go on: 1 workers can take part once finance sit out")
