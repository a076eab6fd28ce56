"""Each aggregator driven directly, without gRPC: what it asks of workers, what it accepts, what it yields."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from fedlora_common.chunking import iter_chunks, sha256
from fedlora_common.messages import TaskKind, UploadHeader, UploadKind
from fedlora_common.secagg import (
    PRIME,
    RevealedShare,
    Share,
    dequantize_sum,
    identity_keypair,
    quantization_step,
    quantize,
)
from fedlora_server.aggregation import (
    Aggregate,
    AggregationFailed,
    AttemptPlan,
    Closing,
    KeyShares,
    PlainAggregator,
    Reveal,
    RoundAggregation,
    SecureAggregator,
    SecureRoundAggregation,
)
from fedlora_server.config import SecureAggregationSection
from fedlora_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, PermissionDenied
from fedlora_server.intake import receive
from fedlora_server.metrics import ServerMetrics
from fedlora_worker.secagg_session import WorkerSession

WORKERS = ("clinical", "finance", "legal")
NUMEL = 3000
CHUNK = 1024


PLAN = AttemptPlan(
    round=1,
    attempt=1,
    participants=WORKERS,
    base_version=0,
    numel=NUMEL,
    started_at=100.0,
    train_deadline_s=50.0,
    stage_deadline_s=10.0,
    min_updates=2,
)


def _header(worker: str, payload: bytes, *, kind: UploadKind = UploadKind.DELTA, **changes: Any) -> UploadHeader:
    header = UploadHeader(
        worker_id=worker,
        run_id="run",
        round=1,
        kind=kind,
        base_version=0,
        num_examples=100,
        total_size=len(payload),
        chunk_count=-(-len(payload) // CHUNK),
        sha256=sha256(payload),
        dtype="uint32" if kind is UploadKind.MASKED else "float32",
    )
    return replace(header, **changes)


def _chunks(payload: bytes) -> Iterator[tuple[int, bytes]]:
    return ((seq, bytes(c)) for seq, c in enumerate(iter_chunks(payload, CHUNK)))


def _finished(closing: Closing | None) -> Aggregate:
    """What the phase machine does with a closing attempt, once its lock is released."""
    assert closing is not None
    return closing.finish()


def _upload(aggregation: RoundAggregation, header: UploadHeader, payload: bytes, metrics: ServerMetrics) -> None:
    sink = aggregation.open_upload(header)
    received = receive(header, _chunks(payload), sink, chunk_bytes=CHUNK, metrics=metrics)
    aggregation.fold(header, sink, received)  # as the machine does: outside its lock, then accept under it
    aggregation.accept(header, sink, received)


@pytest.fixture
def metrics() -> ServerMetrics:
    return ServerMetrics(CollectorRegistry())


# ---- plain ------------------------------------------------------------------------------


def test_plain_yields_the_example_weighted_mean_once_every_participant_uploaded(
    tmp_path: Path, metrics: ServerMetrics
) -> None:
    rng = np.random.default_rng(0)
    aggregation = PlainAggregator(weighting="examples", max_examples=1000, spool_dir=tmp_path, metrics=metrics).open(
        PLAN
    )
    updates = {w: rng.normal(size=NUMEL).astype(np.float32) for w in WORKERS}
    examples = {"clinical": 10, "finance": 30, "legal": 60}

    first = aggregation.ask("legal")
    assert first is not None
    assert first.kind is TaskKind.TRAIN
    for w in WORKERS:
        assert aggregation.step(101.0) is None
        payload = updates[w].tobytes()
        _upload(aggregation, _header(w, payload, num_examples=examples[w]), payload, metrics)
    result = _finished(aggregation.step(101.0))

    assert isinstance(result, Aggregate)
    expected = sum(updates[w].astype(np.float64) * examples[w] for w in WORKERS) / 100
    np.testing.assert_allclose(result.mean, expected, rtol=1e-6, atol=1e-7)
    assert result.contributors == WORKERS
    assert aggregation.ask("legal") is None
    assert list(tmp_path.iterdir()) == []  # spools are gone once folded


@pytest.mark.parametrize("now", [101.0, 10_000.0], ids=["all-in", "past-the-deadline"])
def test_plain_does_not_close_while_a_folded_update_waits_to_be_accepted(
    tmp_path: Path, metrics: ServerMetrics, now: float
) -> None:
    # Prepare: two updates in; the third folded (outside the coordinator's lock) but not yet accepted.
    aggregation = PlainAggregator(weighting="examples", max_examples=1000, spool_dir=tmp_path, metrics=metrics).open(
        PLAN
    )
    payloads = {w: np.full(NUMEL, float(i + 1), dtype=np.float32).tobytes() for i, w in enumerate(WORKERS)}
    for w in WORKERS[:-1]:
        _upload(aggregation, _header(w, payloads[w]), payloads[w], metrics)
    last = WORKERS[-1]
    header = _header(last, payloads[last])
    sink = aggregation.open_upload(header)
    received = receive(header, _chunks(payloads[last]), sink, chunk_bytes=CHUNK, metrics=metrics)
    aggregation.fold(header, sink, received)

    # Execute: another request steps the attempt in between, then the upload is accepted.
    between = aggregation.step(now)
    aggregation.accept(header, sink, received)
    result = _finished(aggregation.step(now))

    # Assert: nothing closed in between; what closes counts the third update, and says so.
    assert between is None
    assert result.contributors == WORKERS
    np.testing.assert_allclose(result.mean, np.full(NUMEL, 2.0, dtype=np.float32))


def test_plain_caps_a_self_reported_example_count_at_max_examples(tmp_path: Path, metrics: ServerMetrics) -> None:
    aggregation = PlainAggregator(weighting="examples", max_examples=1000, spool_dir=tmp_path, metrics=metrics).open(
        PLAN
    )
    claims = {"clinical": 1000, "finance": 1000, "legal": 10**15}
    for value, w in enumerate(WORKERS):
        payload = np.full(NUMEL, float(value), dtype=np.float32).tobytes()
        _upload(aggregation, _header(w, payload, num_examples=claims[w]), payload, metrics)

    result = _finished(aggregation.step(101.0))

    assert result is not None
    np.testing.assert_allclose(result.mean, np.full(NUMEL, 1.0, dtype=np.float32))


def test_plain_uniform_weighting_ignores_example_counts(tmp_path: Path, metrics: ServerMetrics) -> None:
    aggregation = PlainAggregator(weighting="uniform", max_examples=1000, spool_dir=tmp_path, metrics=metrics).open(
        PLAN
    )
    for value, w in enumerate(WORKERS):
        payload = np.full(NUMEL, float(value), dtype=np.float32).tobytes()
        _upload(aggregation, _header(w, payload, num_examples=10**6 if value == 2 else 1), payload, metrics)

    result = _finished(aggregation.step(101.0))

    assert result is not None
    np.testing.assert_array_equal(result.mean, np.full(NUMEL, 1.0, dtype=np.float32))


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"round": 2}, FailedPrecondition),
        ({"base_version": 3}, FailedPrecondition),
        ({"worker_id": "mallory"}, PermissionDenied),
        ({"total_size": 4 * NUMEL - 4}, InvalidArgument),
        ({"kind": UploadKind.MASKED}, FailedPrecondition),
    ],
)
def test_plain_refuses_headers_that_do_not_fit_the_attempt(
    tmp_path: Path, metrics: ServerMetrics, changes: dict[str, Any], error: type[Exception]
) -> None:
    aggregation = PlainAggregator(weighting="examples", max_examples=1000, spool_dir=tmp_path, metrics=metrics).open(
        PLAN
    )
    payload = np.zeros(NUMEL, dtype=np.float32).tobytes()

    with pytest.raises(error):
        aggregation.open_upload(_header("legal", payload, **changes))


def test_plain_refuses_a_second_update_from_one_worker(tmp_path: Path, metrics: ServerMetrics) -> None:
    aggregation = PlainAggregator(weighting="examples", max_examples=1000, spool_dir=tmp_path, metrics=metrics).open(
        PLAN
    )
    payload = np.ones(NUMEL, dtype=np.float32).tobytes()
    _upload(aggregation, _header("legal", payload), payload, metrics)

    with pytest.raises(AlreadyExists):
        aggregation.open_upload(_header("legal", payload))


def test_plain_at_the_deadline_commits_with_enough_updates_and_fails_below(
    tmp_path: Path, metrics: ServerMetrics
) -> None:
    payload = np.ones(NUMEL, dtype=np.float32).tobytes()
    enough = PlainAggregator(weighting="examples", max_examples=1000, spool_dir=tmp_path, metrics=metrics).open(PLAN)
    short = PlainAggregator(weighting="examples", max_examples=1000, spool_dir=tmp_path, metrics=metrics).open(PLAN)
    for w in ("clinical", "finance"):
        _upload(enough, _header(w, payload), payload, metrics)
    _upload(short, _header("clinical", payload), payload, metrics)

    assert enough.step(149.0) is None  # before the deadline it waits for legal
    result = _finished(enough.step(150.0))
    with pytest.raises(AggregationFailed, match="1 of 3 updates"):
        short.step(150.0)

    assert result is not None
    assert result.contributors == ("clinical", "finance")
    assert enough.missing == ("legal",)


def test_plain_a_stream_that_turns_out_bad_leaves_the_sum_bit_identical(tmp_path: Path, metrics: ServerMetrics) -> None:
    aggregation = PlainAggregator(weighting="examples", max_examples=1000, spool_dir=tmp_path, metrics=metrics).open(
        PLAN
    )
    good = np.linspace(-1, 1, NUMEL).astype(np.float32).tobytes()
    _upload(aggregation, _header("clinical", good), good, metrics)
    before = aggregation.accumulator.mean().copy()
    header = _header("legal", good, sha256=bytes(32))
    sink = aggregation.open_upload(header)

    with pytest.raises(InvalidArgument, match="digest"):
        receive(header, _chunks(good), sink, chunk_bytes=CHUNK, metrics=metrics)

    np.testing.assert_array_equal(aggregation.accumulator.mean(), before)
    assert aggregation.accumulator.contributors == 1


# ---- secure -----------------------------------------------------------------------------


class SecureSites:
    """Three real worker sessions and the coordinator's secure aggregation, stepped by hand."""

    def __init__(
        self,
        tmp_path: Path,
        metrics: ServerMetrics,
        *,
        workers: tuple[str, ...] = WORKERS,
        threshold_fraction: float = 2 / 3,
    ) -> None:
        keys = {w: identity_keypair() for w in workers}
        public = {w: k.public for w, k in keys.items()}
        settings = SecureAggregationSection(clip_range=1.0, threshold_fraction=threshold_fraction)
        self.metrics = metrics
        self.aggregator = SecureAggregator(
            run_id="run",
            settings=settings,
            max_examples=1000,
            identities=public,
            privacy=None,
            metrics=metrics,
            journal_dir=tmp_path,
        )
        self.aggregation = self.aggregator.open(replace(PLAN, participants=workers))
        assert isinstance(self.aggregation, SecureRoundAggregation)
        self.params = self.aggregation.params
        self.sessions = {
            w: WorkerSession(worker_id=w, params=self.params, identity_private=keys[w].private, peer_identities=public)
            for w in workers
        }
        rng = np.random.default_rng(7)
        self.deltas = {w: rng.uniform(-0.5, 0.5, NUMEL).astype(np.float32) for w in workers}
        self.examples = {w: 100 * (i + 1) for i, w in enumerate(workers)}
        self.vectors = {
            w: np.concatenate(
                [
                    quantize(
                        self.deltas[w] * np.float32(self.examples[w] / 1000), clip=1.0, bits=self.params.bits, rng=rng
                    ),
                    np.array([self.examples[w]], dtype=np.uint32),
                ]
            )
            for w in workers
        }

    def task(self, worker: str) -> TaskKind | None:
        ask = self.aggregation.ask(worker)
        return None if ask is None else ask.kind

    def through_share(self, now: float = 101.0) -> None:
        tag = self.params.tag
        for w, session in self.sessions.items():
            self.aggregation.receive(w, tag, session.advertise())
        assert self.aggregation.step(now) is None
        roster = self.aggregation.ask(next(iter(self.sessions)))
        assert roster is not None
        assert roster.secagg is not None
        for w, session in self.sessions.items():
            self.aggregation.receive(w, tag, KeyShares(tuple(session.share_keys(roster.secagg.roster))))
        assert self.aggregation.step(now) is None

    def masked(self, worker: str) -> bytes:
        ask = self.aggregation.ask(worker)
        assert ask is not None
        assert ask.secagg is not None
        return self.sessions[worker].mask(ask.secagg.inbox, ask.secagg.survivors, self.vectors[worker]).tobytes()

    def upload(self, worker: str, payload: bytes) -> None:
        _upload(
            self.aggregation,
            _header(worker, payload, kind=UploadKind.MASKED, tag=self.params.tag),
            payload,
            self.metrics,
        )

    def reveal_all(
        self, now: float, tamper: Callable[[str, list[RevealedShare]], list[RevealedShare]] | None = None
    ) -> Aggregate | None:
        """Close the masked-upload stage, then every survivor reveals its shares (as `tamper` rewrites them)."""
        assert self.aggregation.step(now) is None
        for w in self.sessions:
            ask = self.aggregation.ask(w)
            if ask is not None and ask.kind is TaskKind.SECAGG_UNMASK:
                assert ask.secagg is not None
                shares = self.sessions[w].reveal(ask.secagg.survivors, ask.secagg.dropped)
                if tamper is not None:
                    shares = tamper(w, shares)
                self.aggregation.receive(w, self.params.tag, Reveal(tuple(shares)))
        closing = self.aggregation.step(now)
        return None if closing is None else closing.finish()

    def expected(self, workers: tuple[str, ...]) -> np.ndarray:
        total = np.zeros(NUMEL + 1, dtype=np.uint32)
        for w in workers:
            total += self.vectors[w]
        values = dequantize_sum(total[:-1], clip=1.0, bits=self.params.bits)
        return values * (1000 / float(total[-1]))


def test_secure_yields_the_weighted_mean_of_the_masked_uploads(tmp_path: Path, metrics: ServerMetrics) -> None:
    sites = SecureSites(tmp_path, metrics)
    assert sites.task("legal") is TaskKind.TRAIN

    sites.through_share()
    assert sites.task("legal") is TaskKind.SECAGG_MASKED_UPLOAD
    for w in WORKERS:
        sites.upload(w, sites.masked(w))
    result = sites.reveal_all(101.0)

    assert result is not None
    np.testing.assert_allclose(result.mean, sites.expected(WORKERS), rtol=1e-6)
    weighted = sum(sites.deltas[w].astype(np.float64) * sites.examples[w] for w in WORKERS) / 600
    step = quantization_step(clip=1.0, bits=sites.params.bits)
    float32_rounding = np.abs(weighted).max() * np.finfo(np.float32).eps
    assert np.max(np.abs(result.mean - weighted)) <= 3 * step * 1000 / 600 + float32_rounding
    assert result.secagg is not None
    assert set(result.secagg) == {"advertise", "share", "masked", "unmask"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{w}.masked-journal" for w in WORKERS]  # one per worker


def test_secure_a_masked_stream_that_turns_out_bad_is_taken_back_exactly(
    tmp_path: Path, metrics: ServerMetrics
) -> None:
    sites = SecureSites(tmp_path, metrics)
    sites.through_share()
    payload = sites.masked("legal")
    header = _header("legal", payload, kind=UploadKind.MASKED, tag=sites.params.tag, sha256=bytes(32))
    sink = sites.aggregation.open_upload(header)

    with pytest.raises(InvalidArgument, match="digest"):  # every chunk was folded before the digest was checked
        receive(header, _chunks(payload), sink, chunk_bytes=CHUNK, metrics=metrics)
    for w in WORKERS:  # legal retries with the same bytes, honestly declared
        sites.upload(w, payload if w == "legal" else sites.masked(w))
    result = sites.reveal_all(101.0)

    assert result is not None
    np.testing.assert_allclose(result.mean, sites.expected(WORKERS), rtol=1e-6)


def test_secure_a_stream_still_open_when_the_stage_closes_is_revoked(tmp_path: Path, metrics: ServerMetrics) -> None:
    sites = SecureSites(tmp_path, metrics)
    sites.through_share()
    for w in ("clinical", "finance"):
        sites.upload(w, sites.masked(w))
    payload = sites.masked("legal")
    header = _header("legal", payload, kind=UploadKind.MASKED, tag=sites.params.tag)
    sink = sites.aggregation.open_upload(header)
    half = list(_chunks(payload))[:2]

    def stalled() -> Iterator[tuple[int, bytes]]:
        yield from half
        assert sites.aggregation.step(200.0) is None  # the masked stage's deadline passes mid-stream
        yield from list(_chunks(payload))[2:]

    with pytest.raises(FailedPrecondition, match="closed"):
        receive(header, stalled(), sink, chunk_bytes=CHUNK, metrics=metrics)
    result = sites.reveal_all(200.0)

    assert result is not None
    np.testing.assert_allclose(result.mean, sites.expected(("clinical", "finance")), rtol=1e-6)
    assert result.contributors == ("clinical", "finance")


def test_secure_a_revealer_whose_share_is_off_the_polynomial_is_named_and_the_honest_shares_still_unmask(
    tmp_path: Path, metrics: ServerMetrics
) -> None:
    # Prepare: five sites, threshold 3, so the five self-seed shares of each survivor can single out one liar.
    workers = ("w0", "w1", "w2", "w3", "w4")
    sites = SecureSites(tmp_path, metrics, workers=workers, threshold_fraction=0.5)
    sites.through_share()
    for w in workers:
        sites.upload(w, sites.masked(w))

    def lie_about_w0(revealer: str, shares: list[RevealedShare]) -> list[RevealedShare]:
        if revealer != "w1":
            return shares
        out = []
        for r in shares:
            if r.owner == "w0":
                share = Share.from_bytes(r.share)
                r = replace(r, share=Share(share.x, (share.y + 1) % PRIME).to_bytes())
            out.append(r)
        return out

    # Execute
    result = sites.reveal_all(101.0, tamper=lie_about_w0)

    # Assert: the four honest shares rebuilt w0's seed; every update is in the mean, and the liar is named.
    assert result is not None
    assert result.excluded == ("w1",)
    np.testing.assert_allclose(result.mean, sites.expected(workers), rtol=1e-6)


def test_secure_a_bad_share_among_just_enough_is_still_caught_by_the_seed_commitment(
    tmp_path: Path, metrics: ServerMetrics
) -> None:
    # Prepare: three sites, threshold 3: no share to spare, so nobody can be singled out.
    sites = SecureSites(tmp_path, metrics, threshold_fraction=1.0)
    sites.through_share()
    for w in WORKERS:
        sites.upload(w, sites.masked(w))

    def nudge(revealer: str, shares: list[RevealedShare]) -> list[RevealedShare]:
        if revealer != "clinical":
            return shares
        share = Share.from_bytes(shares[0].share)
        return [replace(shares[0], share=Share(share.x, (share.y + 1) % PRIME).to_bytes()), *shares[1:]]

    # Execute / Assert: a seed off by a little would unmask silently to a wrong model; the commitment refuses it.
    with pytest.raises(AggregationFailed, match="cannot be reconstructed") as failed:
        sites.reveal_all(101.0, tamper=nudge)
    assert failed.value.offenders == ()


def test_secure_messages_for_another_attempt_are_refused(tmp_path: Path, metrics: ServerMetrics) -> None:
    sites = SecureSites(tmp_path, metrics)

    legal = sites.sessions["legal"].advertise()

    with pytest.raises(FailedPrecondition, match="tag"):
        sites.aggregation.receive("legal", sites.params.tag + 1, legal)
    with pytest.raises(PermissionDenied):
        sites.aggregation.receive("clinical", sites.params.tag, legal)


def test_secure_below_the_threshold_fails_the_attempt(tmp_path: Path, metrics: ServerMetrics) -> None:
    sites = SecureSites(tmp_path, metrics)
    sites.aggregation.receive("legal", sites.params.tag, sites.sessions["legal"].advertise())

    with pytest.raises(AggregationFailed, match="threshold"):
        sites.aggregation.step(150.0)
