"""Whether requests wait behind a round's fold and commit: poll latency while a 42M-parameter round closes.

The phase machine in process (no gRPC: the wire adds the same to every poll), three workers and the
Llama-3.1-8B rank-16 LoRA size (41,943,040 values, 168 MB a version) written to a real state directory
(artifact, fsync, record). Round 1 has two updates in; a poller asks for its task again and again (hold 0,
one due every 2 ms) while the third update is received, verified, folded, and the round commits
its version. Measured in the same process:
- idle: the same polls on the same coordinator with nothing else happening (the baseline);
- closing: the polls whose answer came while the last upload was folded and the version written.

Usage: python bench/commits.py [--values N] [--repeats R]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import structlog
from prometheus_client import CollectorRegistry

from fedlora_common.chunking import iter_chunks, sha256
from fedlora_common.manifest import Manifest, TensorSpec
from fedlora_common.messages import MetricsReport, UploadHeader, UploadKind
from fedlora_server.config import RunSettings
from fedlora_server.coordinator import Coordinator
from fedlora_server.metrics import ServerMetrics
from fedlora_server.store import MemoryStore

WORKERS = ("clinical", "finance", "legal")
RANK = 16
CONFIG = '{"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj"]}'
CHUNK = 2**20
EVERY_S = 0.002
"""A poll is due every 2 ms (500 a second, the rate of hundreds of workers' held polls ending)."""


def _manifest(values: int) -> Manifest:
    width = values // (2 * RANK)
    return Manifest(
        (
            TensorSpec("base_model.model.q_proj.lora_A.weight", (RANK, width)),
            TensorSpec("base_model.model.q_proj.lora_B.weight", (width, RANK)),
        )
    )


def _prepared(
    worker: str, vector: np.ndarray, *, round_: int, manifest: Manifest
) -> tuple[UploadHeader, list[tuple[int, bytes]]]:
    """An upload's header and chunks, made before it is sent: a worker's own work is not the coordinator's."""
    payload = vector.tobytes()
    initial = round_ == 0
    header = UploadHeader(
        worker_id=worker,
        run_id="commits",
        round=round_,
        kind=UploadKind.INITIAL if initial else UploadKind.DELTA,
        base_version=0,
        num_examples=100,
        total_size=len(payload),
        chunk_count=-(-len(payload) // CHUNK),
        sha256=sha256(payload),
        dtype="float32",
        manifest=manifest if initial else None,
        artifact_config_json=CONFIG if initial else "",
    )
    return header, [(i, bytes(c)) for i, c in enumerate(iter_chunks(payload, CHUNK))]


def _upload(coordinator: Coordinator, worker: str, vector: np.ndarray, *, round_: int, manifest: Manifest) -> None:
    header, chunks = _prepared(worker, vector, round_=round_, manifest=manifest)
    coordinator.receive_upload(header, iter(chunks))


def _training(state: Path, manifest: Manifest) -> Coordinator:
    """A coordinator in round 1's training, version 0 written, two of the three updates in."""
    settings = RunSettings.model_validate(
        {
            "run_id": "commits",
            "base_model": "tiny",
            "rounds": 2,
            "min_workers": 3,
            "workers": [{"id": w, "token_sha256": hashlib.sha256(w.encode()).hexdigest()} for w in WORKERS],
            "state_dir": state,
            "listen": {"host": "127.0.0.1", "port": 0, "metrics_port": None},
            "secure_aggregation": {"enabled": False},
            "limits": {"max_update_bytes": 2 * manifest.nbytes},
        }
    )
    coordinator = Coordinator(settings=settings, store=MemoryStore(), metrics=ServerMetrics(CollectorRegistry()))
    for w in WORKERS:
        coordinator.join(w, 100)
    rng = np.random.default_rng(0)
    _upload(coordinator, "clinical", rng.standard_normal(manifest.numel, dtype=np.float32), round_=0, manifest=manifest)
    for w in WORKERS:
        coordinator.report_metrics(MetricsReport(w, "commits", 0, 0, eval_loss=2.0, eval_tokens=10))
    for w in WORKERS[:2]:
        _upload(coordinator, w, rng.standard_normal(manifest.numel, dtype=np.float32), round_=1, manifest=manifest)
    return coordinator


def _poll_latencies(coordinator: Coordinator, until: threading.Event, *, every_s: float) -> list[float]:
    """Open loop: a poll is due every `every_s`, and its latency runs from when it was due, so a poll held up
    delays the ones due after it as a worker's would (a closed loop would count one stall once)."""
    latencies = []
    due = time.perf_counter()
    while not until.is_set():
        due += every_s
        time.sleep(max(0.0, due - time.perf_counter()))
        coordinator.poll("clinical")
        latencies.append(time.perf_counter() - due)
    return latencies


def measure(state: Path, manifest: Manifest) -> tuple[list[float], list[float], float]:
    """Idle poll latencies, latencies while the last update folds and the version is written, and that time."""
    coordinator = _training(state, manifest)
    header, chunks = _prepared(
        "legal", np.random.default_rng(1).standard_normal(manifest.numel, dtype=np.float32), round_=1, manifest=manifest
    )
    stop = threading.Event()
    idle: list[float] = []
    poller = threading.Thread(target=lambda: idle.extend(_poll_latencies(coordinator, stop, every_s=EVERY_S)))
    poller.start()
    time.sleep(1.0)
    stop.set()
    poller.join()

    stop = threading.Event()
    closing: list[float] = []
    poller = threading.Thread(target=lambda: closing.extend(_poll_latencies(coordinator, stop, every_s=EVERY_S)))
    poller.start()
    started = time.perf_counter()
    coordinator.receive_upload(header, iter(chunks))
    seconds = time.perf_counter() - started
    stop.set()
    poller.join()
    assert coordinator.phase == "evaluate", coordinator.phase
    return idle, closing, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=41_943_040, help="elements of the update (8B rank 16)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))  # the table only
    manifest = _manifest(args.values)
    idle: list[float] = []
    closing: list[float] = []
    seconds = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as state:
            a, b, s = measure(Path(state), manifest)
            idle += a
            closing += b
            seconds.append(s)

    def row(name: str, values: list[float]) -> str:
        q = statistics.quantiles(values, n=100, method="inclusive")
        p50, p99, top = statistics.median(values) * 1e3, q[98] * 1e3, max(values) * 1e3
        return f"{name:<46}{len(values):>8}{p50:>10.2f}{p99:>10.2f}{top:>10.2f}"

    print(
        f"poll latency while round 1 closes: {manifest.numel:,} values ({manifest.nbytes / 1e6:.0f} MB) an update, "
        f"3 workers, {args.repeats} repeats; last upload received, folded and committed in "
        f"{statistics.median(seconds):.2f} s (median)"
    )
    print(f"{'':<46}{'polls':>8}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    print(row("idle (baseline, same coordinator)", idle))
    print(row("while the last update folds and commits", closing))


if __name__ == "__main__":
    main()
