"""Does a round take <= 2x the bare gRPC transfer time of its bytes plus the workers' own compute?

The coordinator is the program a site runs (`python -m fedlora_server --config run.yaml`, its own
process, OMP_NUM_THREADS=1, SQLite state, held polls), secure aggregation on or off. N numpy
workers run in threads of this process, driven as bench/soak.py drives them (its NumpyWorker): the
real transport (fedlora_worker.transport.CoordinatorClient) and, secure, the real WorkerSession;
on TRAIN each downloads the task's global version, then uploads its float32 delta (plain) or takes
the secure stages (advertise, share keys, masked upload, reveal). The update is two float32
tensors named like one module's LoRA A and B (rank 16), 10,485,760 values (42 MB) by default; the
initial adapter is a random vector of that layout with a LoRA adapter config.

Per configuration (mode x N), `--rounds` rounds; round 1 is a warm-up, the rest give medians:
* round s: from the first worker receiving its TRAIN task of round r to the first worker receiving
  EVALUATE of round r (the version round r committed);
* bare transfer s: the round's bytes through a bare gRPC server in its own process (bench/ingest.py's
  sink): N workers download the global size at once (1 MiB DownloadChunk messages), then N workers
  upload the update size at once (the masked size, one word more, when secure), each on its own
  connection; median of 3, measured in the same run just before the coordinator's rounds;
* compute s: per round, the most any worker spent in its own compute (building the delta;
  secure: quantize, session advertise / share / mask / reveal), no RPC: the critical path; the sum
  over workers is printed beside it. Wall seconds of each worker's thread: N threads computing at
  once share the machine's cores, so the max is about what the cores needed for all of them.
ratio = round / (transfer + compute max); target <= 2.

Then where a round's time goes: for each step, when the last worker finished it (worker marks) or
the coordinator logged it (update_accepted, evaluation_started = the version written), in seconds
after the first TRAIN, medians over the measured rounds; and when the last worker heard EVALUATE
and the next round's first TRAIN came (outside the round's time, but part of every round's cycle).

Usage: python bench/rounds.py [--quick] [--values 10485760] [--rounds 4] [--workers 3 10] [--mode plain secure]
       [--poll-wait-ms MS]   (--quick: 2,621,440 values, 3 rounds)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import grpc
import ingest  # bench/ingest.py and bench/soak.py: bench/ is sys.path[0] when this runs as a script
import numpy as np
import soak
import yaml

from fedlora_common.manifest import MASKED_DTYPE, WIRE_DTYPE, Manifest, TensorSpec
from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_common.secagg import KeyPair, identity_keypair

RUN = "bench-rounds"
RANK = 16
DEFAULT_VALUES = 10_485_760  # 42 MB of float32
QUICK_VALUES = 2_621_440
TRANSFER_REPEATS = 3
TARGET = 2.0
MB = 1e6
DOWNLOAD_METHOD = f"/{ingest.SERVICE_NAME}/DownloadGlobal"
PLAIN_STEPS = ("downloaded", "uploaded")
SECURE_STEPS = (
    "downloaded",
    "advertised",
    "SECAGG_SHARE_KEYS",
    "shared",
    "SECAGG_MASKED_UPLOAD",
    "uploaded",
    "SECAGG_UNMASK",
    "revealed",
)

Mode = Literal["plain", "secure"]


def lora_adapter(values: int, seed: int = 0) -> soak.Adapter:
    """One module's LoRA A (r x k) and B (k x r) holding `values` float32 values, random, with a peft config."""
    cols = values // (2 * RANK)
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    manifest = Manifest(
        (TensorSpec(f"{module}.lora_A.weight", (RANK, cols)), TensorSpec(f"{module}.lora_B.weight", (cols, RANK)))
    )
    initial = np.random.default_rng(seed).standard_normal(manifest.numel, dtype=np.float32) * np.float32(0.01)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK}
    config["target_modules"] = ["q_proj"]
    return soak.Adapter(manifest, initial, json.dumps(config))


# ---- the bare transfer ---------------------------------------------------------------------


@dataclass(frozen=True)
class Transfer:
    """Seconds from the first byte to the last worker's end: N downloads at once, then N uploads at once."""

    down: float
    up: float

    @property
    def total(self) -> float:
        return self.down + self.up


def download_concurrently(port: int, nbytes: int, workers: list[str]) -> float:
    """Every worker streams a download of `nbytes` at once, on its own connection; seconds to the last end."""
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=ingest.CLIENT_OPTIONS) for _ in workers]
    try:
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=30)
        barrier = threading.Barrier(len(workers) + 1)
        finished = [0.0] * len(workers)

        def fetch(i: int) -> None:
            call = channels[i].unary_stream(
                DOWNLOAD_METHOD,
                request_serializer=pb.DownloadRequest.SerializeToString,
                response_deserializer=pb.DownloadChunk.FromString,
            )
            request = pb.DownloadRequest(worker_id=workers[i], run_id=RUN, version=0)
            barrier.wait()
            received = sum(
                len(m.chunk.data)
                for m in call(request, metadata=ingest.metadata(workers[i]), timeout=ingest.RPC_TIMEOUT_S)
            )
            finished[i] = time.perf_counter()
            if received != nbytes:
                raise RuntimeError(f"{workers[i]}: downloaded {received} of {nbytes} bytes")

        with futures.ThreadPoolExecutor(len(workers)) as pool:
            fetches = [pool.submit(fetch, i) for i in range(len(workers))]
            barrier.wait()
            started = time.perf_counter()
            for done in fetches:
                done.result()
        return max(finished) - started
    finally:
        for channel in channels:
            channel.close()


def bare_transfer(mode: Mode, workers: int, values: int) -> list[Transfer]:
    """The round's bytes through the sink, TRANSFER_REPEATS times: N global downloads, then N uploads."""
    ids = ingest.worker_ids(workers)
    payload = ingest.Payload.random(values, MASKED_DTYPE if mode == "secure" else WIRE_DTYPE)
    runs = []
    with ingest.spawn("sink", "--download-bytes", str(4 * values)) as sink:
        for _ in range(TRANSFER_REPEATS):
            down = download_concurrently(sink.port, 4 * values, ids)
            up = ingest.upload_concurrently(sink.port, payload, ids, round_=1).last
            runs.append(Transfer(down, up))
    return runs


# ---- the rounds ----------------------------------------------------------------------------


def _run_yaml(
    where: Path,
    *,
    secure: bool,
    identities: dict[str, KeyPair],
    tokens: dict[str, str],
    rounds: int,
    poll_wait_ms: int | None,
) -> Path:
    settings: dict[str, Any] = {
        "run_id": RUN,
        "base_model": "bench",
        "rounds": rounds,
        "min_workers": len(identities),
        "seed": 0,
        "lora": {"rank": RANK, "alpha": 2 * RANK},
        "state_dir": str(where / "state"),
        "listen": {"host": "127.0.0.1", "port": 0, "metrics_port": None},
        "secure_aggregation": {"enabled": secure, "clip_range": 1.0},
        "workers": [
            {
                "id": w,
                "token_sha256": hashlib.sha256(tokens[w].encode()).hexdigest(),
                "identity_public": identities[w].public.hex(),
            }
            for w in identities
        ],
    }
    if poll_wait_ms is not None:  # else the coordinator's default
        settings["timeouts"] = {"poll_wait_ms": poll_wait_ms}
    path = where / "run.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


@dataclass(frozen=True)
class RoundSample:
    """One round: its time, the workers' compute, and when each step ended (seconds after the first TRAIN)."""

    round: int
    seconds: float
    compute_max: float
    compute_sum: float
    steps: dict[str, float]


def _log_events(log: Path) -> list[dict[str, Any]]:
    events = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if "timestamp" in event:
                event["at"] = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
                events.append(event)
    return events


def _samples(workers: list[soak.NumpyWorker], events: list[dict[str, Any]], rounds: int) -> list[RoundSample]:
    samples = []
    for r in range(1, rounds + 1):
        times = [w.times[r] for w in workers]
        start = min(t.train_at for t in times)
        evaluated = [t.evaluate_at for t in times if t.evaluate_at is not None]
        steps = {"last TRAIN": max(t.train_at for t in times) - start}
        for name in (*SECURE_STEPS, *PLAIN_STEPS):
            ends = [t.marks[name] for t in times if name in t.marks]
            if len(ends) == len(times):
                steps[name] = max(ends) - start
        logged = {e["event"]: e["at"] for e in events if e.get("round") == r}  # the last of each event
        for event, step in (("update_accepted", "accepted"), ("evaluation_started", "committed")):
            if event in logged:
                steps[step] = logged[event] - start
        steps["first EVALUATE"] = min(evaluated) - start
        if len(evaluated) == len(times):
            steps["last EVALUATE"] = max(evaluated) - start
        if all(r + 1 in w.times for w in workers):
            steps["next TRAIN"] = min(w.times[r + 1].train_at for w in workers) - start
        computes = [t.compute_s for t in times]
        samples.append(RoundSample(r, min(evaluated) - start, max(computes), sum(computes), steps))
    return samples


@dataclass(frozen=True)
class Run:
    """What one coordinator run gave: its rounds, and the tasks the workers abandoned (the round moved on)."""

    rounds: list[RoundSample]
    abandoned: list[str]


def run_rounds(mode: Mode, workers: int, adapter: soak.Adapter, rounds: int, poll_wait_ms: int | None) -> Run:
    """A coordinator process and N numpy workers in threads through `rounds` rounds."""
    names = [f"site-{i:02d}" for i in range(workers)]
    identities = {w: identity_keypair() for w in names}
    tokens = {w: f"rounds-token-{w}" for w in names}
    with tempfile.TemporaryDirectory(prefix="bench-rounds-") as tmp:
        where = Path(tmp)
        run_yaml = _run_yaml(
            where,
            secure=mode == "secure",
            identities=identities,
            tokens=tokens,
            rounds=rounds,
            poll_wait_ms=poll_wait_ms,
        )
        log = where / "coordinator.log"
        with log.open("wb") as handle:
            server, port = soak.start_coordinator(run_yaml, handle)
            numpy_workers = soak.numpy_workers(port, tokens, identities, adapter, run_id=RUN)
            soak.run_all(numpy_workers)
            code = server.wait(timeout=120)
            for worker in numpy_workers:
                worker.client.close()
        errors = {w.worker: repr(w.error) for w in numpy_workers if w.error is not None}
        if errors or code != 0:
            raise RuntimeError(f"{mode} N={workers} failed: exit {code}, {errors}\n{log.read_text()[-3000:]}")
        abandoned = [f"{w.worker} {why}" for w in numpy_workers for why in w.abandoned]
        return Run(_samples(numpy_workers, _log_events(log), rounds), abandoned)


# ---- the report ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    mode: Mode
    workers: int
    transfers: list[Transfer]
    run: Run

    @property
    def measured(self) -> list[RoundSample]:
        return self.run.rounds[1:]

    @property
    def round_s(self) -> float:
        return statistics.median(s.seconds for s in self.measured)

    @property
    def transfer(self) -> Transfer:
        return sorted(self.transfers, key=lambda t: t.total)[len(self.transfers) // 2]

    @property
    def compute_max(self) -> float:
        return statistics.median(s.compute_max for s in self.measured)

    @property
    def compute_sum(self) -> float:
        return statistics.median(s.compute_sum for s in self.measured)

    @property
    def ratio(self) -> float:
        return self.round_s / (self.transfer.total + self.compute_max)


def print_report(results: list[Result], values: int, rounds: int, poll_wait_ms: int | None) -> None:
    nbytes = 4 * values
    poll = "the coordinator's default" if poll_wait_ms is None else f"{poll_wait_ms} ms"
    print(
        f"rounds: update of {values:,} values ({nbytes / MB:.1f} MB float32, masked {(nbytes + 4) / MB:.1f} MB; LoRA A/B "
        f"r{RANK}), numpy workers in threads (real CoordinatorClient / WorkerSession) against fedlora-server as its own "
        f"process (OMP_NUM_THREADS=1, polls held: {poll}); {rounds} rounds per configuration, round 1 skipped, "
        f"medians; bare transfer: median of {TRANSFER_REPEATS}"
    )
    header = (
        f"{'mode':>6} {'N':>3} {'round s':>8} {'transfer s':>11} {'(down + up)':>13} {'compute s max':>14} "
        f"{'compute s sum':>14} {'ratio':>6} {'target':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        t = r.transfer
        verdict = "ok" if r.ratio <= TARGET else "MISSED"
        print(
            f"{r.mode:>6} {r.workers:>3} {r.round_s:>8.2f} {t.total:>11.2f} {f'({t.down:.2f} + {t.up:.2f})':>13} "
            f"{r.compute_max:>14.2f} {r.compute_sum:>14.2f} {r.ratio:>6.2f} {'<= ' + str(TARGET):>7} {verdict}"
        )
    print()
    print("round s: first worker's TRAIN -> first worker's EVALUATE of the same round. transfer: N downloads of the")
    print("global size at once, then N uploads of the update at once, against a bare gRPC server (own connections).")
    print("compute: a worker's own seconds (delta; quantize, advertise/share/mask/reveal), max and sum over workers.")
    print("ratio = round / (transfer + compute max).")
    print()
    print("where the round's time goes: s after the first TRAIN when the last worker had done each step")
    print("(accepted: the coordinator's last update_accepted; committed: its evaluation_started, the version written)")
    for mode in dict.fromkeys(r.mode for r in results):
        steps = ("last TRAIN", *(SECURE_STEPS if mode == "secure" else PLAIN_STEPS), "accepted", "committed")
        steps = (*steps, "first EVALUATE", "last EVALUATE", "next TRAIN")
        names = [s.replace("SECAGG_", "") for s in steps]
        header = f"{'mode':>6} {'N':>3} " + " ".join(f"{n:>{max(len(n), 5)}}" for n in names)
        print(header)
        for r in (r for r in results if r.mode == mode):
            cells = []
            for step, name in zip(steps, names, strict=True):
                seen = [s.steps[step] for s in r.measured if step in s.steps]
                text = f"{statistics.median(seen):.2f}" if seen else "-"
                cells.append(f"{text:>{max(len(name), 5)}}")
            print(f"{r.mode:>6} {r.workers:>3} " + " ".join(cells))
    abandoned = [f"{r.mode} N={r.workers}: {why}" for r in results for why in r.run.abandoned]
    if abandoned:
        print()
        print(
            f"tasks the workers abandoned (StaleTask/TransferError, then polled again, as the daemon does): {len(abandoned)}"
        )
        for line in abandoned:
            print(f"  {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", type=int, default=None, help=f"update size (default {DEFAULT_VALUES:,})")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per configuration (default 4, quick 3)")
    parser.add_argument("--workers", type=int, nargs="+", default=[3, 10], help="values of N")
    parser.add_argument("--mode", choices=("plain", "secure"), nargs="+", default=["plain", "secure"])
    parser.add_argument("--poll-wait-ms", type=int, default=None, help="timeouts.poll_wait_ms (default: the server's)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_VALUES:,} values, 3 rounds")
    args = parser.parse_args()
    values = args.values or (QUICK_VALUES if args.quick else DEFAULT_VALUES)
    rounds = args.rounds or (3 if args.quick else 4)
    if values % (2 * RANK) or values < 2 * RANK:
        parser.error(f"--values must be a positive multiple of {2 * RANK} (LoRA A and B of rank {RANK})")
    if rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 is a warm-up)")

    adapter = lora_adapter(values)
    results = []
    for mode in args.mode:
        for n in args.workers:
            transfers = bare_transfer(mode, n, values)
            results.append(Result(mode, n, transfers, run_rounds(mode, n, adapter, rounds, args.poll_wait_ms)))
    print_report(results, values, rounds, args.poll_wait_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
