"""The worker daemon: join, then do what the coordinator asks until the run is finished.

Records stay on this site. What leaves it: the example count, aggregate losses and
throughput, and protected updates (delta = local - global in manifest order, through the
protection pipeline of fedlora_worker.protect). The daemon talks to the coordinator only through
the `fedlora_worker.coordinator.Coordinator` protocol.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import numpy.typing as npt
import structlog
import torch
from tqdm import tqdm

from fedlora_common.blocks import block_groups
from fedlora_common.manifest import flatten, unflatten, update_manifest
from fedlora_common.messages import (
    AuditPlan,
    Memorization,
    MemorizationRates,
    MetricsReport,
    RunSpec,
    Task,
    TaskKind,
    TrainingPlan,
    UploadKind,
)
from fedlora_common.privacy import gaussian_epsilon
from fedlora_worker import protect
from fedlora_worker.audit import audit_model, load_canaries
from fedlora_worker.config import WorkerSettings
from fedlora_worker.coordinator import (
    CONFIGURATION_REFUSALS,
    Coordinator,
    DownloadedModel,
    Misconfigured,
    NotJoined,
    Refused,
    StaleTask,
    TlsMisconfigured,
    TransferError,
    Unreachable,
)
from fedlora_worker.data import TokenizedData, load_records, tokenize
from fedlora_worker.distributed import Trainer, site_model, train_in_process
from fedlora_worker.metrics import WorkerMetrics
from fedlora_worker.modeling import (
    LoadedModel,
    SiteMismatch,
    SiteModel,
    artifact_config_json,
    global_state,
    load_model,
    set_global_state,
)
from fedlora_worker.secure_steps import SecureSteps
from fedlora_worker.training import evaluate

__all__ = ["Worker", "WorkerFailed", "WorkerOutcome"]

log = structlog.get_logger()


@dataclass(frozen=True)
class _Trained:
    """This round's local update, kept so a retried attempt sends it again instead of retraining."""

    key: Hashable
    delta: npt.NDArray[np.float32]
    loss: float


class _Stopping(Exception):
    """Raised inside long local work (a training step) once the worker is shut down, to end it at once."""


class WorkerFailed(Exception):
    """This site cannot go on (model, data, memory...); the coordinator was told why."""


@dataclass(frozen=True)
class WorkerOutcome:
    run_id: str
    rounds_trained: int
    finished: bool


class Worker:
    """One site's participation in one run. `run()` blocks; `shutdown()` may be called from any thread."""

    def __init__(
        self,
        *,
        settings: WorkerSettings,
        client: Coordinator,
        metrics: WorkerMetrics,
        idle: Callable[[float], bool] | None = None,
        load: Callable[[RunSpec, SiteModel], LoadedModel] = load_model,
        site: SiteModel | None = None,
        train: Trainer = train_in_process,
    ) -> None:
        self._settings = settings
        self._client = client
        self._metrics = metrics
        self._stopping = threading.Event()
        self._idle = idle or self._stopping.wait
        self._load = load
        self._train_round = train  # this process alone, or every process of the site (distributed.SiteGroup)
        self._site = site or site_model(settings)
        self._records = load_records(list(settings.data.train))
        self._eval_records = load_records(list(settings.data.eval)) if settings.data.eval else None
        self._canaries = load_canaries(settings.data.canaries)
        self._private_steps = 0
        self._sample_rate = 0.0
        self._loaded: LoadedModel | None = None
        self._held: DownloadedModel | None = None
        self._train_data: TokenizedData | None = None
        self._eval_data: TokenizedData | None = None
        self._seq_len = 0
        self._secure = SecureSteps(
            client=client,
            identity=settings.identity_private,
            peers=settings.peers,
            idle=self._idle,
            upload=self._upload_masked,
        )
        self._trained: _Trained | None = None

    @property
    def num_examples(self) -> int:
        return len(self._records)

    def run(self) -> WorkerOutcome:
        """Take part until the run finishes. A coordinator that restarts or moves on is waited for and
        rejoined, whatever the phase; a failure of this site's own is told to the coordinator (WorkerFailed)."""
        spec = self._join()
        if spec is not None:
            self._load_at_join(spec)
        trained = 0
        while spec is not None and not self._stopping.is_set():
            try:
                task = self._client.poll(spec.run_id)
                structlog.contextvars.bind_contextvars(round=task.round)
                if task.kind is TaskKind.FINISHED:
                    log.info("run_finished", rounds_trained=trained, reason=task.reason)
                    return WorkerOutcome(spec.run_id, trained, finished=True)
                trained += self._do(spec, task)
            except _Stopping:
                break
            except NotJoined as exc:
                log.info("rejoining", reason=str(exc))
                spec = self._join()
            except (StaleTask, TransferError) as exc:
                log.info("task_abandoned", reason=str(exc))
            except Unreachable as exc:
                log.warning("coordinator_unreachable", reason=str(exc))
                spec = self._join()
            except Refused as exc:
                if exc.code not in CONFIGURATION_REFUSALS:
                    raise self._cannot_go_on(spec, exc) from exc
                reason = f"the coordinator refuses this site as configured: {exc}"[:500]
                log.error("site_refused", reason=reason)
                self._client.leave(spec.run_id, reason)
                raise Misconfigured(reason) from exc
            except TlsMisconfigured:
                raise  # the coordinator cannot be reached to be told
            except Exception as exc:
                raise self._cannot_go_on(spec, exc) from exc
        return WorkerOutcome(spec.run_id if spec else "", trained, finished=False)

    def _cannot_go_on(self, spec: RunSpec, exc: Exception) -> WorkerFailed:
        """Tell the coordinator why this site stops (one line), and what to raise."""
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]
        log.error("cannot_go_on", reason=reason)
        self._client.leave(spec.run_id, reason)
        return WorkerFailed(reason)

    def _join(self) -> RunSpec | None:
        """Join, waiting out an unreachable coordinator for as long as it takes; None once shut down."""
        while not self._stopping.is_set():
            try:
                spec = self._client.join(
                    self.num_examples,
                    rank=self._site.max_rank or 0,
                    base_precision="" if self._site.base_precision == "auto" else self._site.base_precision,
                )
            except Unreachable as exc:
                log.warning("coordinator_unreachable", reason=str(exc))
                self._idle(self._settings.retry.max_backoff_s)
                continue
            structlog.contextvars.bind_contextvars(run_id=spec.run_id, worker_id=self._client.worker_id)
            log.info("joined", mode=spec.mode, rounds=spec.total_rounds, examples=self.num_examples)
            return spec
        return None

    def _load_at_join(self, spec: RunSpec) -> None:
        """Load the model as the run specifies it before any task, so a run this site's model does not fit
        (SiteMismatch: re-raised, exit 2) or a model that does not load is refused now, and the coordinator told why."""
        try:
            self._model(spec)
        except Exception as exc:
            mismatch = isinstance(exc, SiteMismatch)
            reason = str(exc) if mismatch else f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]
            log.error("cannot_go_on", reason=reason)
            self._client.leave(spec.run_id, reason)
            if mismatch:
                raise
            raise WorkerFailed(reason) from exc

    def _do(self, spec: RunSpec, task: Task) -> int:
        """Carry out one task; 1 if it trained."""
        if task.kind is TaskKind.WAIT:
            self._idle(task.retry_after_ms / 1000)
        elif task.kind is TaskKind.INITIALIZE:
            self._initialize(spec, task)
        elif task.kind is TaskKind.TRAIN:
            self._train(spec, task)
            return 1
        elif task.kind is TaskKind.EVALUATE:
            self._evaluate(spec, task)
        else:
            self._secure.step(spec, task)
        return 0

    def shutdown(self) -> None:
        """Stop taking part, from any thread (a signal handler): waits, retries and training end at once."""
        self._stopping.set()
        self._client.stop()

    def __enter__(self) -> Worker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()
        self._client.close()

    # ---- tasks ------------------------------------------------------------------------

    def _model(self, spec: RunSpec) -> LoadedModel:
        if self._loaded is None:
            log.info("loading_base_model", mode=spec.mode)
            self._loaded = self._load(spec, self._site)
        return self._loaded

    def _initialize(self, spec: RunSpec, task: Task) -> None:
        loaded = self._model(spec)
        vector = flatten(loaded.manifest, global_state(loaded))
        self._upload(spec, task, UploadKind.INITIAL, vector, base_version=0, initial=True)

    def _sync(self, spec: RunSpec, task: Task) -> LoadedModel:
        """Make the local model hold the task's global version, downloading it unless already held."""
        loaded = self._model(spec)
        wanted = task.global_version
        assert wanted is not None
        if self._held is None or self._held.version.sha256 != wanted.sha256:
            with self._progress(wanted.size_bytes, "download") as bar:

                def count(n: int) -> None:
                    bar.update(n)
                    self._metrics.downloaded_bytes.inc(n)

                self._held = self._client.download(spec.run_id, wanted, on_bytes=count)
        set_global_state(loaded, unflatten(loaded.manifest, self._held.vector))
        return loaded

    def _tokenized(self, loaded: LoadedModel, max_seq_len: int) -> tuple[TokenizedData, TokenizedData | None]:
        if self._train_data is None or self._seq_len != max_seq_len:
            self._train_data = tokenize(self._records, loaded.tokenizer, max_seq_len=max_seq_len)
            if self._eval_records is not None:
                self._eval_data = tokenize(self._eval_records, loaded.tokenizer, max_seq_len=max_seq_len)
            self._seq_len = max_seq_len
        return self._train_data, self._eval_data

    def _train(self, spec: RunSpec, task: Task) -> None:
        plan = task.training
        assert plan is not None
        assert task.global_version is not None
        loaded = self._sync(spec, task)
        key = (task.round, task.global_version.sha256, plan)
        if self._trained is None or self._trained.key != key:
            self._trained = self._train_delta(spec, loaded, plan, key)
        else:  # a retried attempt of the same round: the same update, and no privacy spent twice
            log.info("reusing_update", round=task.round)
        delta, loss = self._trained.delta, self._trained.loss
        if task.secagg is None:
            update = protect.clip(delta, plan.update_clip_norm)
            self._upload(spec, task, UploadKind.DELTA, update, base_version=task.global_version.version, loss=loss)
        else:  # everything up to the mask now; the mask once the survivors are known
            encoded = protect.encode(
                delta,
                clip_norm=plan.update_clip_norm,
                examples=self.num_examples,
                params=task.secagg.params,
                rounding=protect.rounding_generator(spec.seed, task.round, self._client.worker_id),
                noise_rng=protect.noise_generator(),
                groups=block_groups(
                    update_manifest(loaded.manifest, spec.aggregation),
                    rank=spec.lora.rank,
                    heterogeneous=spec.aggregation == "hetlora",
                ),
                site_rank=loaded.rank,
            )
            self._secure.begin(spec, task.secagg.params, encoded, loss)
        self._metrics.rounds.inc()

    def _train_delta(self, spec: RunSpec, loaded: LoadedModel, plan: TrainingPlan, key: Hashable) -> _Trained:
        """Train from the global state the model holds; the update is local minus global, in manifest order."""
        data, _ = self._tokenized(loaded, plan.max_seq_len)
        with self._progress(plan.local_steps, "train", unit="step") as bar:

            def on_step(step: int, loss: float) -> None:
                if self._stopping.is_set():
                    raise _Stopping
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
                self._metrics.training_steps.inc()

            result = self._train_round(loaded, data, plan, on_step=on_step)
        if plan.record_dp is not None:  # every step trained counts, even if this round attempt later fails
            self._private_steps += result.steps
            self._sample_rate = result.sample_rate
        self._metrics.train_loss.set(result.mean_loss)
        self._metrics.tokens_per_second.set(result.tokens_per_second)
        self._metrics.training_tokens.inc(result.tokens)
        if result.peak_memory_bytes:
            self._metrics.gpu_peak_memory.set(result.peak_memory_bytes)
        sent = update_manifest(loaded.manifest, spec.aggregation)
        assert self._held is not None
        start = unflatten(loaded.manifest, self._held.vector)
        delta = flatten(sent, global_state(loaded)) - flatten(sent, start)
        log.info(
            "trained",
            steps=result.steps,
            loss=round(result.mean_loss, 4),
            tokens_per_s=round(result.tokens_per_second, 1),
            gpu_peak_memory_bytes=result.peak_memory_bytes,
            delta_norm=round(float(np.linalg.norm(delta)), 5),
        )
        return _Trained(key, delta, result.mean_loss)

    def _evaluate(self, spec: RunSpec, task: Task) -> None:
        assert task.global_version is not None
        assert task.training is not None
        loaded = self._sync(spec, task)
        _, data = self._tokenized(loaded, task.training.max_seq_len)
        if data is None:
            loss, tokens = 0.0, 0
        else:
            with torch.inference_mode():
                result = evaluate(loaded.model, data, batch_size=8, pad_id=loaded.pad_id)
            loss, tokens = result.loss, result.tokens
            if not math.isfinite(loss):
                log.error("evaluation_diverged", version=task.global_version.version)
                self._idle(task.deadline_s)
                return
            self._metrics.eval_loss.set(loss)
        log.info("evaluated", version=task.global_version.version, eval_loss=round(loss, 4), tokens=tokens)
        self._client.report(
            MetricsReport(
                worker_id=self._client.worker_id,
                run_id=spec.run_id,
                round=task.round,
                version=task.global_version.version,
                eval_loss=loss,
                eval_tokens=tokens,
                record_epsilon=self._record_epsilon(task.training),
                memorization=self._audit(loaded, task.audit),
            )
        )

    def _record_epsilon(self, plan: TrainingPlan) -> float | None:
        """This site's record-level spend so far: every DP-SGD step it took, at its sampling rate."""
        dp = plan.record_dp
        if dp is None or self._private_steps == 0:
            return None
        epsilon = gaussian_epsilon(
            dp.noise_multiplier, steps=self._private_steps, sample_rate=self._sample_rate, delta=dp.delta
        )
        self._metrics.dp_epsilon.set(epsilon)
        return epsilon

    def _audit(self, loaded: LoadedModel, plan: AuditPlan | None) -> Memorization | None:
        """Audit the global model on this site's canaries; only aggregate rates leave the site."""
        if plan is None or not self._canaries:
            return None
        summary = audit_model(loaded.model, loaded.tokenizer, self._canaries, plan=plan).summary()
        memorization = Memorization(
            _rates(summary, summary["by_duplication"]["1x"]["count"] + summary["by_duplication"]["10x"]["count"]),
            {group: _rates(rates, rates["count"]) for group, rates in summary["by_duplication"].items()},
        )
        for group, rates in memorization.by_duplication.items():
            self._metrics.memorization_exact.labels(group=group).set(rates.exact_match_rate)
        log.info("audited", exact_10x=memorization.by_duplication.get("10x"), seconds=summary["seconds"])
        return memorization

    def _upload(
        self,
        spec: RunSpec,
        task: Task,
        kind: UploadKind,
        vector: npt.NDArray[np.float32] | npt.NDArray[np.uint32],
        *,
        base_version: int,
        loss: float = 0.0,
        initial: bool = False,
        tag: int = 0,
    ) -> None:
        loaded = self._loaded
        assert loaded is not None
        with self._progress(vector.nbytes, "upload") as bar:

            def count(n: int) -> None:
                bar.update(n)
                self._metrics.uploaded_bytes.inc(n)

            self._client.upload(
                run_id=spec.run_id,
                round_=task.round,
                kind=kind,
                base_version=base_version,
                num_examples=self.num_examples,
                vector=vector,
                train_loss=loss,
                tag=tag,
                manifest=loaded.manifest if initial else None,
                artifact_config_json=artifact_config_json(loaded) if initial else "",
                on_bytes=count,
            )

    def _upload_masked(
        self, spec: RunSpec, task: Task, masked: npt.NDArray[np.uint32], *, loss: float, tag: int
    ) -> None:
        self._upload(spec, task, UploadKind.MASKED, masked, base_version=0, loss=loss, tag=tag)

    def _progress(self, total: int, what: str, unit: str = "B") -> tqdm:
        return tqdm(
            total=total,
            desc=what,
            unit=unit,
            unit_scale=unit == "B",
            leave=False,
            disable=not (self._settings.progress and sys.stderr.isatty()),  # bars belong on a terminal, not in logs
            mininterval=0.5,
        )


def _rates(stats: dict[str, float | None], count: int) -> MemorizationRates:
    """Audit aggregates as the wire carries them; a rate nothing was measured for counts as 0 over 0 canaries."""

    def rate(name: str) -> float:
        value = stats[name]
        return 0.0 if value is None else float(value)

    return MemorizationRates(
        count=count if stats["exact_match_rate"] is not None else 0,
        exact_match_rate=rate("exact_match_rate"),
        approx_match_rate=rate("approx_match_rate"),
        token_accuracy=rate("token_accuracy"),
        pii_extraction_rate=rate("pii_extraction_rate"),
        mean_exposure=rate("mean_exposure"),
    )
