"""Sites without a model that take part in a run through the worker's real transport (`CoordinatorClient`).

Each site joins, polls and carries out what the coordinator asks as the worker daemon does (initialize,
evaluate, a plain or a masked update of a fixed delta, every secure-aggregation stage, a complaint when
a sealed share does not open, leaving when the coordinator refuses its configuration), so a test can
watch the coordinator with several honest sites, make one of them lie by overriding one step in a
subclass, or put a FaultyProxy between a site and the coordinator and fault one step (`faults`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedlora_common.manifest import Manifest
from fedlora_common.messages import MetricsReport, Task, TaskKind, UploadKind
from fedlora_common.secagg import Advertisement, EncryptedShare, KeyPair, RevealedShare, quantize
from fedlora_worker.config import RetrySettings, TlsClientSettings
from fedlora_worker.coordinator import CONFIGURATION_REFUSALS, DownloadedModel, Misconfigured, Refused, StaleTask
from fedlora_worker.secagg_session import UnopenableShares, WorkerSession
from fedlora_worker.transport import CoordinatorClient
from tests.netfault import FaultyProxy

__all__ = ["Model", "Site", "make_sites", "run_sites"]

FAST_RETRY = RetrySettings(attempts=6, initial_backoff_s=0.05, max_backoff_s=0.5)


@dataclass(frozen=True)
class Model:
    """What the sites federate: the initial global state every site would build, and its layout."""

    run_id: str
    manifest: Manifest
    initial: np.ndarray
    config_json: str


@dataclass
class Site:
    """One site. Override `advertisement`, `sealed_shares` or `revealed_shares` to make it lie."""

    worker: str
    client: CoordinatorClient
    model: Model
    delta: np.ndarray
    examples: int
    identities: dict[str, KeyPair] = field(default_factory=dict)
    proxy: FaultyProxy | None = None
    faults: dict[str, Callable[[FaultyProxy], None]] = field(default_factory=dict)
    uploaded: list[int] = field(default_factory=list)
    downloaded: list[int] = field(default_factory=list)
    complained: list[tuple[str, ...]] = field(default_factory=list)
    before: Callable[[Task], None] = field(default=lambda task: None)
    """Called with each task before it is carried out (a test holds a site back here)."""
    held: DownloadedModel | None = None
    session: WorkerSession | None = None
    encoded: np.ndarray | None = None
    error: BaseException | None = None

    # ---- the protocol steps a lying site overrides ----------------------------------------------

    def advertisement(self, session: WorkerSession) -> Advertisement:
        return session.advertise()

    def sealed_shares(self, session: WorkerSession, roster: Sequence[Advertisement]) -> list[EncryptedShare]:
        return session.share_keys(roster)

    def revealed_shares(
        self, session: WorkerSession, survivors: Sequence[str], dropped: Sequence[str]
    ) -> list[RevealedShare]:
        return session.reveal(survivors, dropped)

    # ---- taking part ----------------------------------------------------------------------------

    def take_part(self, *, timeout_s: float = 90.0) -> None:
        """Join and carry out every task until the run finishes; Misconfigured once refused as configured."""
        run_id = self.model.run_id
        self.client.join(self.examples)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            task = self.client.poll(run_id)
            if task.kind is TaskKind.FINISHED:
                return
            try:
                self._carry_out(task)
            except StaleTask:  # as the daemon does: the stage moved on (this answer was taken, or is too late)
                continue
            except Refused as exc:
                if exc.code not in CONFIGURATION_REFUSALS:
                    raise
                self.client.leave(run_id, f"the coordinator refuses this site as configured: {exc}")
                raise Misconfigured(str(exc)) from exc
        raise TimeoutError(f"{self.worker} did not see the run finish")

    def arm(self, step: str) -> None:
        fault = self.faults.pop(step, None)
        if fault is not None:
            assert self.proxy is not None, f"{self.worker} has a fault for {step} but no proxy"
            fault(self.proxy)

    def count(self, into: list[int]) -> Callable[[int], None]:
        into.append(0)

        def add(n: int) -> None:
            into[-1] += n

        return add

    def _carry_out(self, task: Task) -> None:
        self.before(task)
        if task.kind is TaskKind.WAIT:
            time.sleep(0.02)
        elif task.kind is TaskKind.INITIALIZE:
            self.arm("initialize")
            self._upload(task, UploadKind.INITIAL, self.model.initial, initial=True)
        elif task.kind is TaskKind.EVALUATE:
            held = self._sync(task)
            self.client.report(MetricsReport(self.worker, self.model.run_id, task.round, held.version.version, 2.0, 50))
        elif task.kind is TaskKind.TRAIN:
            held = self._sync(task)
            if task.secagg is None:
                self.arm("upload")
                self._upload(task, UploadKind.DELTA, self.delta, base_version=held.version.version)
            else:
                self._advertise(task)
        else:
            self._secure_step(task)

    def _sync(self, task: Task) -> DownloadedModel:
        """The task's global version, downloaded unless already held (its digest checked by the transport)."""
        wanted = task.global_version
        assert wanted is not None
        if self.held is None or self.held.version.sha256 != wanted.sha256:
            self.arm("download")
            self.held = self.client.download(self.model.run_id, wanted, on_bytes=self.count(self.downloaded))
        return self.held

    def _advertise(self, task: Task) -> None:
        assert task.secagg is not None
        params = task.secagg.params
        self.session = WorkerSession(
            worker_id=self.worker,
            params=params,
            identity_private=self.identities[self.worker].private,
            peer_identities={w: k.public for w, k in self.identities.items()},
        )
        quantized = quantize(
            self.delta * np.float32(self.examples / params.max_examples),
            clip=params.clip_range,
            bits=params.bits,
            rng=np.random.default_rng(1),
        )
        self.encoded = np.concatenate([quantized, np.array([self.examples], dtype=np.uint32)])
        self.arm("advertise")
        self.client.advertise(self.model.run_id, params.tag, self.advertisement(self.session))

    def _secure_step(self, task: Task) -> None:
        assert task.secagg is not None
        secagg, tag, run_id = task.secagg, task.secagg.params.tag, self.model.run_id
        session = self.session
        if session is None or session.params.tag != tag:  # no session of this attempt (it complained): wait
            time.sleep(0.02)
            return
        assert self.encoded is not None
        if task.kind is TaskKind.SECAGG_SHARE_KEYS:
            self.arm("share")
            self.client.share_keys(run_id, tag, self.sealed_shares(session, secagg.roster))
        elif task.kind is TaskKind.SECAGG_MASKED_UPLOAD:
            try:
                masked = session.mask(secagg.inbox, secagg.survivors, self.encoded)
            except UnopenableShares as exc:  # as the daemon does: prove the sender's fault, drop this session
                self.complained.append(exc.senders)
                self.client.complain(run_id, tag, session.complain(exc.senders))
                self.session = None
                return
            self.arm("upload")
            self._upload(task, UploadKind.MASKED, masked, tag=tag)
        elif task.kind is TaskKind.SECAGG_UNMASK:
            self.arm("reveal")
            self.client.reveal(run_id, tag, self.revealed_shares(session, secagg.survivors, secagg.dropped))

    def _upload(
        self,
        task: Task,
        kind: UploadKind,
        vector: np.ndarray,
        *,
        base_version: int = 0,
        tag: int = 0,
        initial: bool = False,
    ) -> None:
        self.client.upload(
            run_id=self.model.run_id,
            round_=task.round,
            kind=kind,
            base_version=base_version,
            num_examples=self.examples,
            vector=vector,
            tag=tag,
            manifest=self.model.manifest if initial else None,
            artifact_config_json=self.model.config_json if initial else "",
            on_bytes=self.count(self.uploaded),
        )


def make_sites(
    port: int,
    model: Model,
    examples: dict[str, int],
    *,
    token_of: Callable[[str], str],
    identities: dict[str, KeyPair] | None = None,
    kinds: dict[str, type[Site]] | None = None,
    faults: dict[str, dict[str, Callable[[FaultyProxy], None]]] | None = None,
    chunk_bytes: int = 2**20,
    tls: Mapping[str, TlsClientSettings] | None = None,
) -> list[Site]:
    """One site per worker of `examples`, each with its own delta (seeded by its position); those with faults
    reach the coordinator through a FaultyProxy of their own, those in `tls` over (mutual) TLS."""
    sites = []
    for index, (worker, count) in enumerate(examples.items()):
        proxy = FaultyProxy(("127.0.0.1", port)).start() if faults and worker in faults else None
        client = CoordinatorClient(
            target=proxy.target if proxy else f"127.0.0.1:{port}",
            worker_id=worker,
            token=token_of(worker),
            retry=FAST_RETRY,
            chunk_bytes=chunk_bytes,
            tls=(tls or {}).get(worker),
        )
        delta = np.random.default_rng(index).normal(0, 0.01, model.manifest.numel).astype(np.float32)
        kind = (kinds or {}).get(worker, Site)
        site = kind(
            worker, client, model, delta, count, dict(identities or {}), proxy, dict((faults or {}).get(worker, {}))
        )
        sites.append(site)
    return sites


def run_sites(sites: Sequence[Site], *, timeout_s: float = 120.0) -> dict[str, BaseException]:
    """Every site takes part in its own thread until the run finishes; what each one failed with, by worker."""

    def work(site: Site) -> None:
        try:
            site.take_part(timeout_s=timeout_s - 10)
        except BaseException as exc:  # returned to the test
            site.error = exc

    threads = [threading.Thread(target=work, args=(site,), daemon=True) for site in sites]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)
    for site in sites:
        site.client.close()
        if site.proxy is not None:
            site.proxy.stop()
    return {site.worker: site.error for site in sites if site.error is not None}
