"""A worker's transport and the coordinator across a network that delays, stalls and cuts connections.

Each worker (the real `CoordinatorClient`) reaches an in-process coordinator through its own
FaultyProxy. Uploads are cut off midway, downloads too, links stall until the coordinator
cancels the idle stream, and one link is slow throughout. Every transfer restarts cleanly, the
round commits the right mean, and nothing is counted twice: the report and the coordinator's
Prometheus counters hold one copy of each update, the workers' progress counts each transfer
once, and the aggregate holds each update once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedlora_common.manifest import Manifest, TensorSpec
from fedlora_common.secagg import KeyPair, dequantize_sum, identity_keypair
from fedlora_server.server import CoordinatorServer
from tests.netfault import FaultyProxy
from tests.server.conftest import ADAPTER_CONFIG, WORKERS, run_settings, token_of
from tests.sites import Model, Site, make_sites, run_sites

RUN = "test-run"
MANIFEST = Manifest(
    (
        TensorSpec("base_model.model.layers.0.q_proj.lora_A.weight", (256, 2048)),
        TensorSpec("base_model.model.layers.0.q_proj.lora_B.weight", (2048, 256)),
    )
)
SIZE = MANIFEST.nbytes  # 4 MiB: larger than the flow-control window, so a cut stream is never complete
CHUNK = 256 * 1024
EXAMPLES = {"clinical": 100, "finance": 300, "legal": 600}
MIB = 2**20

Fault = Callable[[FaultyProxy], None]


def _cut(direction: str, after: int) -> Fault:
    return lambda proxy: proxy.cut_after(direction, after)  # type: ignore[arg-type]


def _stall(direction: str, after: int, seconds: float = 2.5) -> Fault:
    return lambda proxy: proxy.stall(direction, seconds, after=after)  # type: ignore[arg-type]


def _slow(proxy: FaultyProxy) -> None:
    proxy.delay(0.002)


def _initial() -> np.ndarray:
    return np.random.default_rng(7).normal(0, 0.1, MANIFEST.numel).astype(np.float32)


MODEL = Model(RUN, MANIFEST, _initial(), ADAPTER_CONFIG)


def _sites(
    server: CoordinatorServer, faults: dict[str, dict[str, Fault]], identities: dict[str, KeyPair] | None = None
) -> list[Site]:
    """Every worker reaches the coordinator through a FaultyProxy of its own, faulted at the steps named."""
    return make_sites(
        server.port,
        MODEL,
        EXAMPLES,
        token_of=token_of,
        identities=identities,
        faults={w: faults.get(w, {}) for w in WORKERS},
        chunk_bytes=CHUNK,
    )


def _run(sites: list[Site]) -> None:
    errors = run_sites(sites)
    assert not errors, errors


def _counter(server: CoordinatorServer, name: str, **labels: str) -> float:
    return server.registry.get_sample_value(name, labels) or 0.0


FAULTS: dict[str, dict[str, Fault]] = {
    # clinical initializes: its initial model and its update are both cut off midway.
    "clinical": {"initialize": _cut("up", 1 * MIB), "upload": _cut("up", 2 * MIB)},
    # finance: its first download is cut off, its upload stalls until the coordinator cancels the idle stream.
    "finance": {"download": _cut("down", 1 * MIB), "upload": _stall("up", 1 * MIB)},
    # legal: its first download stalls until cancelled; every block of its link is late.
    "legal": {"download": _stall("down", 1 * MIB), "upload": _slow},
}


def _settings(tmp_path: Path, **overrides: Any) -> Any:
    return run_settings(
        tmp_path,
        rounds=1,
        timeouts={"poll_wait_ms": 20},
        limits={"chunk_bytes": CHUNK, "stream_idle_s": 1.0},
        **overrides,
    )


def test_cut_stalled_and_slow_transfers_restart_and_a_plain_round_counts_each_update_once(tmp_path: Path) -> None:
    # Prepare
    with CoordinatorServer(settings=_settings(tmp_path)) as server:
        sites = _sites(server, FAULTS)

        # Execute
        _run(sites)
        committed = server.coordinator._versions.current
        uploads = server._store.uploads(1, 1)
        attempts = [(r.round, r.attempt, r.status) for r in server._store.rounds()]
        received = _counter(server, "fedlora_received_bytes_total")
        discarded = _counter(server, "fedlora_discarded_bytes_total")
        sent = _counter(server, "fedlora_sent_bytes_total")
        cuts = sum(site.proxy.cuts for site in sites)

    # Assert: every fault fired, and each was overcome without a failed attempt.
    assert all(not site.faults for site in sites)
    assert cuts == 3
    assert attempts == [(0, 0, "completed"), (1, 1, "completed")]
    # The committed model: the initial one plus the example-weighted mean, each update folded once.
    weights = np.array([EXAMPLES[w] for w in WORKERS], dtype=np.float64)
    mean = np.average([site.delta for site in sites], axis=0, weights=weights)
    assert committed is not None
    np.testing.assert_allclose(committed.vector, _initial() + mean, rtol=0, atol=1e-6)
    assert sorted((u.worker_id, u.num_examples, u.size_bytes) for u in uploads) == [
        (w, EXAMPLES[w], SIZE) for w in WORKERS
    ]
    # Nothing counted twice: one copy per transfer in the report, the coordinator's counters and the workers'.
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rounds"][0]["upload_bytes"] == 3 * SIZE
    assert report["rounds"][0]["download_bytes"] == 6 * SIZE  # version 0 and version 1, to each worker
    assert received == 4 * SIZE  # the initial model and three updates
    assert sent == 6 * SIZE
    assert discarded > 0
    assert {site.worker: site.uploaded for site in sites} == {
        "clinical": [SIZE, SIZE],
        "finance": [SIZE],
        "legal": [SIZE],
    }
    assert {site.worker: site.downloaded for site in sites} == {w: [SIZE, SIZE] for w in WORKERS}


def _secure_settings(tmp_path: Path, identities: dict[str, KeyPair]) -> Any:
    workers = [
        {
            "id": w,
            "token_sha256": hashlib.sha256(token_of(w).encode()).hexdigest(),
            "identity_public": identities[w].public.hex(),
        }
        for w in WORKERS
    ]
    return _settings(tmp_path, workers=workers, secure_aggregation={"enabled": True, "clip_range": 1.0})


SECURE_FAULTS: dict[str, dict[str, Fault]] = {
    # clinical: its masked upload is cut off midway (its partial sum must come back out exactly).
    "clinical": {"initialize": _cut("up", 1 * MIB), "upload": _cut("up", 2 * MIB)},
    # finance: the answer to its key shares is lost (the resend is a duplicate), its masked upload stalls.
    "finance": {"share": _cut("down", 1), "upload": _stall("up", 1 * MIB)},
    # legal: the answer to its advertisement is lost, its download is cut off, its reveal crawls.
    "legal": {"advertise": _cut("down", 1), "download": _cut("down", 1 * MIB), "reveal": _slow},
}


def test_cut_stalled_and_slow_calls_restart_and_a_secure_round_sums_each_masked_update_once(tmp_path: Path) -> None:
    # Prepare
    identities = {w: identity_keypair() for w in WORKERS}
    with CoordinatorServer(settings=_secure_settings(tmp_path, identities)) as server:
        sites = _sites(server, SECURE_FAULTS, identities)

        # Execute
        _run(sites)
        committed = server.coordinator._versions.current
        attempts = [(r.round, r.attempt, r.status, r.dropped) for r in server._store.rounds()]
        received = _counter(server, "fedlora_received_bytes_total")
        masked_bytes = _counter(server, "fedlora_secagg_bytes_total", stage="masked")
        params = sites[0].session.params  # type: ignore[union-attr]

    # Assert: every fault fired; one attempt, nobody dropped.
    assert all(not site.faults for site in sites)
    assert attempts == [(0, 0, "completed", ()), (1, 1, "completed", ())]
    # The mean of the three updates (weighted by examples), within the quantization's rounding.
    weights = np.array([EXAMPLES[w] for w in WORKERS], dtype=np.float64)
    mean = np.average([site.delta for site in sites], axis=0, weights=weights)
    step = float(dequantize_sum(np.array([1], dtype=np.uint32), clip=params.clip_range, bits=params.bits)[0])
    assert committed is not None
    assert np.abs(committed.vector - (_initial() + mean)).max() <= 3 * step * params.max_examples / weights.sum() + 1e-6
    # Each masked update summed and counted once.
    masked_size = (MANIFEST.numel + 1) * 4
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rounds"][0]["upload_bytes"] == 3 * masked_size
    assert report["rounds"][0]["secagg"]["masked"]["bytes"] == 3 * masked_size
    assert masked_bytes == 3 * masked_size
    assert received == SIZE + 3 * masked_size
    assert [site.uploaded for site in sites] == [[SIZE, masked_size], [masked_size], [masked_size]]
