"""The worker daemon driven through the Coordinator protocol by a fake coordinator: no gRPC, real model.

Each test scripts the tasks a coordinator would hand out, runs the real `Worker` to the end of the
script, and checks the values it sent against what the test computes on its own.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import CollectorRegistry

from fedlora_common.manifest import Manifest, TensorSpec, flatten, unflatten, update_manifest
from fedlora_common.messages import (
    MetricsReport,
    ModelVersion,
    RunSpec,
    SecAggTask,
    Task,
    TaskKind,
    UploadKind,
)
from fedlora_common.plans import LoraSpec, TrainingPlan
from fedlora_common.secagg import (
    Advertisement,
    Complaint,
    EncryptedShare,
    RevealedShare,
    SecAggParams,
    Share,
    combine_shares,
    identity_keypair,
    round_tag,
    unmask_sum,
    x25519_public_of,
)
from fedlora_worker.config import WorkerSettings
from fedlora_worker.coordinator import (
    Coordinator,
    DownloadedModel,
    Misconfigured,
    NotJoined,
    Refused,
    StaleTask,
    TlsMisconfigured,
    Unreachable,
)
from fedlora_worker.daemon import Worker, WorkerFailed, WorkerOutcome
from fedlora_worker.data import load_records, tokenize
from fedlora_worker.metrics import WorkerMetrics
from fedlora_worker.modeling import LoadedModel, SiteModel, global_state, load_model, set_global_state
from fedlora_worker.protect import clip_l2, encode, noise_generator, rounding_generator
from fedlora_worker.secagg_session import WorkerSession
from fedlora_worker.training import evaluate

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

ME = "clinical"
PEERS = ("legal", "finance")
TRAIN_RECORDS = 24
LORA = LoraSpec(rank=4, alpha=8, dropout=0.0)
PLAN = TrainingPlan(local_steps=2, batch_size=4, learning_rate=1e-2, max_seq_len=32, update_clip_norm=1e-3, seed=3)

Script = Callable[["FakeCoordinator"], Task]


@dataclass(frozen=True)
class Sent:
    """One upload as the worker made it."""

    round: int
    kind: UploadKind
    base_version: int
    num_examples: int
    vector: npt.NDArray[np.float32] | npt.NDArray[np.uint32]
    train_loss: float
    tag: int
    manifest: Manifest | None
    artifact_config_json: str


@dataclass
class FakeCoordinator:
    """The Coordinator protocol in process: tasks from a script, every call recorded."""

    run: RunSpec
    script: deque[Script]
    versions: dict[int, npt.NDArray[np.float32]] = field(default_factory=dict)
    joins: int = 0
    uploads: list[Sent] = field(default_factory=list)
    reports: list[MetricsReport] = field(default_factory=list)
    advertised: dict[int, Advertisement] = field(default_factory=dict)
    shared: dict[int, list[EncryptedShare]] = field(default_factory=dict)
    revealed: dict[int, list[RevealedShare]] = field(default_factory=dict)
    complaints: dict[int, list[Complaint]] = field(default_factory=dict)
    left: list[str] = field(default_factory=list)
    closed: bool = False
    stopped: bool = False

    @property
    def worker_id(self) -> str:
        return ME

    def publish(self, version: int, vector: npt.NDArray[np.float32], manifest: Manifest) -> ModelVersion:
        self.versions[version] = vector
        return ModelVersion(version, vector.nbytes, hashlib.sha256(vector.tobytes()).digest(), manifest)

    def join(self, num_examples: int, *, rank: int = 0, base_precision: str = "") -> RunSpec:
        self.joins += 1
        return self.run

    def poll(self, run_id: str) -> Task:
        assert run_id == self.run.run_id
        return self.script.popleft()(self) if self.script else Task(TaskKind.FINISHED)

    def download(
        self, run_id: str, version: ModelVersion, *, on_bytes: Callable[[int], None] = lambda n: None
    ) -> DownloadedModel:
        vector = self.versions[version.version].copy()
        on_bytes(vector.nbytes)
        return DownloadedModel(version, vector, "{}")

    def upload(
        self,
        *,
        run_id: str,
        round_: int,
        kind: UploadKind,
        base_version: int,
        num_examples: int,
        vector: npt.NDArray[np.float32] | npt.NDArray[np.uint32],
        train_loss: float = 0.0,
        tag: int = 0,
        manifest: Manifest | None = None,
        artifact_config_json: str = "",
        on_bytes: Callable[[int], None] = lambda n: None,
    ) -> int:
        sent = Sent(
            round_, kind, base_version, num_examples, vector.copy(), train_loss, tag, manifest, artifact_config_json
        )
        self.uploads.append(sent)
        on_bytes(vector.nbytes)
        return vector.nbytes

    def advertise(self, run_id: str, tag: int, keys: Advertisement) -> None:
        self.advertised[tag] = keys

    def share_keys(self, run_id: str, tag: int, shares: Iterable[EncryptedShare]) -> None:
        self.shared[tag] = list(shares)

    def reveal(self, run_id: str, tag: int, shares: Iterable[RevealedShare]) -> None:
        self.revealed[tag] = list(shares)

    def complain(self, run_id: str, tag: int, complaint: Complaint) -> None:
        self.complaints.setdefault(tag, []).append(complaint)

    def report(self, report: MetricsReport) -> None:
        self.reports.append(report)

    def leave(self, run_id: str, reason: str) -> None:
        self.left.append(reason)

    def stop(self) -> None:
        self.stopped = True

    def close(self) -> None:
        self.closed = True


@dataclass
class Site:
    """One worker under test: its settings, metrics, and the model it loaded (kept to read back)."""

    settings: WorkerSettings
    metrics: WorkerMetrics
    registry: CollectorRegistry
    loaded: list[LoadedModel] = field(default_factory=list)

    def load(self, run: RunSpec, site: SiteModel) -> LoadedModel:
        self.loaded.append(load_model(run, site))
        return self.loaded[-1]

    def run(self, coordinator: Coordinator) -> WorkerOutcome:
        with Worker(settings=self.settings, client=coordinator, metrics=self.metrics, load=self.load) as worker:
            return worker.run()

    def gauge(self, name: str) -> float:
        value = self.registry.get_sample_value(name)
        assert value is not None, name
        return value


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


IDENTITIES = {w: identity_keypair() for w in (ME, *PEERS)}


@pytest.fixture
def site(tmp_path: Path, tiny_base_model: Path, make_sentences: Callable[[int, int], list[str]]) -> Site:
    key = tmp_path / "identity.key"
    key.write_text(IDENTITIES[ME].private.hex())
    settings = WorkerSettings.model_validate(
        {
            "worker_id": ME,
            "token": "secret",
            "base_model": str(tiny_base_model),
            "data": {
                "train": [_jsonl(tmp_path / "train.jsonl", make_sentences(TRAIN_RECORDS, 21))],
                "eval": [_jsonl(tmp_path / "eval.jsonl", make_sentences(6, 22))],
            },
            "progress": False,
            "identity_key": key,
            "peers": {w: keys.public.hex() for w, keys in IDENTITIES.items()},
        }
    )
    registry = CollectorRegistry()
    return Site(settings, WorkerMetrics(registry), registry)


@pytest.fixture
def run(make_run: Callable[..., RunSpec]) -> RunSpec:
    return make_run("lora", lora=LORA, seed=5)


@pytest.fixture
def manifest(load_tiny: Callable[..., LoadedModel]) -> Manifest:
    return load_tiny("lora", lora=LORA).manifest


def random_global(manifest: Manifest, seed: int) -> npt.NDArray[np.float32]:
    """A global adapter with B nonzero, so the model's output depends on every tensor."""
    return np.random.default_rng(seed).normal(0.0, 0.05, manifest.numel).astype(np.float32)


def scripted(run: RunSpec, *steps: Script) -> FakeCoordinator:
    return FakeCoordinator(run, deque(steps))


def _always(task: Task) -> Script:
    return lambda c: task


def test_initialize_uploads_the_seeded_initial_adapter_with_its_manifest(
    site: Site, run: RunSpec, load_tiny: Callable[..., LoadedModel]
) -> None:
    coordinator = scripted(run, lambda c: Task(TaskKind.INITIALIZE))

    outcome = site.run(coordinator)

    (sent,) = coordinator.uploads
    reference = load_tiny("lora", lora=LORA, seed=run.seed)  # another site, same run: same initial adapter
    assert outcome == WorkerOutcome(run.run_id, 0, finished=True)
    assert sent.kind is UploadKind.INITIAL
    assert sent.manifest == reference.manifest
    np.testing.assert_array_equal(sent.vector, flatten(reference.manifest, global_state(reference)))
    assert json.loads(sent.artifact_config_json)["r"] == LORA.rank
    assert coordinator.closed


@pytest.mark.parametrize("aggregation", ["fedavg", "ffa"])
def test_plain_training_uploads_the_clipped_local_minus_global_delta_in_manifest_order(
    site: Site, make_run: Callable[..., RunSpec], manifest: Manifest, aggregation: str
) -> None:
    # Prepare: a global version to start from, and one training task on it.
    run = make_run("lora", lora=LORA, aggregation=aggregation, seed=5)
    coordinator = scripted(run)
    version = coordinator.publish(1, random_global(manifest, seed=1), manifest)
    coordinator.script.append(lambda c: Task(TaskKind.TRAIN, round=1, global_version=version, training=PLAN))

    # Execute
    outcome = site.run(coordinator)

    # Assert: per tensor, in the manifest's order, (local - global) scaled onto the clip norm.
    (sent,) = coordinator.uploads
    (loaded,) = site.loaded
    local, start = global_state(loaded), unflatten(manifest, coordinator.versions[1])
    shipped = update_manifest(manifest, aggregation)
    delta = np.concatenate([(local[t.name] - start[t.name]).reshape(-1) for t in shipped.tensors])
    assert float(np.linalg.norm(delta)) > 10 * PLAN.update_clip_norm  # the clip matters
    assert outcome.rounds_trained == 1
    assert (sent.kind, sent.round, sent.base_version, sent.num_examples) == (UploadKind.DELTA, 1, 1, TRAIN_RECORDS)
    assert sent.vector.size == shipped.numel
    np.testing.assert_allclose(sent.vector, delta * (PLAN.update_clip_norm / np.linalg.norm(delta)), rtol=1e-5, atol=0)
    assert np.linalg.norm(sent.vector) == pytest.approx(PLAN.update_clip_norm, rel=1e-5)
    assert math.isfinite(sent.train_loss)
    assert sent.train_loss == site.gauge("fedlora_worker_train_loss") > 0
    assert site.gauge("fedlora_worker_training_steps_total") == PLAN.local_steps


def test_evaluation_reports_the_loss_of_the_global_version_on_the_sites_eval_records(
    site: Site, run: RunSpec, manifest: Manifest, load_tiny: Callable[..., LoadedModel]
) -> None:
    coordinator = scripted(run)
    version = coordinator.publish(2, random_global(manifest, seed=2), manifest)
    coordinator.script.append(lambda c: Task(TaskKind.EVALUATE, round=2, global_version=version, training=PLAN))

    site.run(coordinator)

    reference = load_tiny("lora", lora=LORA, seed=run.seed)
    set_global_state(reference, unflatten(manifest, coordinator.versions[2]))
    records = load_records(list(site.settings.data.eval))
    expected = evaluate(
        reference.model,
        tokenize(records, reference.tokenizer, max_seq_len=PLAN.max_seq_len),
        batch_size=8,
        pad_id=reference.pad_id,
    )
    (report,) = coordinator.reports
    assert (report.worker_id, report.run_id, report.round, report.version) == (ME, run.run_id, 2, 2)
    assert report.eval_tokens == expected.tokens > 0
    assert report.eval_loss == pytest.approx(expected.loss, rel=1e-6)
    assert report.eval_loss == site.gauge("fedlora_worker_eval_loss")
    assert report.record_epsilon is None  # no DP-SGD in the plan
    assert report.memorization is None  # no audit asked for


class Peers:
    """The two other sites of a secure round: real sessions, fixed encoded updates, no model."""

    def __init__(self, params: SecAggParams, size: int) -> None:
        public = {w: keys.public for w, keys in IDENTITIES.items()}
        self.params = params
        self.sessions = {
            w: WorkerSession(worker_id=w, params=params, identity_private=IDENTITIES[w].private, peer_identities=public)
            for w in PEERS
        }
        rng = np.random.default_rng(params.tag)
        self.encoded = {w: rng.integers(0, 2**32, size, dtype=np.uint32) for w in PEERS}
        self.ads = {w: s.advertise() for w, s in self.sessions.items()}
        self.shares: list[EncryptedShare] = []
        self.masked: dict[str, npt.NDArray[np.uint32]] = {}

    def share_keys(self, c: FakeCoordinator) -> Task:
        roster = (c.advertised[self.params.tag], *self.ads.values())
        self.shares = [s for session in self.sessions.values() for s in session.share_keys(roster)]
        return self._task(TaskKind.SECAGG_SHARE_KEYS, SecAggTask(self.params, roster=roster))

    def masked_upload(self, c: FakeCoordinator) -> Task:
        mine = c.shared[self.params.tag]
        everyone = (ME, *PEERS)
        for w, session in self.sessions.items():
            delivered = [s for s in [*mine, *self.shares] if s.recipient == w]
            self.masked[w] = session.mask(delivered, everyone, self.encoded[w])
        inbox = tuple(s for s in self.shares if s.recipient == ME)
        return self._task(TaskKind.SECAGG_MASKED_UPLOAD, SecAggTask(self.params, inbox=inbox, survivors=everyone))

    def unmask(self, c: FakeCoordinator) -> Task:
        return self._task(TaskKind.SECAGG_UNMASK, SecAggTask(self.params, survivors=(ME, *PEERS)))

    def _task(self, kind: TaskKind, stage: SecAggTask) -> Task:
        return Task(kind, round=1, secagg=stage)

    def unmasked(self, c: FakeCoordinator, mine: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
        """What the coordinator recovers: the sum of all three, self masks removed from revealed shares."""
        reveals = [*c.revealed[self.params.tag]]
        reveals += [r for s in self.sessions.values() for r in s.reveal((ME, *PEERS), ())]
        t = self.params.threshold
        seeds = [
            combine_shares([Share.from_bytes(r.share) for r in reveals if r.owner == w][:t], threshold=t)
            for w in (ME, *PEERS)
        ]
        total = mine + self.masked["legal"] + self.masked["finance"]
        return unmask_sum(total, self_seeds=seeds, dropped_pairwise=[])


def test_a_secure_round_masks_the_quantized_weighted_update_and_a_retry_sends_it_again_bit_for_bit(
    site: Site, run: RunSpec, manifest: Manifest
) -> None:
    # Prepare: two attempts of round 1 (the first retried by the coordinator after it completed), the
    # same global version, three participants of which two are played by the test.
    coordinator = scripted(run)
    version = coordinator.publish(1, random_global(manifest, seed=3), manifest)
    attempts = []
    trained: list[npt.NDArray[np.float32]] = []

    def after_training(step: Script) -> Script:
        def read_local_state(c: FakeCoordinator) -> Task:
            trained.append(flatten(manifest, global_state(site.loaded[-1])))
            return step(c)

        return read_local_state

    for attempt in (0, 1):
        params = SecAggParams(
            run_id=run.run_id,
            tag=round_tag(1, attempt),
            participants=(ME, *PEERS),
            threshold=2,
            bits=16,
            clip_range=PLAN.update_clip_norm,
            max_examples=64,
        )
        peers = Peers(params, manifest.numel + 1)
        attempts.append(peers)
        train = Task(TaskKind.TRAIN, round=1, global_version=version, training=PLAN, secagg=SecAggTask(params))
        share_keys = after_training(peers.share_keys) if attempt == 0 else peers.share_keys
        coordinator.script.extend([_always(train), share_keys, peers.masked_upload, peers.unmask])

    # Execute
    outcome = site.run(coordinator)

    # Assert: each attempt unmasks to exactly this site's clipped, weighted, quantized update (plus the
    # peers'), the one the test encodes itself with the rounding fixed by (run seed, round, worker).
    assert len(site.loaded) == 1
    delta = trained[0] - coordinator.versions[1]
    expected = encode(
        delta,
        clip_norm=PLAN.update_clip_norm,
        examples=TRAIN_RECORDS,
        params=attempts[0].params,
        rounding=rounding_generator(run.seed, 1, ME),
        noise_rng=noise_generator(),  # the round adds no noise
    )
    assert outcome.rounds_trained == 2
    assert site.gauge("fedlora_worker_training_steps_total") == PLAN.local_steps  # the retry did not train again
    assert [u.kind for u in coordinator.uploads] == [UploadKind.MASKED] * 2
    assert [u.tag for u in coordinator.uploads] == [p.params.tag for p in attempts]
    for sent, peers in zip(coordinator.uploads, attempts, strict=True):
        assert not np.array_equal(sent.vector, expected)  # masked
        masked = sent.vector.astype(np.uint32, copy=False)
        own = peers.unmasked(coordinator, masked) - peers.encoded["legal"] - peers.encoded["finance"]
        np.testing.assert_array_equal(own, expected)
    assert expected[-1] == TRAIN_RECORDS  # the weight travels as the last coordinate
    assert float(np.linalg.norm(delta)) > 10 * PLAN.update_clip_norm  # the clip inside encode matters
    quantized = expected[:-1].view(np.int32) * (PLAN.update_clip_norm / ((1 << 15) - 1))
    weighted = clip_l2(delta, PLAN.update_clip_norm) * (TRAIN_RECORDS / 64)
    assert np.abs(quantized - weighted).max() <= PLAN.update_clip_norm / ((1 << 15) - 1)


def test_a_worker_the_coordinator_no_longer_knows_joins_again(site: Site, run: RunSpec) -> None:
    def forgotten(c: FakeCoordinator) -> Task:
        raise NotJoined("unknown worker: the coordinator restarted")

    coordinator = scripted(run, forgotten)

    outcome = site.run(coordinator)

    assert coordinator.joins == 2
    assert outcome.finished


def test_a_coordinator_that_restarted_or_moved_on_is_polled_again_and_rejoined_in_any_phase(
    site: Site, run: RunSpec, manifest: Manifest
) -> None:
    # Prepare: every kind of "not now" a restarted coordinator answers, at different calls.
    coordinator = scripted(run)
    version = coordinator.publish(1, random_global(manifest, seed=5), manifest)

    def stale(c: FakeCoordinator) -> Task:
        raise StaleTask("report: no evaluation of round 1 is open")

    def unreachable(c: FakeCoordinator) -> Task:
        raise Unreachable("poll: UNAVAILABLE after 8 attempts")

    evaluate = Task(TaskKind.EVALUATE, round=1, global_version=version, training=PLAN)
    coordinator.script.extend([stale, unreachable, _always(evaluate)])

    # Execute
    outcome = site.run(coordinator)

    # Assert: nothing was fatal; the worker joined again after the silence and finished the run.
    assert outcome.finished
    assert coordinator.joins == 2
    assert [r.round for r in coordinator.reports] == [1]
    assert coordinator.left == []


def test_a_site_that_cannot_go_on_tells_the_coordinator_why_before_it_stops(
    site: Site, run: RunSpec, manifest: Manifest
) -> None:
    # Prepare: a global version whose manifest is not this model's (a broken or foreign base).
    coordinator = scripted(run)
    foreign = Manifest((TensorSpec("base_model.model.nonexistent.lora_A.weight", (2, 2)),))
    version = coordinator.publish(1, np.zeros(4, dtype=np.float32), foreign)
    coordinator.script.append(_always(Task(TaskKind.TRAIN, round=1, global_version=version, training=PLAN)))

    # Execute / Assert
    with pytest.raises(WorkerFailed, match="ValueError") as failed:
        site.run(coordinator)
    assert coordinator.left == [str(failed.value)]
    assert "\n" not in coordinator.left[0]
    assert coordinator.uploads == []


def test_a_share_that_does_not_open_is_complained_of_with_this_sites_key_instead_of_masking(
    site: Site, run: RunSpec, manifest: Manifest
) -> None:
    # Prepare: legal seals this site a share of the right length that does not open.
    coordinator = scripted(run)
    version = coordinator.publish(1, random_global(manifest, seed=4), manifest)
    params = SecAggParams(
        run_id=run.run_id,
        tag=round_tag(1, 1),
        participants=(ME, *PEERS),
        threshold=2,
        bits=16,
        clip_range=PLAN.update_clip_norm,
        max_examples=64,
    )
    peers = Peers(params, manifest.numel + 1)
    train = Task(TaskKind.TRAIN, round=1, global_version=version, training=PLAN, secagg=SecAggTask(params))

    def masked_upload(c: FakeCoordinator) -> Task:
        task = peers.masked_upload(c)
        assert task.secagg is not None
        inbox = tuple(
            EncryptedShare(s.sender, s.recipient, bytes(len(s.ciphertext))) if s.sender == "legal" else s
            for s in task.secagg.inbox
        )
        return Task(task.kind, round=1, secagg=SecAggTask(params, inbox=inbox, survivors=task.secagg.survivors))

    coordinator.script.extend([_always(train), peers.share_keys, masked_upload])

    # Execute
    outcome = site.run(coordinator)

    # Assert: no masked update left the site; the complaint names legal and carries the advertised key's private half.
    assert outcome.finished
    assert coordinator.uploads == []
    (complaint,) = coordinator.complaints[params.tag]
    assert complaint.accused == ("legal",)
    assert x25519_public_of(complaint.enc_private) == coordinator.advertised[params.tag].enc_public
    assert coordinator.left == []


def test_a_coordinator_refusing_this_sites_identity_key_ends_the_site_with_its_reason(
    site: Site, run: RunSpec, manifest: Manifest
) -> None:
    # Prepare: the coordinator answers the advertisement PERMISSION_DENIED, as it does for a wrong identity_key.
    coordinator = scripted(run)
    version = coordinator.publish(1, random_global(manifest, seed=6), manifest)
    params = SecAggParams(
        run_id=run.run_id,
        tag=round_tag(1, 1),
        participants=(ME, *PEERS),
        threshold=2,
        bits=16,
        clip_range=1.0,
        max_examples=64,
    )
    coordinator.script.append(
        _always(Task(TaskKind.TRAIN, round=1, global_version=version, training=PLAN, secagg=SecAggTask(params)))
    )
    denied = "advertise: PERMISSION_DENIED: the signature on clinical's keys does not verify for this round"

    def refuse(run_id: str, tag: int, keys: Advertisement) -> None:
        raise Refused(denied, code="PERMISSION_DENIED")

    coordinator.advertise = refuse  # type: ignore[method-assign]

    # Execute / Assert: Misconfigured (the program exits 2), and the coordinator was told why in one line.
    with pytest.raises(Misconfigured, match="refuses this site as configured: advertise: PERMISSION_DENIED") as refused:
        site.run(coordinator)
    assert coordinator.left == [str(refused.value)]
    assert coordinator.uploads == []


def test_tls_that_fails_for_a_reason_of_configuration_mid_run_ends_the_site_without_a_word_to_the_coordinator(
    site: Site, run: RunSpec
) -> None:
    # Prepare: the worker joined; then its certificate expired and every call fails the handshake.
    cause = "tls.cert: /etc/fedlora/clinical.crt expired on 2026-01-01 00:00 UTC; the coordinator refuses it"

    def refused_handshake(c: FakeCoordinator) -> Task:
        raise TlsMisconfigured(cause)

    coordinator = scripted(run, refused_handshake)

    # Execute / Assert: the program exits 2 with the cause; nothing was sent to a coordinator it cannot reach.
    with pytest.raises(TlsMisconfigured, match="expired on 2026-01-01"):
        site.run(coordinator)
    assert coordinator.left == []
    assert coordinator.joins == 1


def test_progress_bars_never_reach_a_redirected_log(
    site: Site, run: RunSpec, manifest: Manifest, capfd: pytest.CaptureFixture[str]
) -> None:
    # Prepare: progress on (the default), stderr a pipe as in a container or under systemd.
    site.settings = site.settings.model_copy(update={"progress": True})
    coordinator = scripted(run)
    version = coordinator.publish(1, random_global(manifest, seed=1), manifest)
    coordinator.script.append(lambda c: Task(TaskKind.TRAIN, round=1, global_version=version, training=PLAN))

    # Execute: a round that downloads, trains and uploads, each of which has a bar on a terminal.
    site.run(coordinator)

    # Assert: the round happened, and none of the daemon's bars was written.
    err = capfd.readouterr().err
    assert len(coordinator.uploads) == 1
    assert not [bar for bar in ("download:", "train:", "upload:") if bar in err]
