"""The coordinator's ingest rate and peak memory against the number of concurrent workers.

For each N and each mode, N workers stream one round's update each (the Llama-3.1-8B rank-16
LoRA size by default: 41,943,040 values, 168 MB) at the same time. Two servers receive the same
bytes over loopback, each in its own process:

* the coordinator: fedlora_server.server.CoordinatorServer, brought to the round's upload over the
  raw wire as real workers would. plain: float32 deltas, each chunk checked, hashed and spooled,
  each verified upload then folded into the float64 accumulator. secure: the workers first
  advertise keys and share them (real WorkerSession stage machines), then stream masked uint32
  vectors that the coordinator folds into its modular sum as the chunks arrive (no spool, no
  second pass); after the receipts they reveal their shares and the round commits;
* the sink: a bare gRPC server with the same options whose UploadUpdate decodes the same
  messages and drops them, the most any gRPC Python server could ingest on this machine (its
  DownloadGlobal streams `--download-bytes` in 1 MiB chunks, for bench/rounds.py).

Rate = N x payload / (first byte -> last receipt); the ratio coordinator/sink is what to read,
both are measured in the same run, alternately, and the median of the repeats is reported. The
client is one process (one channel and thread per worker, messages serialized once beforehand);
it shares the 2 cores and the GIL of that one process, which caps both servers alike.

The coordinator's peak RSS (VmHWM) is reset once setup is done and read after the last round, so
it is the peak while ingesting (and committing). `--window BYTES` fixes the HTTP/2 stream window
(run.yaml `limits.stream_window_bytes`) instead of gRPC's bandwidth-delay-product auto-tuning.

Usage: python bench/ingest.py [--quick] [--repeats R] [--mode plain secure] [--window BYTES]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
import numpy as np

from fedlora_common.chunking import DEFAULT_CHUNK_BYTES, chunk_count, iter_chunks, sha256
from fedlora_common.logs import configure_logging
from fedlora_common.manifest import MASKED_DTYPE, WIRE_DTYPE, Manifest, TensorSpec
from fedlora_common.messages import TaskKind, UploadHeader, UploadKind
from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_common.proto.fedlora.v1 import coordinator_pb2_grpc as pb_grpc
from fedlora_common.secagg import KeyPair, identity_keypair
from fedlora_common.serde import (
    advertisement_to_proto,
    encrypted_share_to_proto,
    revealed_share_to_proto,
    task_from_proto,
    upload_header_to_proto,
)
from fedlora_server.config import RunSettings, token_digest
from fedlora_server.server import SERVICE_NAME, CoordinatorServer
from fedlora_worker.secagg_session import WorkerSession

LLAMA_8B_LORA_NUMEL = 41_943_040  # Llama-3.1-8B, rank 16, all 7 projections (bench/comm.py)
QUICK_NUMEL = 4 * 2**20
CHUNK_BYTES = DEFAULT_CHUNK_BYTES
RUN_ID = "bench-ingest"
EXAMPLES = 1000
ADAPTER_CONFIG = '{"peft_type": "LORA", "r": 16}'
UPLOAD_METHOD = f"/{SERVICE_NAME}/UploadUpdate"
RPC_TIMEOUT_S = 1800.0
MB = 1e6
# As CoordinatorServer.start and fedlora_worker.transport set them; each worker gets its own
# connection, as separate worker processes would (channels in one process share one by default).
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", CHUNK_BYTES + 2**16),
    ("grpc.max_send_message_length", CHUNK_BYTES + 2**20),
]
CLIENT_OPTIONS = [
    ("grpc.max_receive_message_length", CHUNK_BYTES + 2**20),
    ("grpc.max_send_message_length", CHUNK_BYTES + 2**16),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.use_local_subchannel_pool", 1),
]

ServerKind = Literal["coordinator", "sink"]
Mode = Literal["plain", "secure"]


def worker_ids(count: int) -> list[str]:
    return [f"site-{i:02d}" for i in range(count)]


def metadata(worker_id: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer token-of-{worker_id}"),)


# ---- the servers (each runs in a child process: `ingest.py --serve KIND`) ------------------


def coordinator_settings(
    identities: dict[str, KeyPair], rounds: int, state_dir: Path, *, secure: bool, window: int | None
) -> RunSettings:
    hour = 3600.0
    workers = [
        {"id": w, "token_sha256": token_digest(f"token-of-{w}"), "identity_public": k.public.hex()}
        for w, k in identities.items()
    ]
    return RunSettings.model_validate(
        {
            "run_id": RUN_ID,
            "base_model": "bench",
            "rounds": rounds,
            "min_workers": len(workers),
            "workers": workers,
            "state_dir": state_dir,
            "listen": {"host": "127.0.0.1", "port": 0, "metrics_port": None},
            "timeouts": {"admission_s": hour, "phase_base_s": hour, "train_s": hour, "poll_wait_ms": 10},
            "limits": {"chunk_bytes": CHUNK_BYTES, "stream_window_bytes": window},
            "secure_aggregation": {"enabled": secure, "threshold_fraction": 0.5},
        }
    )


def _drop_upload(requests: Iterator[pb.UploadMessage], context: grpc.ServicerContext) -> pb.UploadReceipt:
    received = sum(len(m.chunk.data) for m in requests)
    return pb.UploadReceipt(round=1, bytes_received=received)


def _send_download(
    download_bytes: int,
) -> Callable[[pb.DownloadRequest, grpc.ServicerContext], Iterator[pb.DownloadChunk]]:
    """DownloadGlobal of `download_bytes` bytes: a header, then chunks of CHUNK_BYTES, each one message."""
    block = np.random.default_rng(0).bytes(CHUNK_BYTES)

    def send(request: pb.DownloadRequest, context: grpc.ServicerContext) -> Iterator[pb.DownloadChunk]:
        yield pb.DownloadChunk(header=pb.DownloadHeader(chunk_count=chunk_count(download_bytes, CHUNK_BYTES)))
        for seq, start in enumerate(range(0, download_bytes, CHUNK_BYTES)):
            yield pb.DownloadChunk(chunk=pb.Chunk(seq=seq, data=block[: min(CHUNK_BYTES, download_bytes - start)]))

    return send


def start_sink(download_bytes: int = 0) -> grpc.Server:
    """A server, not yet bound, whose UploadUpdate decodes every message of the stream and drops it, and whose
    DownloadGlobal streams `download_bytes` bytes whatever the request."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=SERVER_OPTIONS)
    upload = grpc.stream_unary_rpc_method_handler(
        _drop_upload,
        request_deserializer=pb.UploadMessage.FromString,
        response_serializer=pb.UploadReceipt.SerializeToString,
    )
    download = grpc.unary_stream_rpc_method_handler(
        _send_download(download_bytes),
        request_deserializer=pb.DownloadRequest.FromString,
        response_serializer=pb.DownloadChunk.SerializeToString,
    )
    handlers = {"UploadUpdate": upload, "DownloadGlobal": download}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)])
    return server


def serve_coordinator(settings_file: Path) -> None:
    """Child process: run a coordinator from a saved run.yaml (JSON), print its port, and stop when stdin closes."""
    configure_logging(json=True, level="warning")
    coordinator = CoordinatorServer(settings=RunSettings.model_validate_json(settings_file.read_text()))
    print(coordinator.start(), flush=True)
    sys.stdin.read()
    coordinator.shutdown()


def serve_sink(download_bytes: int = 0) -> None:
    """Child process: run the sink (its downloads `download_bytes` long), print its port, and stop when stdin closes."""
    sink = start_sink(download_bytes)
    port = sink.add_insecure_port("127.0.0.1:0")
    sink.start()
    print(port, flush=True)
    sys.stdin.read()
    sink.stop(grace=2).wait()


@dataclass
class ServerProcess:
    """A server child process, seen from the client: its port and its memory."""

    process: subprocess.Popen[str]
    port: int

    def _status(self, key: str) -> int:
        """A kB field of /proc/<pid>/status, in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    @property
    def rss(self) -> int:
        return self._status("VmRSS")

    @property
    def peak_rss(self) -> int:
        return self._status("VmHWM")

    def reset_peak_rss(self) -> None:
        """Start VmHWM over from the current RSS (Linux >= 4.0)."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")


@contextmanager
def spawn(kind: ServerKind, *options: str) -> Iterator[ServerProcess]:
    """Start `ingest.py --serve KIND OPTIONS...` and read the port it prints; stop it by closing its stdin."""
    command = [sys.executable, __file__, "--serve", kind, *options]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        yield ServerProcess(process, int(process.stdout.readline()))
    finally:
        process.stdin.close()
        process.wait(timeout=60)


# ---- the client ------------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    """One update, its chunk messages serialized once and sent as they are by every worker."""

    manifest: Manifest
    dtype: str
    nbytes: int
    sha256: bytes
    chunks: tuple[bytes, ...]

    @classmethod
    def random(cls, numel: int, dtype: str) -> Payload:
        """float32: a small random delta; uint32: what a masked update looks like (uniform words, plus the weight)."""
        rng = np.random.default_rng(0)
        if dtype == MASKED_DTYPE:
            vector = rng.integers(0, 2**32, numel + 1, dtype=np.uint32)
        else:
            vector = rng.standard_normal(numel, dtype=np.float32) * np.float32(1e-3)
        data = vector.data.cast("B")
        chunks = tuple(
            pb.UploadMessage(chunk=pb.Chunk(seq=seq, data=piece.tobytes())).SerializeToString()
            for seq, piece in enumerate(iter_chunks(data, CHUNK_BYTES))
        )
        # Names and shapes do not matter for ingest, only the element count.
        tensors = (TensorSpec("lora_A", (numel // 2,)), TensorSpec("lora_B", (numel - numel // 2,)))
        return cls(Manifest(tensors), dtype, len(data), sha256(data), chunks)

    def messages(self, worker_id: str, round_: int, kind: UploadKind, tag: int = 0) -> Iterator[bytes]:
        initial = kind is UploadKind.INITIAL
        header = UploadHeader(
            worker_id=worker_id,
            run_id=RUN_ID,
            round=round_,
            kind=kind,
            base_version=max(round_ - 1, 0),
            num_examples=EXAMPLES,
            total_size=self.nbytes,
            chunk_count=chunk_count(self.nbytes, CHUNK_BYTES),
            sha256=self.sha256,
            dtype=self.dtype,
            manifest=self.manifest if initial else None,
            artifact_config_json=ADAPTER_CONFIG if initial else "",
            train_loss=1.0,
            tag=tag,
        )
        yield pb.UploadMessage(header=upload_header_to_proto(header)).SerializeToString()
        yield from self.chunks


def _upload_callable(channel: grpc.Channel) -> grpc.StreamUnaryMultiCallable[bytes, pb.UploadReceipt]:
    """UploadUpdate taking already serialized messages (no request serializer: bytes go as they are)."""
    return channel.stream_unary(
        UPLOAD_METHOD, request_serializer=None, response_deserializer=pb.UploadReceipt.FromString
    )


@dataclass(frozen=True)
class Receipts:
    """Seconds from the first byte of all uploads to the first and to the last receipt."""

    first: float
    last: float


def upload_concurrently(port: int, payload: Payload, workers: list[str], round_: int, tag: int = 0) -> Receipts:
    """Every worker streams its update at once, on its own connection."""
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=CLIENT_OPTIONS) for _ in workers]
    try:
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=30)
        barrier = threading.Barrier(len(workers) + 1)
        finished = [0.0] * len(workers)

        def send(i: int) -> None:
            call = _upload_callable(channels[i])
            kind = UploadKind.MASKED if payload.dtype == MASKED_DTYPE else UploadKind.DELTA
            messages = payload.messages(workers[i], round_, kind, tag)
            barrier.wait()
            receipt = call(messages, metadata=metadata(workers[i]), timeout=RPC_TIMEOUT_S)
            finished[i] = time.perf_counter()
            if receipt.bytes_received != payload.nbytes:
                raise RuntimeError(f"{workers[i]}: receipt for {receipt.bytes_received} of {payload.nbytes} bytes")

        with futures.ThreadPoolExecutor(len(workers)) as pool:
            sends = [pool.submit(send, i) for i in range(len(workers))]
            barrier.wait()
            started = time.perf_counter()
            for done in sends:
                done.result()
        return Receipts(min(finished) - started, max(finished) - started)
    finally:
        for channel in channels:
            channel.close()


class CoordinatorDriver:
    """Moves a coordinator through its phases over the raw wire, as N workers would."""

    def __init__(self, port: int, workers: list[str], payload: Payload) -> None:
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CLIENT_OPTIONS)
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self._upload = _upload_callable(self._channel)
        self._workers = workers
        self._payload = payload

    def close(self) -> None:
        self._channel.close()

    def _poll(self, worker: str) -> pb.Task:
        request = pb.PollTaskRequest(worker_id=worker, run_id=RUN_ID)
        return self._stub.PollTask(request, metadata=metadata(worker))

    def initialize(self) -> None:
        """Join every worker, upload the initial model and evaluate it: round 1 then takes updates."""
        for worker in self._workers:
            self._stub.Join(pb.JoinRequest(worker_id=worker, num_examples=EXAMPLES), metadata=metadata(worker))
        initializer = self._workers[0]  # the coordinator asks the first worker id in sorted order
        if self._poll(initializer).kind != pb.TASK_KIND_INITIALIZE:
            raise RuntimeError(f"{initializer} was not asked to initialize")
        messages = self._payload.messages(initializer, 0, UploadKind.INITIAL)
        self._upload(messages, metadata=metadata(initializer), timeout=RPC_TIMEOUT_S)
        self.evaluate(0)

    def evaluate(self, round_: int) -> None:
        """Every worker reports on the version round_ committed; the next round then opens."""
        for worker in self._workers:
            if self._poll(worker).kind != pb.TASK_KIND_EVALUATE:
                raise RuntimeError(f"{worker} was not asked to evaluate round {round_}")
            report = pb.MetricsReport(
                worker_id=worker, run_id=RUN_ID, round=round_, version=round_, eval_loss=2.0, eval_tokens=100
            )
            self._stub.ReportMetrics(report, metadata=metadata(worker))


class SecureDriver(CoordinatorDriver):
    """The secure stages around each masked upload, with real worker sessions (keys, shares, reveals).

    The masked payload every worker streams is the same random words: ingest does not depend on
    what the words are, and the round still unmasks and commits (a meaningless mean).
    """

    def __init__(self, port: int, workers: list[str], payload: Payload, identities: dict[str, KeyPair]) -> None:
        super().__init__(port, workers, payload)
        self._identities = identities
        self._public = {w: k.public for w, k in identities.items()}
        self._sessions: dict[str, WorkerSession] = {}

    def _task(self, worker: str, kind: TaskKind) -> pb.Task:
        task = self._poll(worker)
        if task.kind != pb.TaskKind.Value(f"TASK_KIND_{kind.name}"):
            raise RuntimeError(f"{worker} was asked {pb.TaskKind.Name(task.kind)}, expected {kind.name}")
        return task

    def keys_exchanged(self) -> int:
        """Advertise and share keys for the open attempt; every session then masks. Returns the attempt's tag."""
        tag = 0
        for worker in self._workers:
            plan = task_from_proto(self._task(worker, TaskKind.TRAIN), run_id=RUN_ID).secagg
            assert plan is not None
            tag = plan.params.tag
            session = WorkerSession(
                worker_id=worker,
                params=plan.params,
                identity_private=self._identities[worker].private,
                peer_identities=self._public,
            )
            self._sessions[worker] = session
            request = pb.AdvertiseKeysRequest(
                worker_id=worker, run_id=RUN_ID, tag=tag, keys=advertisement_to_proto(session.advertise())
            )
            self._stub.AdvertiseKeys(request, metadata=metadata(worker))
        for worker in self._workers:
            plan = task_from_proto(self._task(worker, TaskKind.SECAGG_SHARE_KEYS), run_id=RUN_ID).secagg
            assert plan is not None
            shares = self._sessions[worker].share_keys(plan.roster)
            request = pb.ShareKeysRequest(
                worker_id=worker, run_id=RUN_ID, tag=tag, shares=[encrypted_share_to_proto(s) for s in shares]
            )
            self._stub.ShareKeys(request, metadata=metadata(worker))
        for worker in self._workers:
            plan = task_from_proto(self._task(worker, TaskKind.SECAGG_MASKED_UPLOAD), run_id=RUN_ID).secagg
            assert plan is not None
            self._sessions[worker].mask(plan.inbox, plan.survivors, np.zeros(1, dtype=np.uint32))
        return tag

    def unmasked(self, tag: int) -> None:
        for worker in self._workers:
            plan = task_from_proto(self._task(worker, TaskKind.SECAGG_UNMASK), run_id=RUN_ID).secagg
            assert plan is not None
            shares = self._sessions[worker].reveal(plan.survivors, plan.dropped)
            request = pb.RevealSharesRequest(
                worker_id=worker, run_id=RUN_ID, tag=tag, shares=[revealed_share_to_proto(s) for s in shares]
            )
            self._stub.RevealShares(request, metadata=metadata(worker))


# ---- the benchmark ---------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    mode: Mode
    workers: int
    sink: list[Receipts]
    coordinator: list[Receipts]
    idle_rss: int
    peak_rss: int
    sink_peak_rss: int


def median_rate(workers: int, payload_bytes: int, runs: list[Receipts]) -> float:
    """MB/s of all workers' payload over first byte -> last receipt, median over the runs."""
    return workers * payload_bytes / statistics.median(r.last for r in runs) / MB


def measure(mode: Mode, workers: int, numel: int, repeats: int, window: int | None) -> Result:
    """Alternate sink and coordinator uploads `repeats` times each; rounds 1..repeats of one run."""
    ids = worker_ids(workers)
    identities = {w: identity_keypair() for w in ids}
    initial = Payload.random(numel, WIRE_DTYPE)
    payload = initial if mode == "plain" else Payload.random(numel, MASKED_DTYPE)
    sink_runs: list[Receipts] = []
    coordinator_runs: list[Receipts] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as state_dir:
        settings_file = Path(state_dir) / "run.json"
        settings = coordinator_settings(identities, repeats, Path(state_dir), secure=mode == "secure", window=window)
        settings_file.write_text(settings.model_dump_json())
        with spawn("sink") as sink, spawn("coordinator", "--settings", str(settings_file)) as coord:
            driver = SecureDriver(coord.port, ids, initial, identities)
            try:
                driver.initialize()
                idle_rss = coord.rss
                coord.reset_peak_rss()
                sink.reset_peak_rss()
                for round_ in range(1, repeats + 1):
                    if round_ > 1:
                        driver.evaluate(round_ - 1)
                    tag = driver.keys_exchanged() if mode == "secure" else 0
                    sink_runs.append(upload_concurrently(sink.port, payload, ids, round_, tag))
                    coordinator_runs.append(upload_concurrently(coord.port, payload, ids, round_, tag))
                    if mode == "secure":
                        driver.unmasked(tag)
                peak_rss, sink_peak_rss = coord.peak_rss, sink.peak_rss
            finally:
                driver.close()
    return Result(mode, workers, sink_runs, coordinator_runs, idle_rss, peak_rss, sink_peak_rss)


def print_table(results: list[Result], numel: int, repeats: int, window: int | None) -> None:
    nbytes = 4 * numel
    window_text = "auto (BDP probe)" if window is None else f"{window:,} bytes"
    print(
        f"payload {nbytes / MB:.1f} MB per worker ({numel:,} values; masked: one more, the weight), "
        f"chunks of {CHUNK_BYTES // 2**20} MiB, median of {repeats} round(s) per N; stream window {window_text}"
    )
    header = (
        f"{'mode':>6} {'workers':>7} {'total MB':>9} {'sink MB/s':>10} {'coord MB/s':>11} {'coord/sink':>10} "
        f"{'coord receipts s':>17} {'idle RSS MB':>12} {'peak RSS MB':>12} {f'peak/@{results[0].workers}':>8} "
        f"{'sink peak MB':>13}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        fewest = next(f for f in results if f.mode == r.mode)
        sink = median_rate(r.workers, nbytes, r.sink)
        coord = median_rate(r.workers, nbytes, r.coordinator)
        typical = sorted(r.coordinator, key=lambda run: run.last)[len(r.coordinator) // 2]
        receipts = f"{typical.first:.1f} - {typical.last:.1f}"
        print(
            f"{r.mode:>6} {r.workers:>7} {r.workers * nbytes / MB:>9,.0f} {sink:>10,.0f} {coord:>11,.0f} "
            f"{coord / sink:>10.2f} {receipts:>17} {r.idle_rss / MB:>12,.0f} {r.peak_rss / MB:>12,.0f} "
            f"{r.peak_rss / fewest.peak_rss:>8.2f} {r.sink_peak_rss / MB:>13,.0f}"
        )
    print()
    print("MB = 1e6 bytes. Rates: payload of all workers over first byte -> last receipt (median round).")
    print("coord receipts: first and last receipt of the median round; the gap is the folds queued behind")
    print("the coordinator lock and the commit of the round, which the last upload's call waits for.")
    print("idle RSS: coordinator after setup (global model held); peak RSS: its VmHWM while ingesting and")
    print("committing; sink peak: the bare gRPC sink's VmHWM over the same uploads (gRPC's own buffers).")
    print(
        "Targets: coord/sink >= 0.8 with secure aggregation on; peak RSS at the most workers <= 1.25 x at the fewest."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_NUMEL:,} values, 2 and 8 workers, 1 round")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per N (default 3, quick 1)")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="values of N (default 2 8 32)")
    parser.add_argument("--mode", choices=("plain", "secure"), nargs="+", default=["secure", "plain"])
    parser.add_argument("--window", type=int, default=None, help="fixed HTTP/2 stream window in bytes")
    parser.add_argument("--serve", choices=("coordinator", "sink"), help=argparse.SUPPRESS)
    parser.add_argument("--settings", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--download-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "sink":
        serve_sink(args.download_bytes)
        return
    if args.serve == "coordinator":
        serve_coordinator(args.settings)
        return

    numel = QUICK_NUMEL if args.quick else LLAMA_8B_LORA_NUMEL
    counts = args.workers or ([2, 8] if args.quick else [2, 8, 32])
    repeats = args.repeats or (1 if args.quick else 3)
    results = [measure(mode, n, numel, repeats, args.window) for mode in args.mode for n in counts]
    print_table(results, numel, repeats, args.window)


if __name__ == "__main__":
    main()
