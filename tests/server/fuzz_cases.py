"""The cases the coordinator is fuzzed with: every RPC, from any sender, broken in every way we know.

A case is built from the moment of the run it is sent at (`Moment`): what the right message
would be, who may still send it. Defects break that right form (a wrong tag, round or run; bytes
of a wrong length; forged or foreign keys; chunk gaps; NaN or Inf; counts beyond 2^53; other
workers' ids; oversize messages; bytes that do not decode). One defect at a moment that would
take the right form has one precise answer (the tables below); otherwise any refusal DESIGN.md
lists will do. A case whose right form would be taken is never built: it would change the run.
Two defects in one case each break their own part of the message (`targets`: their own share,
reveal or chunk; fields of their own), so neither undoes the other and together they never make
the right form again; defects that must write the same thing are never drawn together (`EXCLUSIVE`).
tests/server/test_fuzz_cases.py checks every defect alone and every pair against the coordinator's rules.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from hypothesis import strategies as st

from fedlora_common.chunking import iter_chunks, sha256
from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_common.secagg import SEALED_SHARE_BYTES, SHARE_BYTES, Share
from fedlora_common.serde import manifest_to_proto
from tests.server.conftest import ADAPTER_CONFIG, MANIFEST, WORKERS, initial_vector, token_of

Code = grpc.StatusCode
OK = Code.OK
UNAUTH, DENIED, PRECONDITION = Code.UNAUTHENTICATED, Code.PERMISSION_DENIED, Code.FAILED_PRECONDITION
INVALID, EXHAUSTED, EXISTS, NOT_FOUND = (
    Code.INVALID_ARGUMENT,
    Code.RESOURCE_EXHAUSTED,
    Code.ALREADY_EXISTS,
    Code.NOT_FOUND,
)
PRECISE = frozenset({OK, UNAUTH, DENIED, PRECONDITION, INVALID, EXHAUSTED, EXISTS, NOT_FOUND})
"""The statuses DESIGN.md lists; any other answer (UNKNOWN, INTERNAL, ...) fails the test."""
REFUSED = PRECISE - {OK}
RUN = "test-run"
STRANGER = "mallory"
"""On the allow-list, never joins: authenticated, but a member of nothing."""
ACTORS = (*WORKERS, STRANGER)
CHUNK = 1024
MAX_UPDATE = 64 * 1024
GRPC_LIMIT = CHUNK + 2**16
EXAMPLES_PER_RPC = 10
CASES: Counter[str] = Counter()


def metadata_of(worker: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token_of(worker)}"),)


# ---- the moment a case is sent at ---------------------------------------------------------------


@dataclass
class Material:
    """Real messages of the run so far, for replays and as the right form that mutations break."""

    ads: dict[str, pb.Advertisement] = field(default_factory=dict)
    stale_ads: dict[str, pb.Advertisement] = field(default_factory=dict)
    shares: dict[str, list[pb.EncryptedShare]] = field(default_factory=dict)
    masked: dict[str, bytes] = field(default_factory=dict)
    reveals: dict[str, list[pb.RevealedShare]] = field(default_factory=dict)
    deltas: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Moment:
    """Where the run stands: what a right message would be, and who may still send one."""

    label: str
    stage: str
    """admission | initialize | evaluate | advertise | share | upload (masked, or plain) | unmask | finished."""
    joined: frozenset[str]
    round: int = 0
    tag: int = 0
    version: int | None = None
    members: frozenset[str] = frozenset()
    """Who takes part in the stage (the initializer; the evaluators; the stage's secure members)."""
    answered: frozenset[str] = frozenset()
    material: Material = field(default_factory=Material)
    secure: bool = True

    def accepts(self, stage: str, worker: str | None) -> bool:
        return self.stage == stage and worker in self.members and worker not in self.answered

    def replays(self, stage: str, worker: str | None) -> bool:
        return self.stage == stage and worker in self.answered


@dataclass(frozen=True)
class Sender:
    """Who sends a case: the token's owner (None: no valid credentials) and the id the request claims."""

    owner: str | None
    metadata: tuple[tuple[str, str], ...]
    claim: str

    def gate(self) -> frozenset[Code] | None:
        """The answer credentials decide before anything else; None when they let the request through."""
        if self.owner is None:
            return frozenset({UNAUTH})
        if self.claim != self.owner:
            return frozenset({DENIED})
        return None


def senders() -> st.SearchStrategy[Sender]:
    token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=24)
    strangers = st.one_of(
        st.just(()),
        token.map(lambda t: (("authorization", f"Bearer {t}"),)),
        token.map(lambda t: (("authorization", f"Basic {t}"),)),
        st.sampled_from(WORKERS).map(lambda w: (("authorization", f"Bearer {token_of(w)}x"),)),
    )
    claims = st.one_of(st.sampled_from(ACTORS), st.text(max_size=12))

    @st.composite
    def build(draw: st.DrawFn) -> Sender:
        if draw(st.integers(0, 9)) == 0:
            return Sender(None, draw(strangers), draw(claims))
        owner = draw(st.sampled_from((*WORKERS, *WORKERS, STRANGER)))
        claim = owner if draw(st.integers(0, 5)) else draw(claims)
        return Sender(owner, metadata_of(owner), claim)

    return build()


def proper_senders(moment: Moment) -> st.SearchStrategy[Sender]:
    """Members the moment still waits for, acting for themselves."""
    return st.sampled_from(sorted(moment.members - moment.answered)).map(lambda w: Sender(w, metadata_of(w), w))


Exclusive = tuple[frozenset[str], ...]
"""Groups of defects of which a case carries at most one: they write the same thing, so one would undo or hide
the other. Defects outside a common group each take effect whatever else the case carries (none cancels another)."""


def apart(one: str, others: Iterable[str]) -> Exclusive:
    """`one` and each of `others` exclude each other."""
    return tuple(frozenset({one, other}) for other in others)


def compatible(defects: Sequence[str], exclusive: Exclusive) -> bool:
    return all(len(group.intersection(defects)) <= 1 for group in exclusive)


def defect_lists(
    draw: st.DrawFn, kinds: Iterable[str], *, floor: int, focus: tuple[str, ...], exclusive: Exclusive = ()
) -> list[str]:
    """The defects a case carries: `focus` when given (in that order), else one or two drawn that can coexist."""
    if focus:
        assert compatible(focus, exclusive), f"{focus} cannot all take effect in one message"
        return list(focus)
    drawn = st.lists(st.sampled_from(sorted(kinds)), min_size=floor, max_size=2, unique=True)
    return draw(drawn.filter(lambda defects: compatible(defects, exclusive)))


def targets(draw: st.DrawFn, defects: Sequence[str], items: int, needs: Mapping[str, int]) -> dict[str, list[int]]:
    """For each defect that breaks items of the right message (shares, reveals, chunks), `needs[defect]` of them,
    none shared with another defect: no defect then deletes, copies back or overwrites what another broke."""
    assert sum(needs.get(d, 0) for d in defects) <= items, f"{defects} break more than the {items} items there are"
    order = iter(draw(st.permutations(range(items))))
    return {d: [next(order) for _ in range(needs.get(d, 0))] for d in defects}


# ---- cases ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One call: the method, the request (serialized bytes, or a stream of them), what may come back."""

    rpc: str
    sender: Sender
    defects: tuple[str, ...]
    expect: frozenset[Code]
    request: bytes | tuple[bytes, ...] = field(default=b"", repr=False)
    read: str = "all"
    """DownloadGlobal: read all, only the header, or nothing before cancelling."""


def expected(
    sender: Sender,
    defects: Sequence[str],
    table: dict[str, Code],
    *,
    accepting: bool,
    replay: bool,
) -> frozenset[Code]:
    """The answer to a case: credentials first, then (with one defect at an accepting moment) its status."""
    if sender.owner is None:  # refused at the door, before a byte of the message is read: its size is never seen
        return frozenset({UNAUTH})
    if "oversize" in defects:
        return frozenset({EXHAUSTED})
    if "undecodable" in defects:
        return frozenset({INVALID}) if len(defects) == 1 else REFUSED
    if gate := sender.gate():
        return gate
    if accepting and len(defects) == 1:
        return frozenset({table[defects[0]]})
    if replay and not defects:
        return frozenset({EXISTS})
    return REFUSED


def _index(worker: str) -> int:
    """A participant's Shamir x: its place among the round's participants, from 1 (what shares sit at)."""
    return WORKERS.index(worker) + 1 if worker in WORKERS else 1


def _undecodable(draw: st.DrawFn) -> bytes:
    return b"\xff" + draw(st.binary(max_size=16))


def _other(draw: st.DrawFn, values: st.SearchStrategy[Any], right: Any) -> Any:
    return draw(values.filter(lambda v: v != right))


ANY_UINT32, ANY_UINT64 = st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)
BAD_COUNT = st.one_of(st.just(0), st.integers(2**53 + 1, 2**64 - 1))
BAD_LOSS = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 1e7, 1e308, -0.5])
NOT_RUN = st.text(max_size=16).filter(lambda r: r != RUN)


# -- Join, PollTask, Leave, DownloadGlobal -----------------------------------------------------------


@st.composite
def joins(draw: st.DrawFn, moment: Moment) -> Case:
    sender = draw(senders())
    if draw(st.integers(0, 9)) == 0:
        return Case(
            "Join",
            sender,
            ("undecodable",),
            expected(sender, ("undecodable",), {}, accepting=False, replay=False),
            _undecodable(draw),
        )
    joined = sender.owner in moment.joined
    # A right Join from a worker not yet in the run would (rightly) admit it: its count is always out of range.
    examples = draw(st.one_of(BAD_COUNT, st.integers(1, 2**53))) if joined else draw(BAD_COUNT)
    defects = () if 1 <= examples <= 2**53 else ("num_examples",)
    request = pb.JoinRequest(worker_id=sender.claim, num_examples=examples, software_version=draw(st.text(max_size=8)))
    expect = sender.gate() or frozenset({INVALID if defects else OK})
    return Case("Join", sender, defects, expect, request.SerializeToString())


@st.composite
def polls(draw: st.DrawFn, moment: Moment) -> Case:
    sender = draw(senders())
    run_id = draw(st.one_of(st.just(RUN), NOT_RUN))
    request = pb.PollTaskRequest(worker_id=sender.claim, run_id=run_id, wait_ms=draw(ANY_UINT32))
    defects = () if run_id == RUN else ("run_id",)
    expect = sender.gate() or frozenset({OK if sender.owner in moment.joined and not defects else PRECONDITION})
    return Case("PollTask", sender, defects, expect, request.SerializeToString())


@st.composite
def leaves(draw: st.DrawFn, moment: Moment) -> Case:
    sender = draw(senders())
    kind = draw(st.sampled_from(["run_id", "run_id", "oversize", "undecodable"]))
    if kind == "undecodable":
        return Case(
            "Leave", sender, (kind,), expected(sender, (kind,), {}, accepting=False, replay=False), _undecodable(draw)
        )
    # A Leave that would be honoured is never sent: a joined worker's names another run.
    run_id = RUN if sender.owner not in moment.joined and draw(st.booleans()) else draw(NOT_RUN)
    reason = "x" * (GRPC_LIMIT + 10) if kind == "oversize" else draw(st.text(max_size=600))
    request = pb.LeaveRequest(worker_id=sender.claim, run_id=run_id, reason=reason)
    if kind == "oversize":
        expect = expected(sender, (kind,), {}, accepting=False, replay=False)
    else:
        expect = sender.gate() or frozenset({PRECONDITION})
    return Case("Leave", sender, (kind,), expect, request.SerializeToString())


@st.composite
def downloads(draw: st.DrawFn, moment: Moment) -> Case:
    sender = draw(senders())
    if draw(st.integers(0, 9)) == 0:
        return Case(
            "DownloadGlobal",
            sender,
            ("undecodable",),
            expected(sender, ("undecodable",), {}, accepting=False, replay=False),
            _undecodable(draw),
        )
    run_id = draw(st.one_of(st.just(RUN), st.just(RUN), NOT_RUN))
    version = draw(st.one_of(st.just(moment.version or 0), ANY_UINT32))
    request = pb.DownloadRequest(worker_id=sender.claim, run_id=run_id, version=version)
    if run_id != RUN or sender.owner not in moment.joined:
        answer = PRECONDITION
    else:
        answer = OK if version == moment.version else NOT_FOUND
    expect = sender.gate() or frozenset({answer})
    # Hanging up before any answer is tried only where the answer would be a stream (else it races the refusal).
    read = draw(st.sampled_from(["all", "header", "nothing"] if expect == {OK} else ["all", "header"]))
    return Case("DownloadGlobal", sender, (), expect, request.SerializeToString(), read=read)


# -- ReportMetrics ----------------------------------------------------------------------------------

REPORT_DEFECTS = {
    "run_id": PRECONDITION,
    "round": PRECONDITION,
    "version": PRECONDITION,
    "eval_loss": INVALID,
    "eval_tokens": INVALID,
    "train_loss": INVALID,
    "tokens_per_second": INVALID,
    "record_epsilon": INVALID,
    "rate": INVALID,
    "exposure": INVALID,
}


@st.composite
def reports(draw: st.DrawFn, moment: Moment, focus: tuple[str, ...] = ()) -> Case:
    sender = draw(proper_senders(moment) if focus else senders())
    if not focus and draw(st.integers(0, 12)) == 0:
        return Case(
            "ReportMetrics",
            sender,
            ("undecodable",),
            expected(sender, ("undecodable",), {}, accepting=False, replay=False),
            _undecodable(draw),
        )
    accepting = moment.accepts("evaluate", sender.owner)
    version = moment.version or 0
    report = pb.MetricsReport(
        worker_id=sender.claim,
        run_id=RUN,
        round=moment.round,
        version=version,
        eval_loss=draw(st.floats(0, 10)),
        eval_tokens=draw(st.integers(0, 10**6)),
        train_loss=draw(st.floats(0, 10)),
        tokens_per_second=draw(st.floats(0, 1e6)),
    )
    if draw(st.booleans()):
        report.record_epsilon = draw(st.floats(0, 100))
    if draw(st.booleans()):
        rates = pb.MemorizationRates(
            count=draw(ANY_UINT32), exact_match_rate=draw(st.floats(0, 1)), mean_exposure=draw(st.floats(0, 64))
        )
        report.memorization.overall.CopyFrom(rates)
        report.memorization.by_duplication[draw(st.text(max_size=6))].CopyFrom(rates)
    defects = defect_lists(draw, REPORT_DEFECTS, floor=1 if accepting else 0, focus=focus)
    for defect in defects:
        if defect == "run_id":
            report.run_id = draw(NOT_RUN)
        elif defect == "round":
            report.round = _other(draw, ANY_UINT32, moment.round)
        elif defect == "version":
            report.version = _other(draw, ANY_UINT32, version)
        elif defect in ("eval_loss", "train_loss"):
            setattr(report, defect, draw(BAD_LOSS))
        elif defect == "eval_tokens":
            report.eval_tokens = draw(st.integers(2**53 + 1, 2**64 - 1))
        elif defect == "tokens_per_second":
            report.tokens_per_second = draw(st.sampled_from([math.nan, math.inf, -1.0, 1e13]))
        elif defect == "record_epsilon":
            report.record_epsilon = draw(st.sampled_from([math.nan, math.inf, -1.0, 1e7]))
        elif defect == "rate":
            report.memorization.overall.token_accuracy = draw(st.sampled_from([math.nan, -0.1, 1.5, math.inf]))
        elif defect == "exposure":
            report.memorization.by_duplication["10x"].mean_exposure = draw(st.sampled_from([math.nan, -1.0, 1e4]))
    expect = expected(
        sender, defects, REPORT_DEFECTS, accepting=accepting, replay=moment.replays("evaluate", sender.owner)
    )
    return Case("ReportMetrics", sender, tuple(defects), expect, report.SerializeToString())


# -- the secure-aggregation messages ----------------------------------------------------------------

ADVERTISE_DEFECTS = {
    "tag": PRECONDITION,
    "run_id": PRECONDITION,
    "keys_of_other": DENIED,
    "mask_public_length": INVALID,
    "enc_public_length": INVALID,
    "commitment_length": INVALID,
    "signature": DENIED,
    "swapped_key": DENIED,
    "stale_signature": DENIED,
    "foreign_identity": DENIED,
}
REPLACING_KEYS = ("stale_signature", "foreign_identity")
"""Defects that replace the whole advertisement: applied first, so that the others break what replaced it."""
ADVERTISE_EXCLUSIVE: Exclusive = (
    frozenset(REPLACING_KEYS),
    frozenset({"swapped_key", "mask_public_length"}),  # both write mask_public
)


@st.composite
def advertisements(draw: st.DrawFn, moment: Moment, focus: tuple[str, ...] = ()) -> Case:
    sender = draw(proper_senders(moment) if focus else senders())
    if not focus and draw(st.integers(0, 12)) == 0:
        return Case(
            "AdvertiseKeys",
            sender,
            ("undecodable",),
            expected(sender, ("undecodable",), {}, accepting=False, replay=False),
            _undecodable(draw),
        )
    material, owner = moment.material, sender.owner or WORKERS[0]
    real = material.ads.get(owner)
    keys = pb.Advertisement()
    if real is not None:
        keys.CopyFrom(real)
    else:  # before this worker advertised: the shape of an advertisement, signed by nobody
        keys.worker_id = sender.claim
        keys.mask_public, keys.enc_public, keys.seed_commitment = (
            draw(st.binary(min_size=32, max_size=32)) for _ in range(3)
        )
        keys.signature = draw(st.binary(min_size=64, max_size=64))
    accepting = moment.accepts("advertise", sender.owner)
    # Only a real advertisement can be right; an unsigned one is already wrong.
    floor = 1 if accepting and real is not None else 0
    kinds = [d for d in ADVERTISE_DEFECTS if material.stale_ads or d not in ("stale_signature", "foreign_identity")]
    defects = defect_lists(draw, kinds, floor=floor, focus=focus, exclusive=ADVERTISE_EXCLUSIVE)
    if real is None and not defects:
        defects = ["signature"]
    run_id, tag = RUN, moment.tag
    for defect in sorted(defects, key=lambda d: d not in REPLACING_KEYS):
        if defect == "tag":
            tag = _other(draw, ANY_UINT64, moment.tag)
        elif defect == "run_id":
            run_id = draw(NOT_RUN)
        elif defect == "keys_of_other":
            keys.worker_id = _other(draw, st.sampled_from(ACTORS), sender.claim)
        elif defect in ("mask_public_length", "enc_public_length", "commitment_length"):
            name = {"mask_public_length": "mask_public", "enc_public_length": "enc_public"}.get(
                defect, "seed_commitment"
            )
            setattr(keys, name, draw(st.binary(max_size=80).filter(lambda b: len(b) != 32)))
        elif defect == "signature":
            keys.signature = _other(draw, st.binary(max_size=96), keys.signature)
        elif defect == "swapped_key":
            keys.mask_public = _other(draw, st.binary(min_size=32, max_size=32), keys.mask_public)
        elif defect == "stale_signature":
            keys.CopyFrom(material.stale_ads[owner])
        elif defect == "foreign_identity":
            keys.CopyFrom(material.stale_ads[draw(st.sampled_from([w for w in WORKERS if w != owner]))])
            keys.worker_id = sender.claim
    request = pb.AdvertiseKeysRequest(worker_id=sender.claim, run_id=run_id, tag=tag, keys=keys)
    replay = moment.replays("advertise", sender.owner) and real is not None
    expect = expected(sender, defects, ADVERTISE_DEFECTS, accepting=accepting, replay=replay)
    return Case("AdvertiseKeys", sender, tuple(defects), expect, request.SerializeToString())


SHARE_DEFECTS = {
    "tag": PRECONDITION,
    "run_id": PRECONDITION,
    "empty": INVALID,
    "missing": INVALID,
    "to_self": INVALID,
    "to_stranger": INVALID,
    "duplicate": INVALID,
    "forged_sender": DENIED,
    "truncated": INVALID,
    "oversize": EXHAUSTED,
}
SHARE_TARGETS = {"missing": 1, "duplicate": 1, "forged_sender": 1, "truncated": 1}
"""Defects that break a share of the right message, each its own: "missing" removes every share for one
recipient, "duplicate" copies a share that stays, the others alter one in place."""
SHARE_EXCLUSIVE = apart("empty", SHARE_TARGETS)


def _sealed(draw: st.DrawFn) -> bytes:
    """Opaque bytes of a sealed share's length: only the coordinator's recipient could tell them from a share."""
    return bytes(draw(st.binary(min_size=SEALED_SHARE_BYTES, max_size=SEALED_SHARE_BYTES)))


@st.composite
def key_shares(draw: st.DrawFn, moment: Moment, focus: tuple[str, ...] = ()) -> Case:
    sender = draw(proper_senders(moment) if focus else senders())
    if not focus and draw(st.integers(0, 12)) == 0:
        return Case(
            "ShareKeys",
            sender,
            ("undecodable",),
            expected(sender, ("undecodable",), {}, accepting=False, replay=False),
            _undecodable(draw),
        )
    owner = sender.owner or WORKERS[0]
    real = moment.material.shares.get(owner)
    if real is not None:
        shares = [pb.EncryptedShare.FromString(s.SerializeToString()) for s in real]
    else:  # what sealed shares look like from outside: one per peer, opaque bytes of the sealed length
        shares = [
            pb.EncryptedShare(sender=sender.claim, recipient=w, ciphertext=_sealed(draw))
            for w in WORKERS
            if w != sender.claim
        ]
    accepting = moment.accepts("share", sender.owner)
    defects = defect_lists(draw, SHARE_DEFECTS, floor=1 if accepting else 0, focus=focus, exclusive=SHARE_EXCLUSIVE)
    hit = {d: shares[i] for d, picks in targets(draw, defects, len(shares), SHARE_TARGETS).items() for i in picks}
    run_id, tag = RUN, moment.tag
    for defect in defects:  # what changes the request, or one share in place
        if defect == "tag":
            tag = _other(draw, ANY_UINT64, moment.tag)
        elif defect == "run_id":
            run_id = draw(NOT_RUN)
        elif defect == "forged_sender":
            hit[defect].sender = _other(draw, st.sampled_from(ACTORS), sender.claim)
        elif defect == "truncated":  # cut short, or empty
            hit[defect].ciphertext = hit[defect].ciphertext[: draw(st.integers(0, SEALED_SHARE_BYTES - 1))]
    # then what adds or removes shares: after "empty", only added ones remain; "missing" removes last.
    if "empty" in defects:
        shares = []
    if "duplicate" in defects:
        shares.append(pb.EncryptedShare.FromString(hit["duplicate"].SerializeToString()))
    if "to_self" in defects:
        shares.append(pb.EncryptedShare(sender=sender.claim, recipient=sender.claim, ciphertext=_sealed(draw)))
    if "to_stranger" in defects:
        stranger = draw(st.text(max_size=8).filter(lambda r: r not in ACTORS and r != sender.claim))
        shares.append(pb.EncryptedShare(sender=sender.claim, recipient=stranger, ciphertext=_sealed(draw)))
    if "oversize" in defects:
        shares.append(pb.EncryptedShare(sender=sender.claim, recipient="x", ciphertext=b"\0" * GRPC_LIMIT))
    if "missing" in defects:
        shares = [s for s in shares if s.recipient != hit["missing"].recipient]
    request = pb.ShareKeysRequest(worker_id=sender.claim, run_id=run_id, tag=tag, shares=shares)
    replay = moment.replays("share", sender.owner) and real is not None
    expect = expected(sender, defects, SHARE_DEFECTS, accepting=accepting, replay=replay)
    return Case("ShareKeys", sender, tuple(defects), expect, request.SerializeToString())


COMPLAINT_DEFECTS = {
    "tag": PRECONDITION,
    "run_id": PRECONDITION,
    "no_accused": INVALID,
    "accuse_self": INVALID,
    "accuse_stranger": INVALID,
    "accuse_twice": INVALID,
    "key_length": INVALID,
    "oversize": EXHAUSTED,
}
COMPLAINT_EXCLUSIVE = apart("no_accused", ("accuse_self", "accuse_stranger", "accuse_twice")) + apart(
    "key_length", ("oversize",)
)


@st.composite
def complaints(draw: st.DrawFn, moment: Moment, focus: tuple[str, ...] = ()) -> Case:
    """A complaint never carries its proof: the key shown is random (the fuzzer holds no site's key), so even
    without another defect it is refused (INVALID_ARGUMENT) wherever a complaint is taken."""
    sender = draw(proper_senders(moment) if focus else senders())
    if not focus and draw(st.integers(0, 12)) == 0:
        return Case(
            "ComplainShares",
            sender,
            ("undecodable",),
            expected(sender, ("undecodable",), {}, accepting=False, replay=False),
            _undecodable(draw),
        )
    accepting = moment.secure and moment.accepts("upload", sender.owner)
    defects = defect_lists(
        draw, COMPLAINT_DEFECTS, floor=1 if accepting else 0, focus=focus, exclusive=COMPLAINT_EXCLUSIVE
    )
    accused = [draw(st.sampled_from([w for w in WORKERS if w != sender.claim]))]
    key = draw(st.binary(min_size=32, max_size=32))
    run_id, tag = RUN, moment.tag
    for defect in defects:
        if defect == "tag":
            tag = _other(draw, ANY_UINT64, moment.tag)
        elif defect == "run_id":
            run_id = draw(NOT_RUN)
        elif defect == "no_accused":
            accused = []
        elif defect == "accuse_self":
            accused.append(sender.claim)
        elif defect == "accuse_stranger":
            accused.append(draw(st.text(max_size=8).filter(lambda w: w not in ACTORS)))
        elif defect == "accuse_twice":
            accused.append(accused[0])
        elif defect == "key_length":
            key = draw(st.binary(max_size=64).filter(lambda k: len(k) != 32))
        elif defect == "oversize":
            key = b"\0" * GRPC_LIMIT
    request = pb.ComplainSharesRequest(worker_id=sender.claim, run_id=run_id, tag=tag, accused=accused, enc_private=key)
    expect = expected(sender, defects, COMPLAINT_DEFECTS, accepting=accepting, replay=False)
    return Case("ComplainShares", sender, tuple(defects), expect, request.SerializeToString())


REVEAL_DEFECTS = {
    "tag": PRECONDITION,
    "run_id": PRECONDITION,
    "empty": INVALID,
    "missing": INVALID,
    "duplicate": INVALID,
    "unknown_kind": INVALID,
    "swapped_kind": INVALID,
    "share_length": INVALID,
    "share_of_other": INVALID,
    "off_field": INVALID,
    "unknown_owner": INVALID,
}
REVEAL_TARGETS = dict.fromkeys(
    (
        "missing",
        "duplicate",
        "unknown_kind",
        "swapped_kind",
        "share_length",
        "share_of_other",
        "off_field",
        "unknown_owner",
    ),
    1,
)
"""Defects that break a revealed share, each its own: "missing" removes every reveal of one owner, "duplicate"
copies one that stays, the others alter one in place."""
REVEAL_EXCLUSIVE = apart("empty", REVEAL_TARGETS)


@st.composite
def reveals(draw: st.DrawFn, moment: Moment, focus: tuple[str, ...] = ()) -> Case:
    sender = draw(proper_senders(moment) if focus else senders())
    if not focus and draw(st.integers(0, 12)) == 0:
        return Case(
            "RevealShares",
            sender,
            ("undecodable",),
            expected(sender, ("undecodable",), {}, accepting=False, replay=False),
            _undecodable(draw),
        )
    owner = sender.owner or WORKERS[0]
    real = moment.material.reveals.get(owner)
    if real is not None:
        shares = [pb.RevealedShare.FromString(s.SerializeToString()) for s in real]
    else:  # the shape of a reveal, at an x no participant holds
        shares = [
            pb.RevealedShare(owner=w, kind="self_seed", share=Share(200, draw(st.integers(0, 2**64))).to_bytes())
            for w in WORKERS
        ]
    accepting = moment.accepts("unmask", sender.owner)
    defects = defect_lists(draw, REVEAL_DEFECTS, floor=1 if accepting else 0, focus=focus, exclusive=REVEAL_EXCLUSIVE)
    hit = {d: shares[i] for d, picks in targets(draw, defects, len(shares), REVEAL_TARGETS).items() for i in picks}
    run_id, tag = RUN, moment.tag
    for defect in defects:  # what changes the request, or one revealed share in place
        if defect == "tag":
            tag = _other(draw, ANY_UINT64, moment.tag)
        elif defect == "run_id":
            run_id = draw(NOT_RUN)
        elif defect == "unknown_kind":
            hit[defect].kind = draw(st.text(max_size=10).filter(lambda k: k not in ("self_seed", "mask_key")))
        elif defect == "swapped_kind":
            hit[defect].kind = "mask_key" if hit[defect].kind == "self_seed" else "self_seed"
        elif defect == "share_length":
            hit[defect].share = draw(st.binary(max_size=80).filter(lambda b: len(b) != SHARE_BYTES))
        elif defect == "share_of_other":  # a share sealed to another revealer (x is the revealer's index)
            hit[defect].share = Share(_index(owner) % len(WORKERS) + 1, 5).to_bytes()
        elif defect == "off_field":  # y beyond the field's prime
            hit[defect].share = Share(_index(owner), 0).to_bytes()[:2] + b"\xff" * (SHARE_BYTES - 2)
        elif defect == "unknown_owner":
            hit[defect].owner = draw(st.text(max_size=8).filter(lambda o: o not in WORKERS))
    # then what removes or adds reveals: "missing" removes last.
    if "empty" in defects:
        shares = []
    if "duplicate" in defects:
        shares.append(pb.RevealedShare.FromString(hit["duplicate"].SerializeToString()))
    if "missing" in defects:
        shares = [s for s in shares if s.owner != hit["missing"].owner]
    if real is None and not defects:
        defects = ["share_of_other"]  # the synthetic shares sit at an x nobody holds
    request = pb.RevealSharesRequest(worker_id=sender.claim, run_id=run_id, tag=tag, shares=shares)
    replay = moment.replays("unmask", sender.owner) and real is not None
    expect = expected(sender, defects, REVEAL_DEFECTS, accepting=accepting, replay=replay)
    return Case("RevealShares", sender, tuple(defects), expect, request.SerializeToString())


# -- UploadUpdate -----------------------------------------------------------------------------------

UPLOAD_DEFECTS = {
    # header
    "run_id": PRECONDITION,
    "kind_other": PRECONDITION,
    "kind_unknown": INVALID,
    "dtype": INVALID,
    "tag": PRECONDITION,
    "round": PRECONDITION,
    "base_version": PRECONDITION,
    "num_examples": INVALID,
    "train_loss": INVALID,
    "total_size_huge": EXHAUSTED,
    "total_size": INVALID,
    "sha256_length": INVALID,
    "sha256": INVALID,
    "chunk_count": INVALID,
    "manifest_duplicate_names": INVALID,
    "manifest_absent": INVALID,
    "manifest_size": INVALID,
    "manifest_dtype": INVALID,
    "manifest_empty_tensor": INVALID,
    "config_json": INVALID,
    # stream
    "no_header": INVALID,
    "garbage_first": INVALID,
    "garbage_later": INVALID,
    "blank_message": INVALID,
    "header_twice": INVALID,
    "gap": INVALID,
    "duplicate_chunk": INVALID,
    "swapped_chunks": INVALID,
    "chunk_too_big": EXHAUSTED,
    "chunk_over_grpc_limit": EXHAUSTED,
    "partial_value": INVALID,
    "extra_chunk": INVALID,
    "flipped_byte": INVALID,
    "nan": INVALID,
    "no_chunks": INVALID,
}
BEFORE_CLAIM = frozenset({"kind_unknown", "manifest_duplicate_names", "no_header", "garbage_first", "blank_message"})
"""Defects the servicer meets before it knows whom the upload claims to be from."""
CHUNK_TARGETS = {
    "gap": 1,
    "duplicate_chunk": 1,
    "swapped_chunks": 2,
    "chunk_too_big": 1,
    "chunk_over_grpc_limit": 1,
    "partial_value": 1,
    "flipped_byte": 1,
    "header_twice": 1,
    "garbage_later": 1,
    "nan": 1,
}
"""Defects that break chunks of the stream, each its own (a swap two): "gap" leaves one out, "duplicate_chunk"
sends one twice, "header_twice" and "garbage_later" follow one (so never come first), "nan" puts a NaN among
one's values, the others alter one in place."""
UPLOAD_EXCLUSIVE: Exclusive = (
    frozenset({"kind_other", "kind_unknown"}),  # both write the kind
    frozenset({"total_size_huge", "total_size"}),
    frozenset({"sha256_length", "sha256"}),
    frozenset({"no_header", "garbage_first", "blank_message"}),  # each decides what comes first
    *apart("manifest_absent", ("manifest_duplicate_names", "manifest_size", "manifest_dtype", "manifest_empty_tensor")),
    *apart("no_chunks", (*CHUNK_TARGETS, "extra_chunk")),
)


def right_upload(moment: Moment, worker: str) -> tuple[pb.UploadHeader, bytes]:
    """What `worker` would rightly upload at this moment (or the nearest thing when nothing is right)."""
    header = pb.UploadHeader(worker_id=worker, run_id=RUN, round=moment.round, num_examples=100, train_loss=1.0)
    if moment.stage == "initialize":
        payload = initial_vector().tobytes()
        header.kind, header.dtype = pb.UPLOAD_KIND_INITIAL, "float32"
        header.manifest.CopyFrom(manifest_to_proto(MANIFEST))
        header.artifact_config_json = ADAPTER_CONFIG
    elif moment.secure:
        payload = moment.material.masked.get(worker, b"\0" * (MANIFEST.numel + 1) * 4)
        header.kind, header.dtype, header.tag = pb.UPLOAD_KIND_MASKED, "uint32", moment.tag
    else:
        payload = moment.material.deltas.get(worker, b"\0" * MANIFEST.numel * 4)
        header.kind, header.dtype, header.base_version = pb.UPLOAD_KIND_DELTA, "float32", moment.version or 0
    header.total_size = len(payload)
    header.chunk_count = -(-len(payload) // CHUNK)
    header.sha256 = sha256(payload)
    return header, payload


def _upload_defects(moment: Moment) -> list[str]:
    """The defects that make an upload wrong at this moment (a plain round ignores tags, a secure one versions)."""
    floats = moment.stage == "initialize" or not moment.secure
    out = [d for d in UPLOAD_DEFECTS if not d.startswith(("manifest_", "config_"))]
    if moment.stage == "initialize":
        out += [d for d in UPLOAD_DEFECTS if d.startswith(("manifest_", "config_"))]
        out = [d for d in out if d not in ("tag", "round", "base_version")]
    elif moment.secure:
        out.remove("base_version")
    else:
        out.remove("tag")
    if not floats:
        out.remove("nan")
    return out


@st.composite
def uploads(draw: st.DrawFn, moment: Moment, focus: tuple[str, ...] = ()) -> Case:
    sender = draw(proper_senders(moment) if focus else senders())
    owner = sender.owner or WORKERS[0]
    header, payload = right_upload(moment, owner)
    header.worker_id = sender.claim
    accepting = moment.accepts("initialize" if moment.stage == "initialize" else "upload", sender.owner)
    defects = defect_lists(
        draw, _upload_defects(moment), floor=1 if accepting else 0, focus=focus, exclusive=UPLOAD_EXCLUSIVE
    )
    floats = header.dtype == "float32"
    for defect in sorted(defects, key=lambda d: not d.startswith("kind_")):  # the header (a kind sets a dtype)
        if defect == "run_id":
            header.run_id = draw(NOT_RUN)
        elif defect == "kind_other":
            kinds = [
                k for k in (pb.UPLOAD_KIND_INITIAL, pb.UPLOAD_KIND_DELTA, pb.UPLOAD_KIND_MASKED) if k != header.kind
            ]
            header.kind = draw(st.sampled_from(kinds))
            header.dtype = "uint32" if header.kind == pb.UPLOAD_KIND_MASKED else "float32"
        elif defect == "kind_unknown":
            header.kind = pb.UploadKind.ValueType(draw(st.one_of(st.just(0), st.integers(4, 2**31 - 1))))
        elif defect == "dtype":
            header.dtype = _other(
                draw, st.sampled_from(["float64", "int8", "", "float16", "uint32", "float32"]), header.dtype
            )
        elif defect == "tag":
            header.tag = _other(draw, ANY_UINT64, header.tag)
        elif defect == "round":
            header.round = _other(draw, ANY_UINT32, header.round)
        elif defect == "base_version":
            header.base_version = _other(draw, ANY_UINT32, header.base_version)
        elif defect == "num_examples":
            header.num_examples = draw(BAD_COUNT)
        elif defect == "train_loss":
            header.train_loss = draw(BAD_LOSS)
        elif defect == "total_size_huge":
            header.total_size = draw(st.integers(MAX_UPDATE + 1, 2**64 - 1))
        elif defect == "total_size":
            header.total_size = _other(draw, st.integers(0, MAX_UPDATE), header.total_size)
        elif defect == "sha256_length":
            header.sha256 = draw(st.binary(max_size=64).filter(lambda b: len(b) != 32))
        elif defect == "sha256":
            header.sha256 = _other(draw, st.binary(min_size=32, max_size=32), header.sha256)
        elif defect == "chunk_count":
            header.chunk_count = _other(draw, ANY_UINT32, header.chunk_count)
        elif defect == "manifest_duplicate_names":
            header.manifest.tensors.append(header.manifest.tensors[0])
        elif defect == "manifest_absent":
            header.ClearField("manifest")
        elif defect == "manifest_size":
            header.manifest.tensors[0].shape[0] = _other(
                draw, st.integers(0, 2**40), header.manifest.tensors[0].shape[0]
            )
        elif defect == "manifest_dtype":
            header.manifest.tensors[1].dtype = _other(draw, st.text(max_size=8), "float32")
        elif defect == "manifest_empty_tensor":
            header.manifest.tensors.append(
                pb.TensorSpec(name="base_model.empty", shape=[draw(st.integers(0, 3)), 0], dtype="float32")
            )
        elif defect == "config_json":
            header.artifact_config_json = draw(st.sampled_from(["", "{", "[1, 2]", "null", '"adapter"', '{"r": ']))
    hit = targets(draw, defects, -(-len(payload) // CHUNK), CHUNK_TARGETS)
    if "nan" in defects and floats:
        values = np.frombuffer(payload, dtype=np.float32).copy()
        first, per_chunk = hit["nan"][0] * CHUNK // 4, CHUNK // 4
        values[first + draw(st.integers(0, min(per_chunk, values.size - first) - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf])
        )
        payload = values.tobytes()
        if "sha256" not in defects and "sha256_length" not in defects:
            header.sha256 = sha256(payload)  # a stream true to its header, with values no update may hold
    chunks = [bytes(c) for c in iter_chunks(payload, CHUNK)]
    head = pb.UploadMessage(header=header).SerializeToString()
    sent = [_chunk(i, c) for i, c in enumerate(chunks)]
    for defect in defects:  # chunks altered in place
        for i in hit[defect]:
            if defect == "chunk_too_big":
                sent[i] = _chunk(i, b"\0" * (CHUNK + 4))
            elif defect == "chunk_over_grpc_limit":
                sent[i] = _chunk(i, b"\0" * GRPC_LIMIT)
            elif defect == "partial_value":
                sent[i] = _chunk(i, chunks[i][:-1])
            elif defect == "flipped_byte":
                data = bytearray(chunks[i])
                data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
                sent[i] = _chunk(i, bytes(data))
    order = list(range(len(chunks)))
    if "swapped_chunks" in defects:
        i, j = hit["swapped_chunks"]
        order[i], order[j] = order[j], order[i]
    messages = []
    for i in order:  # then chunks left out, sent twice, or followed by what does not belong there
        if i not in hit.get("gap", ()):
            messages.append(sent[i])
        if i in hit.get("duplicate_chunk", ()):
            messages.append(sent[i])
        if i in hit.get("header_twice", ()):
            messages.append(head)
        if i in hit.get("garbage_later", ()):
            messages.append(_undecodable(draw))
    if "extra_chunk" in defects:
        messages.append(_chunk(len(chunks), b"\0" * 4))
    if "no_chunks" in defects:
        messages = []
    if "no_header" in defects:
        stream = tuple(messages)
    elif "garbage_first" in defects:
        stream = (_undecodable(draw), head, *messages)
    elif "blank_message" in defects:
        stream = (pb.UploadMessage().SerializeToString(), head, *messages)
    else:
        stream = (head, *messages)
    if not stream:
        stream = (pb.UploadMessage().SerializeToString(),)
    replay = moment.replays("upload", sender.owner) and not defects
    expect = _upload_expectation(sender, defects, accepting=accepting, replay=replay)
    return Case("UploadUpdate", sender, tuple(defects), expect, stream)


def _chunk(seq: int, data: bytes) -> bytes:
    return pb.UploadMessage(chunk=pb.Chunk(seq=seq, data=data)).SerializeToString()


def _upload_expectation(sender: Sender, defects: Sequence[str], *, accepting: bool, replay: bool) -> frozenset[Code]:
    if sender.owner is None:
        return frozenset({UNAUTH})  # credentials are checked before the first message is read
    first = set(defects) & BEFORE_CLAIM
    if first:
        return frozenset({UPLOAD_DEFECTS[first.pop()]}) if len(defects) == 1 else REFUSED
    if sender.claim != sender.owner:
        return frozenset({DENIED}) if not defects else REFUSED | {DENIED}
    if accepting and len(defects) == 1:
        return frozenset({UPLOAD_DEFECTS[defects[0]]})
    if replay:
        return frozenset({EXISTS})
    return REFUSED


# ---- sending and checking -------------------------------------------------------------------------

STRATEGIES = {
    "Join": joins,
    "PollTask": polls,
    "Leave": leaves,
    "DownloadGlobal": downloads,
    "ReportMetrics": reports,
    "AdvertiseKeys": advertisements,
    "ShareKeys": key_shares,
    "RevealShares": reveals,
    "ComplainShares": complaints,
    "UploadUpdate": uploads,
}


FOCUSED: dict[str, tuple[str, Callable[[Moment], list[str]]]] = {
    # rpc: (the stage at which its right form is taken, the defects that break it there)
    "ReportMetrics": ("evaluate", lambda m: sorted(REPORT_DEFECTS)),
    "AdvertiseKeys": ("advertise", lambda m: sorted(ADVERTISE_DEFECTS)),
    "ShareKeys": ("share", lambda m: sorted(SHARE_DEFECTS)),
    "RevealShares": ("unmask", lambda m: sorted(REVEAL_DEFECTS)),
    "ComplainShares": ("upload", lambda m: sorted(COMPLAINT_DEFECTS) if m.secure else []),
    "UploadUpdate": ("upload", _upload_defects),
}


EXCLUSIVE: dict[str, Exclusive] = {
    "AdvertiseKeys": ADVERTISE_EXCLUSIVE,
    "ShareKeys": SHARE_EXCLUSIVE,
    "RevealShares": REVEAL_EXCLUSIVE,
    "ComplainShares": COMPLAINT_EXCLUSIVE,
    "UploadUpdate": UPLOAD_EXCLUSIVE,
}
"""For each RPC whose defects can write the same thing, the defects no case carries together."""


def plan_of(moment: Moment, examples: int) -> list[tuple[str, st.SearchStrategy[Case], int]]:
    """What to send at a moment: every RPC at random, and each single defect of the message the moment takes."""
    plan = [(rpc, make(moment), examples) for rpc, make in STRATEGIES.items()]
    for rpc, (stage, defects) in FOCUSED.items():
        taking = moment.stage == stage or (stage == "upload" and moment.stage == "initialize")
        if taking and moment.members - moment.answered:
            make = STRATEGIES[rpc]
            plan += [(f"{rpc}:{d}", make(moment, focus=(d,)), 2) for d in defects(moment)]  # type: ignore[call-arg]
    return plan
