"""Secure aggregation, both stage machines together without a network: exact sums under dropouts,
clean failure below the threshold, and refusal of every out-of-order step."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import pytest
from scipy import stats

from fedlora_common.secagg import (
    SEALED_SHARE_BYTES,
    Advertisement,
    Complaint,
    EncryptedShare,
    RevealedShare,
    SecAggParams,
    Share,
    StageError,
    agree,
    identity_keypair,
    max_bits,
    quantize,
    round_tag,
    seal_share_pair,
    share_associated_data,
)
from fedlora_server.errors import FailedPrecondition, InvalidArgument
from fedlora_server.secure_round import RoundFailed, SecureRound
from fedlora_worker.secagg_session import UnopenableShares, WorkerSession

STAGES = ("advertise", "share", "masked", "unmask")
NUMEL = 257


class Federation:
    """n worker sessions and one coordinator round, stepped by hand."""

    def __init__(self, n: int, *, seed: int = 0) -> None:
        self.ids = tuple(f"w{i:02d}" for i in range(n))
        identities = {w: identity_keypair() for w in self.ids}
        self.public = {w: k.public for w, k in identities.items()}
        self.params = SecAggParams(
            run_id="run",
            tag=round_tag(1, 1),
            participants=self.ids,
            threshold=SecAggParams.threshold_for(n, 2 / 3),
            bits=max_bits(n),
            clip_range=1.0,
            max_examples=1000,
        )
        self.sessions = {
            w: WorkerSession(
                worker_id=w, params=self.params, identity_private=identities[w].private, peer_identities=self.public
            )
            for w in self.ids
        }
        self.server = SecureRound(params=self.params, identities=self.public, numel=NUMEL)
        rng = np.random.default_rng(seed)
        self.plain = {
            w: quantize(rng.uniform(-1, 1, NUMEL).astype(np.float32), clip=1.0, bits=self.params.bits, rng=rng)
            for w in self.ids
        }

    def advertise_all(self) -> None:
        for w in self.ids:
            self.server.advertise(self.sessions[w].advertise())
        self.server.close_advertise()

    def share_all(self) -> None:
        for w in self.ids:
            self.server.submit_shares(w, self.sessions[w].share_keys(self.server.roster()))
        self.server.close_share()

    def mask_all(self) -> None:
        for w in self.ids:
            masked = self.sessions[w].mask(self.server.inbox(w), self.server.u2, self.plain[w])
            self.server.add_masked(w, masked, 0)
            self.server.close_masked_upload(w)
        self.server.close_masked()

    def run(self, drop: dict[str, int]) -> np.ndarray:
        """Drop `drop[stage]` workers (highest ids first) before they act in that stage; return the sum."""
        alive = list(self.ids)

        def lose(stage: str) -> None:
            for _ in range(drop.get(stage, 0)):
                alive.pop()

        lose("advertise")
        for w in alive:
            self.server.advertise(self.sessions[w].advertise())
        self.server.close_advertise()
        roster = self.server.roster()
        lose("share")
        for w in alive:
            self.server.submit_shares(w, self.sessions[w].share_keys(roster))
        self.server.close_share()
        lose("masked")
        for w in alive:
            masked = self.sessions[w].mask(self.server.inbox(w), self.server.u2, self.plain[w])
            self.server.check_masked_upload(w, masked.size)
            self.server.add_masked(w, masked, 0)
            self.server.close_masked_upload(w)
        self.server.close_masked()
        lose("unmask")
        for w in alive:
            self.server.submit_reveal(w, self.sessions[w].reveal(self.server.u3, self.server.dropped))
        total = self.server.finish()
        self.survivors = self.server.u3
        return total


def _plain_sum(fed: Federation, workers: tuple[str, ...]) -> np.ndarray:
    total = np.zeros(NUMEL, dtype=np.uint32)
    for w in workers:
        total += fed.plain[w]
    return total


CASES = [
    (n, stage, k)
    for n in (3, 5, 10)
    for stage in STAGES
    for k in sorted({0, 1, n - SecAggParams.threshold_for(n, 2 / 3)})
]


@pytest.mark.parametrize(("n", "stage", "dropouts"), CASES)
def test_the_secure_sum_equals_the_plain_sum_of_the_survivors(n: int, stage: str, dropouts: int) -> None:
    fed = Federation(n, seed=n * 100 + dropouts)

    total = fed.run({stage: dropouts})

    np.testing.assert_array_equal(total, _plain_sum(fed, fed.survivors))
    expected_survivors = n - dropouts if stage != "unmask" else n
    assert len(fed.survivors) == expected_survivors


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("n", [3, 5, 10])
def test_one_dropout_past_the_threshold_fails_the_round_cleanly(n: int, stage: str) -> None:
    fed = Federation(n)
    too_many = n - fed.params.threshold + 1

    with pytest.raises(RoundFailed, match="threshold"):
        fed.run({stage: too_many})
    assert fed.server.stage == "failed"


def test_a_worker_refuses_to_reveal_both_shares_of_one_peer() -> None:
    fed = Federation(3)
    fed.run({})
    other = Federation(3)
    for w in other.ids:
        other.server.advertise(other.sessions[w].advertise())
    other.server.close_advertise()
    for w in other.ids:
        other.server.submit_shares(w, other.sessions[w].share_keys(other.server.roster()))
    other.server.close_share()
    session = other.sessions["w00"]
    session.mask(other.server.inbox("w00"), other.server.u2, other.plain["w00"])

    with pytest.raises(StageError, match="both shares of w01"):
        session.reveal(("w00", "w01"), ("w01",))


def test_a_swapped_round_key_is_detected_by_the_workers() -> None:
    fed = Federation(3)
    ads = [fed.sessions[w].advertise() for w in fed.ids]
    forged_keys = fed.sessions["w02"]
    intruder = Federation(3).sessions["w02"].advertise()
    swapped = [
        ads[0],
        ads[1],
        Advertisement("w02", intruder.mask_public, ads[2].enc_public, ads[2].signature, ads[2].seed_commitment),
    ]

    with pytest.raises(StageError, match="bad signature on the keys of w02"):
        fed.sessions["w00"].share_keys(swapped)
    assert forged_keys.stage == "advertised"


def test_an_unknown_key_is_refused_by_the_workers() -> None:
    fed = Federation(3)
    ads = [fed.sessions[w].advertise() for w in fed.ids]
    stranger = Advertisement("mallory", ads[2].mask_public, ads[2].enc_public, ads[2].signature, ads[2].seed_commitment)

    with pytest.raises(StageError, match="unknown key"):
        fed.sessions["w00"].share_keys([ads[0], ads[1], stranger])


def test_a_share_addressed_to_another_worker_is_refused() -> None:
    fed = Federation(3)
    fed.advertise_all()
    fed.share_all()
    misrouted = fed.server.inbox("w01")

    with pytest.raises(StageError, match="addressed to w01"):
        fed.sessions["w00"].mask(misrouted, fed.server.u2, fed.plain["w00"])


def test_a_share_replayed_from_another_session_does_not_open() -> None:
    fed, old = Federation(3), Federation(3)
    for f in (fed, old):
        f.advertise_all()
        f.share_all()
    replayed = [EncryptedShare(s.sender, s.recipient, s.ciphertext) for s in old.server.inbox("w00")]

    with pytest.raises(UnopenableShares, match="do not open") as unopenable:
        fed.sessions["w00"].mask(replayed, fed.server.u2, fed.plain["w00"])
    assert unopenable.value.senders == ("w01", "w02")


def test_the_masked_upload_is_indistinguishable_from_uniform() -> None:
    fed = Federation(5, seed=7)
    big = np.zeros(1 << 16, dtype=np.uint32)
    fed.advertise_all()
    fed.share_all()

    masked = fed.sessions["w00"].mask(fed.server.inbox("w00"), fed.server.u2, big)

    # A plain all-zero update: without the other workers' masks, what the coordinator holds must look
    # uniform. 65,536 words in 256 bins of the top byte; chi-square p-value far from 0 (alpha 1e-6).
    counts = np.bincount(masked >> np.uint32(24), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-6
    low = np.bincount(masked & np.uint32(0xFF), minlength=256)
    assert stats.chisquare(low).pvalue > 1e-6
    assert len(np.unique(masked)) > 0.99 * masked.size


WORKER_STEPS: dict[str, Callable[[WorkerSession], object]] = {
    "advertise": lambda s: s.advertise(),
    "share": lambda s: s.share_keys([]),
    "mask": lambda s: s.mask([], (), np.zeros(1, dtype=np.uint32)),
    "reveal": lambda s: s.reveal((), ()),
    "complain": lambda s: s.complain(["w01"]),
}
WORKER_ALLOWED: dict[str, set[str]] = {
    "new": {"advertise"},
    "advertised": {"share"},
    "shared": {"mask", "complain"},
    "masked": {"reveal"},
    "revealed": set(),
    "complained": set(),
}


def _session_in(stage: str) -> tuple[Federation, WorkerSession]:
    fed = Federation(3)
    session = fed.sessions["w00"]
    if stage == "complained":
        fed.advertise_all()
        fed.share_all()
        session.complain(["w01"])
        return fed, session
    order = ["new", "advertised", "shared", "masked", "revealed"]
    if order.index(stage) >= 1:
        fed.advertise_all()
    if order.index(stage) >= 2:
        fed.share_all()
    if order.index(stage) >= 3:
        session.mask(fed.server.inbox("w00"), fed.server.u2, fed.plain["w00"])
    if order.index(stage) >= 4:
        session.reveal(fed.server.u2, ())
    assert session.stage == stage
    return fed, session


@pytest.mark.parametrize(
    ("stage", "step"),
    [(stage, step) for stage, allowed in WORKER_ALLOWED.items() for step in WORKER_STEPS if step not in allowed],
)
def test_every_invalid_worker_stage_transition_is_refused(stage: str, step: str) -> None:
    _, session = _session_in(stage)

    with pytest.raises(StageError, match=f"in stage '{stage}'"):
        WORKER_STEPS[step](session)
    assert session.stage == stage


SERVER_STEPS: dict[str, Callable[[Federation], object]] = {
    "advertise": lambda f: f.server.advertise(
        f.sessions["w00"].advertise()
        if f.sessions["w00"].stage == "new"
        else Advertisement("w00", b"\0" * 32, b"\0" * 32, b"", b"\0" * 32)
    ),
    "submit_shares": lambda f: f.server.submit_shares("w00", []),
    "inbox": lambda f: f.server.inbox("w00"),
    "roster": lambda f: f.server.roster(),
    "masked_upload": lambda f: f.server.check_masked_upload("w00", NUMEL),
    "submit_reveal": lambda f: f.server.submit_reveal("w00", []),
    "finish": lambda f: f.server.finish(),
    "complain": lambda f: f.server.complain("w00", Complaint(("w01",), f.sessions["w00"]._enc_keys.private)),
}
SERVER_ALLOWED = {
    "advertise": {"advertise"},
    "share": {"submit_shares", "roster"},
    "masked": {"inbox", "roster", "masked_upload", "complain"},
    "unmask": {"inbox", "roster", "submit_reveal", "finish"},
    "done": set(),
    "failed": set(),
}


def _server_in(stage: str) -> Federation:
    fed = Federation(3)
    if stage == "failed":
        with pytest.raises(RoundFailed):
            fed.server.close_advertise()
        return fed
    if stage == "done":
        fed.run({})
        return fed
    order = ["advertise", "share", "masked", "unmask"]
    if order.index(stage) >= 1:
        fed.advertise_all()
    if order.index(stage) >= 2:
        fed.share_all()
    if order.index(stage) >= 3:
        fed.mask_all()
    return fed


@pytest.mark.parametrize(
    ("stage", "step"),
    [(stage, step) for stage, allowed in SERVER_ALLOWED.items() for step in SERVER_STEPS if step not in allowed],
)
def test_every_invalid_coordinator_stage_transition_is_refused(stage: str, step: str) -> None:
    fed = _server_in(stage)

    with pytest.raises(FailedPrecondition):
        SERVER_STEPS[step](fed)
    assert fed.server.stage == stage


def test_the_threshold_tolerates_a_third_of_the_workers() -> None:
    assert [SecAggParams.threshold_for(n, 2 / 3) for n in (3, 5, 10, 30)] == [2, 4, 7, 20]
    assert all(n - SecAggParams.threshold_for(n, 2 / 3) >= math.floor(n / 3) for n in range(3, 50))


@pytest.mark.parametrize("length", [0, 1, 59, SEALED_SHARE_BYTES - 1, SEALED_SHARE_BYTES + 1])
def test_a_sealed_share_of_the_wrong_length_is_refused_where_it_arrives(length: int) -> None:
    # Prepare: w00's real shares, one of them cut (or padded) to `length` bytes.
    fed = Federation(3)
    fed.advertise_all()
    shares = fed.sessions["w00"].share_keys(fed.server.roster())
    cut = shares[0].ciphertext[:length].ljust(length, b"\0")
    broken = [EncryptedShare(shares[0].sender, shares[0].recipient, cut), *shares[1:]]

    # Execute / Assert: refused, naming the recipient it would have silenced; w00 has not shared.
    with pytest.raises(InvalidArgument, match=f"sealed shares for {shares[0].recipient} are not"):
        fed.server.submit_shares("w00", broken)
    assert not fed.server.has_shared("w00")
    fed.server.submit_shares("w00", shares)
    assert fed.server.has_shared("w00")


def _lie_about(fed: Federation, liar: str, owner: str, kind: str) -> None:
    """Replace `liar`'s revealed share of `owner`'s secret by one at the right x with a wrong y."""
    revealed = fed.sessions[liar].reveal(fed.server.u3, fed.server.dropped)
    lied = [
        RevealedShare(r.owner, r.kind, Share(Share.from_bytes(r.share).x, 12345).to_bytes())
        if (r.owner, r.kind) == (owner, kind)
        else r
        for r in revealed
    ]
    fed.server.submit_reveal(liar, lied)


@pytest.mark.parametrize(("n", "dropped"), [(3, 0), (5, 0), (6, 1), (10, 2)])
def test_a_revealer_lying_about_a_share_is_named_and_the_honest_shares_still_unmask_the_exact_sum(
    n: int, dropped: int
) -> None:
    # Prepare: the last `dropped` workers drop out after sharing keys; the first survivor lies about the
    # share it holds of another survivor's self-mask seed (and of a dropped worker's mask key, when one dropped).
    fed = Federation(n, seed=n)
    fed.advertise_all()
    fed.share_all()
    alive = fed.ids[: n - dropped]
    for w in alive:
        masked = fed.sessions[w].mask(fed.server.inbox(w), fed.server.u2, fed.plain[w])
        fed.server.add_masked(w, masked, 0)
        fed.server.close_masked_upload(w)
    fed.server.close_masked()
    liar, victim = alive[0], alive[1]
    if dropped:
        revealed = fed.sessions[liar].reveal(fed.server.u3, fed.server.dropped)
        gone = fed.server.dropped[0]
        lied = [
            RevealedShare(r.owner, r.kind, Share(Share.from_bytes(r.share).x, 99).to_bytes())
            if r.owner in (victim, gone)
            else r
            for r in revealed
        ]
        fed.server.submit_reveal(liar, lied)
    else:
        _lie_about(fed, liar, victim, "self_seed")
    for w in alive[1:]:
        fed.server.submit_reveal(w, fed.sessions[w].reveal(fed.server.u3, fed.server.dropped))

    # Execute
    total = fed.server.finish()

    # Assert: the survivors' exact sum, and only the liar is named.
    np.testing.assert_array_equal(total, _plain_sum(fed, alive))
    assert list(fed.server.liars) == [liar]
    assert victim in fed.server.liars[liar]


def test_with_no_share_to_spare_a_lie_fails_the_attempt_without_naming_anyone() -> None:
    # Prepare: two workers, threshold two: each secret has exactly the two shares it needs.
    fed = Federation(2)
    fed.advertise_all()
    fed.share_all()
    fed.mask_all()
    _lie_about(fed, "w00", "w01", "self_seed")
    fed.server.submit_reveal("w01", fed.sessions["w01"].reveal(fed.server.u3, ()))

    # Execute / Assert: the committed seed cannot be rebuilt, and nothing tells whose share lies.
    with pytest.raises(RoundFailed, match="whose shares lie cannot be told") as failed:
        fed.server.finish()
    assert failed.value.offenders == ()
    assert fed.server.stage == "failed"


def _shared_with(fed: Federation, sender: str, tamper: Callable[[EncryptedShare], bytes]) -> None:
    """Everyone advertises and shares keys; `sender`'s sealed share to w00 is replaced by `tamper(share)`."""
    fed.advertise_all()
    for w in fed.ids:
        shares = fed.sessions[w].share_keys(fed.server.roster())
        if w == sender:
            shares = [EncryptedShare(s.sender, s.recipient, tamper(s)) if s.recipient == "w00" else s for s in shares]
        fed.server.submit_shares(w, shares)
    fed.server.close_share()


def _sealed_at_wrong_x(fed: Federation, sender: str) -> Callable[[EncryptedShare], bytes]:
    """A share that opens for w00 but holds shares at another worker's x (a sender dealing w00 someone else's)."""

    def tamper(share: EncryptedShare) -> bytes:
        session = fed.sessions[sender]
        key = agree(
            session._enc_keys.private, fed.sessions["w00"]._enc_keys.public, session=session._session, purpose=b"shares"
        )
        wrong = Share(2, 7)
        return seal_share_pair(
            key, wrong, wrong, associated_data=share_associated_data(sender, "w00", fed.params.tag, session._session)
        )

    return tamper


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda fed: lambda s: os.urandom(SEALED_SHARE_BYTES), id="garbage-of-the-right-length"),
        pytest.param(lambda fed: lambda s: s.ciphertext[:-1] + bytes([s.ciphertext[-1] ^ 1]), id="one-bit-flipped"),
        pytest.param(lambda fed: _sealed_at_wrong_x(fed, "w01"), id="another-workers-share"),
    ],
)
def test_a_recipient_that_cannot_open_a_share_proves_it_and_the_sender_is_at_fault(
    tamper: Callable[[Federation], Callable[[EncryptedShare], bytes]],
) -> None:
    # Prepare: w01 seals something w00 cannot use; w00 finds out when it opens its inbox to mask.
    fed = Federation(4)
    _shared_with(fed, "w01", tamper(fed))
    with pytest.raises(UnopenableShares) as unopenable:
        fed.sessions["w00"].mask(fed.server.inbox("w00"), fed.server.u2, fed.plain["w00"])
    assert unopenable.value.senders == ("w01",)

    # Execute: w00 shows its encryption key of the attempt; the coordinator opens w01's share itself.
    fed.server.complain("w00", fed.sessions["w00"].complain(unopenable.value.senders))

    # Assert: the sender is at fault, not the victim, and the attempt (whose keys are now spent) is over.
    assert list(fed.server.faults) == ["w01"]
    assert "does not open" in fed.server.faults["w01"]
    assert fed.server.stage == "failed"
    assert fed.sessions["w00"].stage == "complained"


def test_a_complaint_about_a_share_that_opens_puts_the_complainer_at_fault() -> None:
    fed = Federation(3)
    fed.advertise_all()
    fed.share_all()

    fed.server.complain("w00", fed.sessions["w00"].complain(["w02"]))

    assert list(fed.server.faults) == ["w00"]
    assert "w02's sealed share, which opens" in fed.server.faults["w00"]


@pytest.mark.parametrize(
    ("complaint", "match"),
    [
        (lambda fed: Complaint(("w01",), os.urandom(32)), "not the encryption key w00 advertised"),
        (lambda fed: Complaint(("w01",), b"short"), "not an X25519 private key"),
        (lambda fed: Complaint((), fed.sessions["w00"]._enc_keys.private), "names other workers"),
        (lambda fed: Complaint(("w00",), fed.sessions["w00"]._enc_keys.private), "names other workers"),
        (lambda fed: Complaint(("w01", "w01"), fed.sessions["w00"]._enc_keys.private), "names other workers"),
        (lambda fed: Complaint(("mallory",), fed.sessions["w00"]._enc_keys.private), "names other workers"),
    ],
)
def test_a_complaint_without_its_proof_is_refused_and_changes_nothing(
    complaint: Callable[[Federation], Complaint], match: str
) -> None:
    fed = Federation(3)
    fed.advertise_all()
    fed.share_all()

    with pytest.raises(InvalidArgument, match=match):
        fed.server.complain("w00", complaint(fed))

    assert fed.server.faults == {}
    assert fed.server.stage == "masked"
