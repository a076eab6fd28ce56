"""How soon a waiting worker hears that its phase opened: held (long) polls against the old poll-and-sleep.

The phase machine in process (no gRPC: the wire adds the same to both), three workers, version 0 under
evaluation with two reports in. A worker's poll waits; the last report closes the evaluation, which
opens round 1, and the time until the waiting worker has its TRAIN task is measured:
- held: the worker's poll is held by the coordinator (timeouts.poll_wait_ms) and answered when the run
  moves;
- poll-and-sleep (before): the coordinator answers WAIT at once (hold 0) and the worker sleeps
  poll_wait_ms before it asks again, as it did before long polls; the phase opens at a random moment of
  its sleep. Both are measured in this process, on the same coordinator.

Usage: python bench/polls.py [--repeats 100] [--poll-wait-ms 500] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import random
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
from fedlora_common.messages import MetricsReport, TaskKind, UploadHeader, UploadKind
from fedlora_server.config import RunSettings
from fedlora_server.coordinator import Coordinator
from fedlora_server.metrics import ServerMetrics
from fedlora_server.store import MemoryStore

WORKERS = ("clinical", "finance", "legal")
MANIFEST = Manifest((TensorSpec("base_model.model.q_proj.lora_A.weight", (4, 64)),))
CONFIG = '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}'


def _settings(state: Path, poll_wait_ms: int) -> RunSettings:
    return RunSettings.model_validate(
        {
            "run_id": "polls",
            "base_model": "tiny",
            "rounds": 1,
            "min_workers": 3,
            "workers": [{"id": w, "token_sha256": hashlib.sha256(w.encode()).hexdigest()} for w in WORKERS],
            "state_dir": state,
            "listen": {"host": "127.0.0.1", "port": 0, "metrics_port": None},
            "timeouts": {"poll_wait_ms": poll_wait_ms},
            "secure_aggregation": {"enabled": False},
        }
    )


def _evaluating(state: Path, poll_wait_ms: int) -> Coordinator:
    """A coordinator with version 0 under evaluation, reported on by clinical and finance."""
    coordinator = Coordinator(
        settings=_settings(state, poll_wait_ms), store=MemoryStore(), metrics=ServerMetrics(CollectorRegistry())
    )
    for w in WORKERS:
        coordinator.join(w, 100)
    vector = np.zeros(MANIFEST.numel, dtype=np.float32)
    payload = vector.tobytes()
    header = UploadHeader(
        worker_id="clinical",
        run_id="polls",
        round=0,
        kind=UploadKind.INITIAL,
        base_version=0,
        num_examples=100,
        total_size=len(payload),
        chunk_count=1,
        sha256=sha256(payload),
        dtype="float32",
        manifest=MANIFEST,
        artifact_config_json=CONFIG,
    )
    coordinator.receive_upload(header, ((i, bytes(c)) for i, c in enumerate(iter_chunks(payload, 2**20))))
    for w in ("clinical", "finance"):
        coordinator.report_metrics(MetricsReport(w, "polls", 0, 0, eval_loss=2.0, eval_tokens=10))
    return coordinator


def delay(state: Path, poll_wait_ms: int, *, held: bool, rng: random.Random) -> float:
    """Seconds from the report that opens round 1 to the waiting worker's TRAIN task."""
    coordinator = _evaluating(state, poll_wait_ms)
    wait_s = poll_wait_ms / 1000
    answered: list[float] = []

    def poll() -> None:
        while True:
            task = coordinator.poll("clinical", hold_s=wait_s if held else 0.0)
            if task.kind is TaskKind.TRAIN:
                answered.append(time.perf_counter())
                return
            assert task.kind is TaskKind.WAIT, task.kind
            if not held:
                time.sleep(wait_s)

    waiting = threading.Thread(target=poll)
    waiting.start()
    time.sleep(rng.uniform(0.005, wait_s))  # the phase opens at a random moment of the worker's wait
    coordinator.report_metrics(MetricsReport("legal", "polls", 0, 0, eval_loss=2.0, eval_tokens=10))
    opened = time.perf_counter()
    waiting.join()
    return answered[0] - opened


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--poll-wait-ms", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="20 repeats")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 20
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))  # the table only
    rng = random.Random(0)

    def delays(*, held: bool) -> list[float]:
        measured = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as state:
                measured.append(delay(Path(state), args.poll_wait_ms, held=held, rng=rng))
        return measured

    held = delays(held=True)
    slept = delays(held=False)

    def row(name: str, delays: list[float]) -> str:
        q = statistics.quantiles(delays, n=100, method="inclusive")
        return f"{name:<28}{statistics.median(delays) * 1e3:>10.2f}{q[98] * 1e3:>10.2f}{max(delays) * 1e3:>10.2f}"

    print(f"a waiting worker hears that its phase opened ({args.repeats} repeats, poll_wait_ms {args.poll_wait_ms})")
    print(f"{'':<28}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    print(row("held poll (now)", held))
    print(row("poll and sleep (before)", slept))
    print(
        f"held p99 / before p50: {statistics.quantiles(held, n=100, method='inclusive')[98] / statistics.median(slept):.4f}"
    )


if __name__ == "__main__":
    main()
