"""Soak: many rounds of secure aggregation; does the coordinator's footprint stay flat?

The coordinator is the program a site runs (`python -m fedlora_server --config run.yaml`, its own
process, SQLite state). The workers are numpy workers in threads of this process: the real
transport (fedlora_worker.transport.CoordinatorClient) and the real secure-aggregation stage
machine (WorkerSession) over the real wire, with a random delta instead of training (real model
workers would spend the soak's time in torch, not in the coordinator). The update has the layout
of the tiny lab model's adapter (fedlora-lab's tiny model, LoRA rank 4 on every linear layer),
and the initial adapter is that model's own.

Printed at rounds 1, 5, 10, 20, ... and the last: the coordinator's RSS, open file descriptors and
threads, and the state directory's size (KiB: in all, artifacts, SQLite database, its WAL); then
the RSS drift from round 5 to the last (the target is <= 5%, exit 1 beyond) and what the state
directory grows by per round.

Usage: python bench/soak.py [--quick] [--rounds 50] [--workers 8] [--cache-dir DIR]   (--quick: 10 rounds, 4 workers)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import yaml

from fedlora_common.manifest import Manifest, flatten
from fedlora_common.messages import MetricsReport, RunSpec, Task, TaskKind, UploadKind
from fedlora_common.plans import LoraSpec
from fedlora_common.secagg import KeyPair, identity_keypair, quantize
from fedlora_lab.model_factory import LabModelConfig, cached_model
from fedlora_worker.config import RetrySettings
from fedlora_worker.coordinator import DownloadedModel, StaleTask, TransferError
from fedlora_worker.modeling import SiteModel, artifact_config_json, global_state, load_model
from fedlora_worker.secagg_session import WorkerSession
from fedlora_worker.transport import CoordinatorClient

RUN = "soak"
REPORT_AT = (1, 5, 10, 20, 30, 40)


@dataclass(frozen=True)
class Adapter:
    manifest: Manifest
    initial: np.ndarray
    config_json: str


def tiny_adapter(cache_dir: Path) -> Adapter:
    """The tiny lab model's initial LoRA adapter, as the initializing worker would build it."""
    made = cached_model(cache_dir, LabModelConfig.tiny())
    spec = RunSpec(
        run_id=RUN,
        mode="lora",
        aggregation="fedavg",
        base_model="tiny",
        lora=LoraSpec(rank=4, alpha=8),
        total_rounds=1,
        seed=0,
    )
    loaded = load_model(spec, SiteModel(path=str(made.path)))
    return Adapter(loaded.manifest, flatten(loaded.manifest, global_state(loaded)), artifact_config_json(loaded))


def _run_yaml(where: Path, state: Path, identities: dict[str, KeyPair], tokens: dict[str, str], rounds: int) -> Path:
    settings = {
        "run_id": RUN,
        "base_model": "tiny",
        "rounds": rounds,
        "min_workers": len(identities),
        "seed": 0,
        "lora": {"rank": 4, "alpha": 8},
        "state_dir": str(state),
        "listen": {"host": "127.0.0.1", "port": 0, "metrics_port": None},
        "timeouts": {"poll_wait_ms": 20},
        "secure_aggregation": {"enabled": True, "clip_range": 1.0},
        "workers": [
            {
                "id": w,
                "token_sha256": hashlib.sha256(tokens[w].encode()).hexdigest(),
                "identity_public": identities[w].public.hex(),
            }
            for w in identities
        ],
    }
    path = where / "run.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


@dataclass
class RoundTimes:
    """One round as a numpy worker saw it: wall-clock times (time.time(), comparable with the coordinator's log)."""

    train_at: float
    """When its TRAIN task arrived (the first time, if the round's attempt was retried)."""
    evaluate_at: float | None = None
    """When its EVALUATE task for the version this round committed arrived."""
    compute_s: float = 0.0
    """Wall seconds in its own compute (delta, quantize, session advertise/share/mask/reveal); no RPC."""
    marks: dict[str, float] = field(default_factory=dict)
    """When each later step ended or task arrived, the first time: 'downloaded', 'SECAGG_SHARE_KEYS', 'uploaded'..."""


class NumpyWorker:
    """A site without a model: joins, answers every task, sends a fixed random delta each round.

    On TRAIN it downloads the task's global version (unless it holds it), as the daemon's `_sync` does;
    then, plain (the task has no secagg plan), it uploads its float32 delta; secure, it quantizes it and
    takes the secure stages. `times` holds what it saw of each round. A task the coordinator no longer
    holds (StaleTask, TransferError) is abandoned, as the daemon does; `abandoned` says which.
    """

    def __init__(
        self,
        worker: str,
        client: CoordinatorClient,
        identities: dict[str, KeyPair],
        adapter: Adapter,
        seed: int,
        run_id: str = RUN,
    ) -> None:
        self.worker = worker
        self.client = client
        self.identities = identities
        self.adapter = adapter
        self.run_id = run_id
        self.delta = np.random.default_rng(seed).normal(0, 1e-3, adapter.initial.size)
        self.session: WorkerSession | None = None
        self.encoded: np.ndarray | None = None
        self.held: DownloadedModel | None = None
        self.times: dict[int, RoundTimes] = {}
        self.abandoned: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.client.join(100)
            while True:
                task = self.client.poll(self.run_id)
                if task.kind is TaskKind.FINISHED:
                    return
                try:
                    self._do(task)
                except (StaleTask, TransferError) as exc:  # as the daemon does: the round moved on, poll again
                    self.abandoned.append(f"round {task.round} {task.kind.name}: {exc}")
        except BaseException as exc:  # reported by main
            self.error = exc

    def _mark(self, round_: int, name: str) -> None:
        if round_ in self.times:
            self.times[round_].marks.setdefault(name, time.time())

    @contextmanager
    def _computing(self, round_: int) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.times[round_].compute_s += time.perf_counter() - started

    def _do(self, task: Task) -> None:
        client, secagg, run = self.client, task.secagg, self.run_id
        if task.kind is not TaskKind.WAIT:
            self._mark(task.round, task.kind.name)
        if task.kind is TaskKind.WAIT:
            time.sleep(0.01)
        elif task.kind is TaskKind.INITIALIZE:
            client.upload(
                run_id=run,
                round_=0,
                kind=UploadKind.INITIAL,
                base_version=0,
                num_examples=100,
                vector=self.adapter.initial,
                manifest=self.adapter.manifest,
                artifact_config_json=self.adapter.config_json,
            )
        elif task.kind is TaskKind.EVALUATE:
            assert task.global_version is not None
            if task.round in self.times:
                self.times[task.round].evaluate_at = self.times[task.round].evaluate_at or time.time()
            report = MetricsReport(self.worker, run, task.round, task.global_version.version, 3.0, 100)
            client.report(report)
        elif task.kind is TaskKind.TRAIN:
            version = task.global_version
            assert version is not None
            self.times.setdefault(task.round, RoundTimes(train_at=time.time()))
            if self.held is None or self.held.version.sha256 != version.sha256:
                self.held = client.download(run, version)
            self._mark(task.round, "downloaded")
            if secagg is None:
                with self._computing(task.round):
                    delta = self.delta.astype(np.float32)
                try:
                    client.upload(
                        run_id=run,
                        round_=task.round,
                        kind=UploadKind.DELTA,
                        base_version=version.version,
                        num_examples=100,
                        vector=delta,
                    )
                finally:
                    self._mark(task.round, "uploaded")
                return
            params = secagg.params
            peers = {w: k.public for w, k in self.identities.items()}
            with self._computing(task.round):
                self.session = WorkerSession(
                    worker_id=self.worker,
                    params=params,
                    identity_private=self.identities[self.worker].private,
                    peer_identities=peers,
                )
                rng = np.random.default_rng(task.round)
                scaled = (self.delta * (100 / params.max_examples)).astype(np.float32)
                quantized = quantize(scaled, clip=params.clip_range, bits=params.bits, rng=rng)
                self.encoded = np.concatenate([quantized, np.array([100], dtype=np.uint32)])
                advertisement = self.session.advertise()
            client.advertise(run, params.tag, advertisement)
            self._mark(task.round, "advertised")
        elif task.kind is TaskKind.SECAGG_SHARE_KEYS:
            assert secagg is not None
            assert self.session is not None
            with self._computing(task.round):
                shares = self.session.share_keys(secagg.roster)
            client.share_keys(run, secagg.params.tag, shares)
            self._mark(task.round, "shared")
        elif task.kind is TaskKind.SECAGG_MASKED_UPLOAD:
            assert secagg is not None
            assert self.session is not None
            assert self.encoded is not None
            with self._computing(task.round):
                masked = self.session.mask(secagg.inbox, secagg.survivors, self.encoded)
            try:
                client.upload(
                    run_id=run,
                    round_=task.round,
                    kind=UploadKind.MASKED,
                    base_version=0,
                    num_examples=100,
                    vector=masked,
                    tag=secagg.params.tag,
                )
            finally:
                self._mark(task.round, "uploaded")
        elif task.kind is TaskKind.SECAGG_UNMASK:
            assert secagg is not None
            assert self.session is not None
            with self._computing(task.round):
                revealed = self.session.reveal(secagg.survivors, secagg.dropped)
            client.reveal(run, secagg.params.tag, revealed)
            self._mark(task.round, "revealed")


def start_coordinator(run_yaml: Path, log: IO[bytes]) -> tuple[subprocess.Popen[bytes], int]:
    """`fedlora-server --config run_yaml` as its own process (its log to `log`), and the port it listens on."""
    server = subprocess.Popen(
        [sys.executable, "-m", "fedlora_server", "--config", str(run_yaml)],
        stdout=subprocess.PIPE,
        stderr=log,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert server.stdout is not None
    return server, int(json.loads(server.stdout.readline())["port"])


def numpy_workers(
    port: int, tokens: dict[str, str], identities: dict[str, KeyPair], adapter: Adapter, *, run_id: str
) -> list[NumpyWorker]:
    """One NumpyWorker a site of `tokens`, each with its own client of the coordinator on `port`."""
    return [
        NumpyWorker(
            w,
            CoordinatorClient(
                target=f"127.0.0.1:{port}",
                worker_id=w,
                token=tokens[w],
                retry=RetrySettings(initial_backoff_s=0.05, max_backoff_s=0.5),
            ),
            identities,
            adapter,
            seed=index,
            run_id=run_id,
        )
        for index, w in enumerate(tokens)
    ]


def run_all(workers: list[NumpyWorker]) -> None:
    """Every worker in a thread of its own, until each has finished."""
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@dataclass(frozen=True)
class Sample:
    round: int
    rss_bytes: int
    fds: int
    threads: int
    state_bytes: int
    artifacts_bytes: int
    database_bytes: int
    wal_bytes: int


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line)


def _size_of(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def sample(pid: int, state: Path, round_: int) -> Sample:
    status = _status(pid)
    return Sample(
        round=round_,
        rss_bytes=int(status["VmRSS"].split()[0]) * 1024,
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(status["Threads"]),
        state_bytes=_size(state),
        artifacts_bytes=_size(state / "artifacts"),
        database_bytes=_size_of(state / "coordinator.db"),
        wal_bytes=_size_of(state / "coordinator.db-wal"),
    )


def watch_rounds(log: Path, on_round: Callable[[int], None], done: threading.Event) -> None:
    """Call on_round(r) as the coordinator logs each round's evaluation closing."""
    seen = 0
    while not done.is_set():
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        for line in lines[seen:]:
            if line.startswith("{"):
                event: dict[str, Any] = json.loads(line)
                if event.get("event") == "round_evaluated" and event.get("round", 0) >= 1:
                    on_round(int(event["round"]))
        seen = len(lines)
        time.sleep(0.02)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("FEDLORA_CACHE_DIR", "~/.cache/fedlora")))
    parser.add_argument("--quick", action="store_true", help="10 rounds with 4 workers")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.workers = 10, 4

    adapter = tiny_adapter(args.cache_dir.expanduser())
    names = [f"site-{i}" for i in range(args.workers)]
    identities = {w: identity_keypair() for w in names}
    tokens = {w: f"soak-token-{w}" for w in names}
    samples: dict[int, Sample] = {}
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        state.mkdir()
        run_yaml = _run_yaml(Path(tmp), state, identities, tokens, args.rounds)
        log = Path(tmp) / "coordinator.log"
        with log.open("wb") as handle:
            server, port = start_coordinator(run_yaml, handle)
            done = threading.Event()
            watcher = threading.Thread(
                target=watch_rounds,
                args=(log, lambda r: samples.setdefault(r, sample(server.pid, state, r)), done),
                daemon=True,
            )
            watcher.start()
            started = time.perf_counter()
            workers = numpy_workers(port, tokens, identities, adapter, run_id=RUN)
            run_all(workers)
            elapsed = time.perf_counter() - started
            time.sleep(0.2)
            done.set()
            watcher.join()
            code = server.wait(timeout=120)
            for worker in workers:
                worker.client.close()
        errors = {w.worker: repr(w.error) for w in workers if w.error is not None}
        if errors or code != 0:
            sys.stderr.write(f"soak failed: exit {code}, {errors}\n{log.read_text()[-3000:]}\n")
            return 1

    last = max(samples)
    shown = [r for r in (*REPORT_AT, last) if r in samples]
    print(
        f"soak: {args.rounds} rounds, {args.workers} numpy workers over the real wire, secure aggregation, "
        f"update of {adapter.manifest.numel:,} values ({adapter.manifest.nbytes / 1024:.1f} KiB, tiny lab model "
        f"LoRA r4), coordinator as its own process; {elapsed:.1f} s ({elapsed / args.rounds:.2f} s/round)"
    )
    print()
    print("| round | coordinator RSS (MiB) | open fds | threads | state dir (KiB) | artifacts | database | WAL |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in shown:
        s = samples[r]
        print(
            f"| {r} | {s.rss_bytes / 2**20:.1f} | {s.fds} | {s.threads} | {s.state_bytes / 1024:.0f} "
            f"| {s.artifacts_bytes / 1024:.0f} | {s.database_bytes / 1024:.0f} | {s.wal_bytes / 1024:.0f} |"
        )
    first, final = samples[min(5, last)], samples[last]
    rounds = max(1, final.round - first.round)
    drift = (final.rss_bytes - first.rss_bytes) / first.rss_bytes
    print()
    print(f"RSS round {first.round} -> {final.round}: {drift:+.1%} (target <= +5%)")
    print(f"open fds round {first.round} -> {final.round}: {first.fds} -> {final.fds}")
    per_round = {
        "state dir": final.state_bytes - first.state_bytes,
        "artifacts (every version is kept)": final.artifacts_bytes - first.artifacts_bytes,
        "database": final.database_bytes - first.database_bytes,
    }
    print("per round: " + ", ".join(f"{name} {size / rounds / 1024:.1f} KiB" for name, size in per_round.items()))
    print("(the WAL is checkpointed into the database at about 4 MiB; the spool holds one masked journal per worker)")
    return 0 if drift <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
