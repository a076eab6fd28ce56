"""The fuzz cases themselves (tests/server/fuzz_cases.py): no defect, and no two defects together,
build a message the coordinator would take. A case that is taken changes the run that the fuzz test
needs unchanged, and fails it for a reason that is not the coordinator's.

Each message is judged without a network, by the coordinator's own rule where it is a pure function
(the secure round's stage machine, the bounds on a report) and by the right message itself where it
is not (an upload is taken only as the right header followed by the right chunks).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_common.secagg import SEALED_SHARE_BYTES, SecAggParams, identity_keypair, max_bits, quantize, round_tag
from fedlora_common.serde import (
    advertisement_from_proto,
    advertisement_to_proto,
    encrypted_share_from_proto,
    encrypted_share_to_proto,
    metrics_from_proto,
    revealed_share_from_proto,
    revealed_share_to_proto,
)
from fedlora_server.bounds import check_report
from fedlora_server.errors import CoordinatorError
from fedlora_server.secure_round import SecureRound
from fedlora_worker.secagg_session import WorkerSession
from tests.seeds import VARIABLE, derived, replay_hint
from tests.server.conftest import MANIFEST, WORKERS
from tests.server.fuzz_cases import (
    CHUNK,
    EXCLUSIVE,
    FOCUSED,
    GRPC_LIMIT,
    RUN,
    STRANGER,
    STRATEGIES,
    Case,
    Material,
    Moment,
    compatible,
    key_shares,
    right_upload,
)

NUMEL = MANIFEST.numel + 1
"""A masked update: the quantized delta and the example count."""


@dataclass(frozen=True)
class SecureRun:
    """Real messages of each secure stage, and a fresh coordinator round waiting at any stage for all of them."""

    params: SecAggParams
    material: Material
    waiting_at: Callable[[str], SecureRound]


def _secure_run() -> SecureRun:
    identities = {w: identity_keypair() for w in WORKERS}
    public = {w: k.public for w, k in identities.items()}
    params = SecAggParams(
        run_id=RUN,
        tag=round_tag(1, 1),
        participants=WORKERS,
        threshold=SecAggParams.threshold_for(len(WORKERS), 2 / 3),
        bits=max_bits(len(WORKERS)),
        clip_range=1.0,
        max_examples=1000,
    )

    def sessions(p: SecAggParams) -> dict[str, WorkerSession]:
        return {
            w: WorkerSession(worker_id=w, params=p, identity_private=identities[w].private, peer_identities=public)
            for w in WORKERS
        }

    live, stale = sessions(params), sessions(replace(params, tag=params.tag + 1))
    ads = {w: live[w].advertise() for w in WORKERS}
    reference = SecureRound(params=params, identities=public, numel=NUMEL)
    for ad in ads.values():
        reference.advertise(ad)
    reference.close_advertise()
    shares = {w: live[w].share_keys(reference.roster()) for w in WORKERS}
    for w in WORKERS:
        reference.submit_shares(w, shares[w])
    reference.close_share()
    rng = np.random.default_rng(0)
    masked = {}
    for w in WORKERS:
        plain = quantize(rng.uniform(-1, 1, NUMEL).astype(np.float32), clip=1.0, bits=params.bits, rng=rng)
        masked[w] = live[w].mask(reference.inbox(w), reference.u2, plain)
        reference.add_masked(w, masked[w], 0)
        reference.close_masked_upload(w)
    reference.close_masked()
    reveals = {w: live[w].reveal(reference.u3, reference.dropped) for w in WORKERS}

    material = Material(
        ads={w: advertisement_to_proto(a) for w, a in ads.items()},
        stale_ads={w: advertisement_to_proto(s.advertise()) for w, s in stale.items()},
        shares={w: [encrypted_share_to_proto(s) for s in shares[w]] for w in WORKERS},
        masked={w: m.tobytes() for w, m in masked.items()},
        reveals={w: [revealed_share_to_proto(r) for r in reveals[w]] for w in WORKERS},
    )
    material.stale_ads[STRANGER] = material.stale_ads[WORKERS[0]]

    def waiting_at(stage: str) -> SecureRound:
        """A round in `stage` that none of the workers has answered yet."""
        at = SecureRound(params=params, identities=public, numel=NUMEL)
        if stage == "advertise":
            return at
        for ad in ads.values():
            at.advertise(ad)
        at.close_advertise()
        if stage == "share":
            return at
        for w in WORKERS:
            at.submit_shares(w, shares[w])
        at.close_share()
        for w in WORKERS:
            at.add_masked(w, masked[w], 0)
            at.close_masked_upload(w)
        at.close_masked()
        return at

    return SecureRun(params, material, waiting_at)


@pytest.fixture(scope="module")
def secure_run() -> SecureRun:
    return _secure_run()


def _moment(run: SecureRun, label: str) -> Moment:
    """The moment a message kind's right form is taken at, with every member still to send it."""
    everyone = frozenset(WORKERS)
    if label == "initialize":
        return Moment(label, "initialize", everyone, members=frozenset({WORKERS[0]}))
    return Moment(
        label,
        "upload" if label in ("masked", "plain") else label,
        everyone,
        round=1,
        tag=run.params.tag,
        version=1 if label == "evaluate" else 0,
        members=everyone,
        material=run.material,
        secure=label != "plain",
    )


# ---- what the coordinator would take -------------------------------------------------------------


def _takes(call: Callable[[], object]) -> bool:
    try:
        call()
    except (CoordinatorError, ValueError):
        return False
    return True


def _addressed(
    request: pb.ShareKeysRequest | pb.RevealSharesRequest | pb.AdvertiseKeysRequest, case: Case, tag: int
) -> bool:
    return (request.worker_id, request.run_id, request.tag) == (case.sender.owner, RUN, tag)


def taken(case: Case, moment: Moment, run: SecureRun) -> bool:
    """Whether the coordinator, at `moment`, would take `case` from its sender (a member acting for itself)."""
    owner = case.sender.owner
    assert owner is not None
    if isinstance(case.request, tuple):  # a stream
        assert case.rpc == "UploadUpdate"
        return _the_right_upload(case.request, *right_upload(moment, owner))
    request = case.request
    if len(request) > GRPC_LIMIT:
        return False
    if case.rpc == "AdvertiseKeys":
        ad_request = pb.AdvertiseKeysRequest.FromString(request)
        ad = advertisement_from_proto(ad_request.keys)
        return (
            _addressed(ad_request, case, moment.tag)
            and ad.worker_id == owner
            and _takes(lambda: run.waiting_at("advertise").advertise(ad))
        )
    if case.rpc == "ShareKeys":
        share_request = pb.ShareKeysRequest.FromString(request)
        shares = [encrypted_share_from_proto(s) for s in share_request.shares]
        return _addressed(share_request, case, moment.tag) and _takes(
            lambda: run.waiting_at("share").submit_shares(owner, shares)
        )
    if case.rpc == "RevealShares":
        reveal_request = pb.RevealSharesRequest.FromString(request)
        return _addressed(reveal_request, case, moment.tag) and _takes(
            lambda: run.waiting_at("unmask").submit_reveal(
                owner, [revealed_share_from_proto(r) for r in reveal_request.shares]
            )
        )
    if case.rpc == "ReportMetrics":
        report = pb.MetricsReport.FromString(request)
        addressed = (report.worker_id, report.run_id, report.round, report.version)
        return addressed == (owner, RUN, moment.round, moment.version) and _takes(
            lambda: check_report(metrics_from_proto(report))
        )
    raise AssertionError(f"no judge for {case.rpc}")


def _the_right_upload(stream: tuple[bytes, ...], header: pb.UploadHeader, payload: bytes) -> bool:
    """An upload is taken as its right header, then chunks 0, 1, ... of at most CHUNK bytes that make the payload."""
    if not stream or any(len(m) > GRPC_LIMIT for m in stream):
        return False
    try:
        messages = [pb.UploadMessage.FromString(m) for m in stream]
    except DecodeError:
        return False
    first, chunks = messages[0], messages[1:]
    return (
        first.WhichOneof("part") == "header"
        and first.header == header
        and all(m.WhichOneof("part") == "chunk" for m in chunks)
        and [m.chunk.seq for m in chunks] == list(range(len(chunks)))
        and all(len(m.chunk.data) <= CHUNK for m in chunks)
        and len(chunks) == header.chunk_count
        and b"".join(m.chunk.data for m in chunks) == payload
    )


# ---- every defect alone and every two together -----------------------------------------------------

JUDGED = [
    ("AdvertiseKeys", "advertise"),
    ("ShareKeys", "share"),
    ("RevealShares", "unmask"),
    ("ReportMetrics", "evaluate"),
    ("UploadUpdate", "initialize"),
    ("UploadUpdate", "masked"),
    ("UploadUpdate", "plain"),
]
EXAMPLES = 2


def defect_combinations(rpc: str, moment: Moment) -> Iterator[tuple[str, ...]]:
    """Each defect the moment's right message can carry, alone and followed by each other one it can carry too."""
    _, kinds = FOCUSED[rpc]
    names = kinds(moment)
    yield from ((d,) for d in names)
    yield from (pair for pair in itertools.permutations(names, 2) if compatible(pair, EXCLUSIVE.get(rpc, ())))


def combinations_not_refused(
    rpc: str, label: str, run: SecureRun, combinations: Iterable[tuple[str, ...]], seed_of: Callable[..., int]
) -> dict[tuple[str, ...], str]:
    """Build each combination of defects a few times; those that built a message the coordinator would take
    (or could not be built), with why."""
    moment = _moment(run, label)
    make = STRATEGIES[rpc]
    failures = {}
    for defects in combinations:

        @seed(seed_of(rpc, label, *defects))
        @settings(
            max_examples=EXAMPLES,
            phases=(Phase.explicit, Phase.generate),
            suppress_health_check=list(HealthCheck),
            print_blob=False,  # a nested search replays from its seed, not from a blob
        )
        @given(case=make(moment, focus=defects))  # type: ignore[call-arg]
        def judge(case: Case) -> None:
            assert not taken(case, moment, run), "a message the coordinator would take"

        try:
            judge()
        except Exception as exc:
            failures[defects] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return failures


@pytest.mark.parametrize(("rpc", "label"), JUDGED, ids=[f"{rpc}@{label}" for rpc, label in JUDGED])
def test_no_defect_alone_or_with_another_builds_a_message_the_coordinator_would_take(
    rpc: str, label: str, secure_run: SecureRun, fuzz_seed: int
) -> None:
    # Prepare: every defect the right form of `rpc` can carry at `label`, alone and with each other one.
    print(f"{VARIABLE}={fuzz_seed}")
    combinations = list(defect_combinations(rpc, _moment(secure_run, label)))

    # Execute: build each a few times, from seeds derived from the run's.
    failures = combinations_not_refused(rpc, label, secure_run, combinations, lambda *names: derived(fuzz_seed, *names))

    # Assert: the coordinator would refuse every message built.
    assert not failures, f"{rpc} at {label} [{replay_hint(fuzz_seed)}]: " + "; ".join(
        f"{d}: {why}" for d, why in failures.items()
    )


CANCELLING = [
    ("ShareKeys", "share", ("duplicate", "missing")),
    ("ShareKeys", "share", ("to_stranger", "missing")),
    ("RevealShares", "unmask", ("duplicate", "missing")),
    ("RevealShares", "unmask", ("unknown_kind", "swapped_kind")),
    ("UploadUpdate", "masked", ("duplicate_chunk", "gap")),
    ("UploadUpdate", "masked", ("header_twice", "gap")),
    ("UploadUpdate", "masked", ("garbage_later", "gap")),
    ("UploadUpdate", "masked", ("header_twice", "no_header")),
    ("UploadUpdate", "masked", ("no_header", "header_twice")),
]
"""Defects that once undid each other: a share (or chunk) copied, then the copy deleted; a share to a
stranger added, then deleted; a kind broken, then 'swapped' back to the right one; a header inserted
first, then the first header dropped. Each now breaks its own part of the message."""
PINNED_SEED = 0
"""Draws that hit each of those cancellations with the generators as they were (the commit that added this)."""


@pytest.mark.parametrize(("rpc", "label", "defects"), CANCELLING, ids=["-".join(c[2]) for c in CANCELLING])
def test_defects_that_once_undid_each_other_now_both_take_effect(
    rpc: str, label: str, defects: tuple[str, ...], secure_run: SecureRun
) -> None:
    # Prepare, Execute: the same draws every run, which hit the cancellation before.
    failures = combinations_not_refused(rpc, label, secure_run, [defects], lambda *names: PINNED_SEED)

    # Assert
    assert not failures


@pytest.mark.parametrize(
    ("rpc", "defects"),
    [("UploadUpdate", ("kind_unknown", "kind_other")), ("UploadUpdate", ("manifest_absent", "manifest_size"))],
)
def test_defects_that_write_the_same_thing_are_never_drawn_together(rpc: str, defects: tuple[str, ...]) -> None:
    # (an unknown kind then 'changed' to another, possibly the right one; a manifest cleared, then indexed)
    assert not compatible(defects, EXCLUSIVE[rpc])
    assert not compatible(defects[::-1], EXCLUSIVE[rpc])


@pytest.mark.parametrize("label", ["advertise", "share", "unmask"])
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_sealed_share_is_of_the_wrong_length_only_where_the_case_says_so(
    label: str, secure_run: SecureRun, data: st.DataObject
) -> None:
    # Prepare: any sender at a moment with real shares (share), or none yet (advertise) or no more (unmask).
    moment = _moment(secure_run, label)

    # Execute
    case = data.draw(key_shares(moment))

    # Assert: real or made up for a sender without real material, a share has the sealed length unless the
    # case is about its length; the coordinator's length check never refuses what the table blames on another defect.
    if case.defects == ("undecodable",):
        return
    assert isinstance(case.request, bytes)
    lengths = {len(s.ciphertext) for s in pb.ShareKeysRequest.FromString(case.request).shares}
    if not {"truncated", "oversize"} & set(case.defects):
        assert lengths <= {SEALED_SHARE_BYTES}, case.defects
