"""Fuzzing every RPC of the coordinator over the real wire, the secure-aggregation stages included.

At checkpoints of a real run (admission, initialize, evaluation, each secure stage half answered,
the plain upload, finished) hypothesis sends malformed, out-of-order, replayed, oversized and
well-formed-but-wrong messages, from strangers, from an allow-listed worker that never joined, and
from the participants themselves. Every answer must be one of the statuses DESIGN.md lists (never
UNKNOWN, never INTERNAL); it must be the precise one where a message carries one defect at a moment
that would take its right form; and after every case the coordinator's state (phase, round,
attempt, stage, who answered, the masked sum or float accumulator, the store) is exactly as before.
Between checkpoints real worker sessions carry the run on, and it commits the right mean.

The cases come from the run's seed (tests/seeds.py): each test prints it and the digest of the cases
it sent, every failure names it, and `FEDLORA_FUZZ_SEED=N python -m pytest tests/server/test_fuzz.py`
sends the same cases again (the same digest).

Never sent: a message that is right (it would be taken, legitimately), a Leave that would be
honoured, and a revealed share that parses at the right x with a wrong value (no coordinator can
tell it before reconstruction; tests/server/test_secure_round.py covers that failure).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from hypothesis import HealthCheck, Phase, given, seed, settings

from fedlora_common.chunking import iter_chunks
from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_common.proto.fedlora.v1 import coordinator_pb2_grpc as pb_grpc
from fedlora_common.secagg import KeyPair, dequantize_sum, identity_keypair, quantize
from fedlora_common.serde import (
    advertisement_from_proto,
    advertisement_to_proto,
    encrypted_share_from_proto,
    encrypted_share_to_proto,
    revealed_share_to_proto,
    task_from_proto,
)
from fedlora_server.aggregation import PlainRoundAggregation, SecureRoundAggregation
from fedlora_server.phases import Evaluation, Training, round_of
from fedlora_server.server import SERVICE_NAME, CoordinatorServer
from fedlora_worker.secagg_session import WorkerSession
from tests.seeds import derived, replay_hint
from tests.server.conftest import MANIFEST, WORKERS, initial_vector, run_settings, token_of
from tests.server.fuzz_cases import (
    ACTORS,
    CASES,
    CHUNK,
    EXAMPLES_PER_RPC,
    MAX_UPDATE,
    OK,
    PRECISE,
    RUN,
    STRANGER,
    Case,
    Code,
    Material,
    Moment,
    metadata_of,
    plan_of,
    right_upload,
)


def _code(call: Callable[[], object]) -> Code:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return OK


class Fuzzer:
    """Sends cases on one raw channel (bytes in, bytes out) and checks each answer and the state after it.

    Each search at a moment draws from a seed derived from the run's (`seed`), so the same seed sends the
    same cases; `digest` fingerprints them (their shape: key material is fresh each run).
    """

    def __init__(self, server: CoordinatorServer, *, seed: int) -> None:
        self.server = server
        self.seed = seed
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        self._cases = hashlib.sha256()
        self._failure: str | None = None

    @property
    def digest(self) -> str:
        """A fingerprint of every case sent so far, in order: equal for two runs from one seed."""
        return self._cases.hexdigest()[:16]

    def close(self) -> None:
        self.channel.close()

    def _method(self, rpc: str) -> str:
        return f"/{SERVICE_NAME}/{rpc}"

    def send(self, case: Case) -> Code:
        raw: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
        if case.rpc == "UploadUpdate":
            call = self.channel.stream_unary(self._method(case.rpc), **raw)
            assert isinstance(case.request, tuple)
            return _code(lambda: call(iter(case.request), metadata=case.sender.metadata, timeout=10))
        if case.rpc == "DownloadGlobal":
            return self._download(case)
        unary = self.channel.unary_unary(self._method(case.rpc), **raw)
        return _code(lambda: unary(case.request, metadata=case.sender.metadata, timeout=10))

    def _download(self, case: Case) -> Code:
        assert isinstance(case.request, bytes)
        call: grpc.UnaryStreamMultiCallable[bytes, bytes] = self.channel.unary_stream(
            self._method(case.rpc), request_serializer=None, response_deserializer=None
        )
        stream = call(case.request, metadata=case.sender.metadata, timeout=10)
        try:
            if case.read == "all":
                for _ in stream:
                    pass
            elif case.read == "header":
                next(stream)
        except grpc.RpcError as exc:
            return exc.code()
        stream.cancel()
        code = stream.code()
        if code is Code.CANCELLED:  # we hung up on a stream the coordinator had opened: wait for its slot
            self._streams_released()
            return OK
        return code

    def _streams_released(self) -> None:
        guard = self.server._streams
        assert guard is not None
        deadline = time.monotonic() + 5
        while guard.open_streams() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert not guard.open_streams(), "a cancelled download kept its stream slot"

    def fuzz(self, moment: Moment, examples: int = EXAMPLES_PER_RPC) -> int:
        """Send cases at `moment`: each answered precisely, each leaving the state as it was. Returns how many."""
        before = state_of(self.server)
        sent = 0
        replay = replay_hint(self.seed)
        for name, strategy, count in plan_of(moment, examples):

            @seed(derived(self.seed, moment.label, name))
            @settings(
                max_examples=count,
                database=None,
                phases=(Phase.explicit, Phase.generate),
                suppress_health_check=list(HealthCheck),
                print_blob=False,  # the search replays from the run's seed, not from a blob
            )
            @given(case=strategy)
            def one(case: Case) -> None:
                nonlocal sent
                if self._failure is not None:
                    # Hypothesis runs a failing case again to report it, against a coordinator the first
                    # run may have changed: report what the first run found, not what the second did.
                    raise AssertionError(self._failure)
                self._cases.update(repr(_shape(case)).encode())
                code = self.send(case)
                sent += 1
                CASES[case.rpc] += 1
                failure = None
                if code not in PRECISE:
                    failure = f"{moment.label}: {case.rpc} {case.defects} answered {code.name}"
                elif code not in case.expect:
                    failure = (
                        f"{moment.label}: {case.rpc} from {case.sender.owner} as {case.sender.claim!r} with defects "
                        f"{case.defects}: answered {code.name}, expected {sorted(c.name for c in case.expect)}"
                    )
                elif (after := state_of(self.server)) != before:
                    changed = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys()}
                    failure = (
                        f"{moment.label}: {case.rpc} {case.defects} answered {code.name} and changed the state "
                        f"(before, after): { {k: v for k, v in changed.items() if v[0] != v[1]} }"
                    )
                if failure is not None:
                    self._failure = f"{failure} [{replay}]"
                    raise AssertionError(self._failure)

            one()
        return sent


def _shape(case: Case) -> tuple[object, ...]:
    """What the seed fixes of a case: all but the bytes of key material drawn by the code under test."""
    sizes = tuple(len(m) for m in case.request) if isinstance(case.request, tuple) else len(case.request)
    return (case.rpc, case.sender, case.defects, sorted(c.name for c in case.expect), case.read, sizes)


def state_of(server: CoordinatorServer) -> dict[str, Any]:
    """Everything a refused message must leave as it was."""
    machine = server.coordinator
    phase = machine.current_phase
    store = server._store
    state: dict[str, Any] = {
        "phase": phase.name,
        "round": round_of(phase),
        "joined": sorted(machine._joined),
        "uploading": sorted(machine._uploading),
        "excluded": {r: sorted(w) for r, w in machine._excluded.items()},
        "version": None if machine._versions.current is None else machine._versions.current.number,
        "rounds": [(r.round, r.attempt, r.status, r.failure) for r in store.rounds()],
        "uploads": [(r.round, r.attempt, len(store.uploads(r.round, r.attempt))) for r in store.rounds()],
        "metrics": [(m.round, m.worker_id, m.eval_loss) for r in range(3) for m in store.metrics(r)],
        "spool": sorted(p.name for p in (server._settings.state_dir / "spool").glob("*.part")),
    }
    if isinstance(phase, Evaluation):
        state["evaluated"] = sorted(phase.done)
    if isinstance(phase, Training):
        state["attempt"] = phase.record.attempt
        aggregation = phase.aggregation
        if isinstance(aggregation, SecureRoundAggregation):
            secure = aggregation._secure
            state["stage"] = secure.stage
            state["answered"] = [
                sorted(secure._advertised),
                sorted(secure._shares),
                sorted(secure._masked),
                sorted(secure._reveals),
            ]
            state["sum"] = hashlib.sha256(secure._sum.tobytes()).hexdigest()
        elif isinstance(aggregation, PlainRoundAggregation):
            accumulator = aggregation.accumulator
            state["done"] = sorted(aggregation._done)
            state["sum"] = hashlib.sha256(accumulator._sum.tobytes()).hexdigest()
            state["weight"] = accumulator._weight
    return state


# ---- the legitimate run between checkpoints -------------------------------------------------------


class Legit:
    """The real workers: raw wire calls that are right, and secure sessions that check what they receive."""

    def __init__(self, server: CoordinatorServer, identities: dict[str, KeyPair]) -> None:
        self.server = server
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.identities = identities
        self.sessions: dict[str, WorkerSession] = {}

    def close(self) -> None:
        self.channel.close()

    def join(self, worker: str) -> None:
        self.stub.Join(pb.JoinRequest(worker_id=worker, num_examples=100), metadata=metadata_of(worker))

    def poll(self, worker: str) -> pb.Task:
        return self.stub.PollTask(pb.PollTaskRequest(worker_id=worker, run_id=RUN), metadata=metadata_of(worker))

    def upload(self, worker: str, header: pb.UploadHeader, payload: bytes) -> None:
        messages = [pb.UploadMessage(header=header)] + [
            pb.UploadMessage(chunk=pb.Chunk(seq=i, data=bytes(c))) for i, c in enumerate(iter_chunks(payload, CHUNK))
        ]
        self.stub.UploadUpdate(iter(messages), metadata=metadata_of(worker))

    def report(self, worker: str, round_: int, version: int, loss: float) -> None:
        report = pb.MetricsReport(
            worker_id=worker, run_id=RUN, round=round_, version=version, eval_loss=loss, eval_tokens=50
        )
        self.stub.ReportMetrics(report, metadata=metadata_of(worker))

    def download(self, worker: str, version: int) -> np.ndarray:
        stream = self.stub.DownloadGlobal(
            pb.DownloadRequest(worker_id=worker, run_id=RUN, version=version), metadata=metadata_of(worker)
        )
        next(stream)
        return np.frombuffer(b"".join(m.chunk.data for m in stream), dtype=np.float32)


def _secure_settings(tmp_path: Path, identities: dict[str, KeyPair]) -> Any:
    workers = [
        {
            "id": w,
            "token_sha256": hashlib.sha256(token_of(w).encode()).hexdigest(),
            "identity_public": identities[w].public.hex(),
        }
        for w in ACTORS
    ]
    return run_settings(
        tmp_path,
        rounds=1,
        workers=workers,
        secure_aggregation={"enabled": True, "clip_range": 1.0},
        limits={"chunk_bytes": CHUNK, "max_update_bytes": MAX_UPDATE},
    )


def _deltas() -> dict[str, np.ndarray]:
    return {
        w: np.random.default_rng(i).normal(0, 0.01, MANIFEST.numel).astype(np.float32) for i, w in enumerate(WORKERS)
    }


def _stage(moment: Moment, stage: str, members: Sequence[str], answered: Sequence[str], label: str) -> Moment:
    return replace(moment, label=label, stage=stage, members=frozenset(members), answered=frozenset(answered))


def test_every_rpc_of_a_secure_run_refuses_bad_input_precisely_and_the_run_still_commits_the_mean(
    tmp_path: Path, fuzz_seed: int
) -> None:
    # Prepare: a secure run of one round, four allow-listed workers of which three take part.
    print(f"secure run: FEDLORA_FUZZ_SEED={fuzz_seed}")
    identities = {w: identity_keypair() for w in ACTORS}
    peers = {w: k.public for w, k in identities.items()}
    deltas = _deltas()
    sent = 0
    with CoordinatorServer(settings=_secure_settings(tmp_path, identities)) as server:
        fuzzer, legit = Fuzzer(server, seed=fuzz_seed), Legit(server, identities)
        try:
            # Execute: admission, with one worker in.
            legit.join("clinical")
            moment = Moment("admission", "admission", frozenset({"clinical"}), material=Material())
            sent += fuzzer.fuzz(moment)
            legit.join("finance")
            legit.join("legal")

            # initialize: clinical (first by name) builds the initial model.
            assert legit.poll("clinical").kind == pb.TASK_KIND_INITIALIZE
            joined = frozenset(WORKERS)
            moment = Moment("initialize", "initialize", joined, members=frozenset({"clinical"}))
            sent += fuzzer.fuzz(moment)
            header, payload = right_upload(moment, "clinical")
            legit.upload("clinical", header, payload)

            # evaluation of version 0, one report in.
            legit.report("clinical", 0, 0, 3.0)
            moment = Moment(
                "evaluate-0", "evaluate", joined, version=0, members=joined, answered=frozenset({"clinical"})
            )
            sent += fuzzer.fuzz(moment)
            legit.report("finance", 0, 0, 3.0)
            legit.report("legal", 0, 0, 3.0)

            # round 1, secure: advertise with one worker's keys in.
            task = task_from_proto(legit.poll("clinical"), run_id=RUN)
            assert task.secagg is not None
            params = task.secagg.params
            stale = replace(params, tag=params.tag + 1)
            material = Material()
            for w in WORKERS:
                legit.sessions[w] = WorkerSession(
                    worker_id=w, params=params, identity_private=identities[w].private, peer_identities=peers
                )
                other = WorkerSession(
                    worker_id=w, params=stale, identity_private=identities[w].private, peer_identities=peers
                )
                material.stale_ads[w] = advertisement_to_proto(other.advertise())
            ads = {w: advertisement_to_proto(legit.sessions[w].advertise()) for w in WORKERS}
            material.stale_ads[STRANGER] = material.stale_ads["clinical"]

            def advertise(w: str) -> None:
                legit.stub.AdvertiseKeys(
                    pb.AdvertiseKeysRequest(worker_id=w, run_id=RUN, tag=params.tag, keys=ads[w]),
                    metadata=metadata_of(w),
                )
                material.ads[w] = ads[w]

            advertise("legal")
            moment = Moment(
                "advertise",
                "advertise",
                joined,
                round=1,
                tag=params.tag,
                version=0,
                members=frozenset(WORKERS),
                answered=frozenset({"legal"}),
                material=material,
            )
            # The real advertisements of workers yet to send them are broken by every case that carries them.
            material.ads.update({w: ads[w] for w in WORKERS})
            sent += fuzzer.fuzz(moment)
            advertise("clinical")
            advertise("finance")

            # share: one worker's sealed shares in.
            roster_task = task_from_proto(legit.poll("clinical"), run_id=RUN)
            assert roster_task.secagg is not None
            roster = [advertisement_from_proto(advertisement_to_proto(a)) for a in roster_task.secagg.roster]
            shares = {w: [encrypted_share_to_proto(s) for s in legit.sessions[w].share_keys(roster)] for w in WORKERS}

            def share(w: str) -> None:
                legit.stub.ShareKeys(
                    pb.ShareKeysRequest(worker_id=w, run_id=RUN, tag=params.tag, shares=shares[w]),
                    metadata=metadata_of(w),
                )

            share("finance")
            material.shares.update(shares)
            sent += fuzzer.fuzz(_stage(moment, "share", WORKERS, ["finance"], "share"))
            share("clinical")
            share("legal")

            # masked upload: one worker's masked update in.
            masked: dict[str, bytes] = {}
            for w in WORKERS:
                masked_task = legit.poll(w)
                assert masked_task.kind == pb.TASK_KIND_SECAGG_MASKED_UPLOAD
                inbox = [encrypted_share_from_proto(s) for s in masked_task.secagg.inbox]
                q = quantize(
                    deltas[w] * np.float32(100 / params.max_examples),
                    clip=params.clip_range,
                    bits=params.bits,
                    rng=np.random.default_rng(1),
                )
                encoded = np.concatenate([q, np.array([100], dtype=np.uint32)])
                masked[w] = legit.sessions[w].mask(inbox, tuple(masked_task.secagg.survivors), encoded).tobytes()
            material.masked.update(masked)
            masked_moment = _stage(moment, "upload", WORKERS, ["clinical"], "masked")
            legit.upload("clinical", *right_upload(masked_moment, "clinical"))
            sent += fuzzer.fuzz(masked_moment, examples=3 * EXAMPLES_PER_RPC)
            for w in ("finance", "legal"):
                legit.upload(w, *right_upload(masked_moment, w))

            # unmask: one worker's reveal in.
            revealed = {}
            for w in WORKERS:
                unmask = legit.poll(w)
                assert unmask.kind == pb.TASK_KIND_SECAGG_UNMASK
                revealed[w] = [
                    revealed_share_to_proto(r)
                    for r in legit.sessions[w].reveal(tuple(unmask.secagg.survivors), tuple(unmask.secagg.dropped))
                ]

            def reveal(w: str) -> None:
                legit.stub.RevealShares(
                    pb.RevealSharesRequest(worker_id=w, run_id=RUN, tag=params.tag, shares=revealed[w]),
                    metadata=metadata_of(w),
                )

            reveal("legal")
            material.reveals.update(revealed)
            sent += fuzzer.fuzz(_stage(moment, "unmask", WORKERS, ["legal"], "unmask"))
            reveal("clinical")
            reveal("finance")

            # evaluation of version 1, then the finished run.
            committed = legit.download("legal", 1)
            legit.report("finance", 1, 1, 2.0)
            moment = Moment(
                "evaluate-1",
                "evaluate",
                joined,
                round=1,
                version=1,
                members=joined,
                answered=frozenset({"finance"}),
                material=material,
            )
            sent += fuzzer.fuzz(moment)
            legit.report("clinical", 1, 1, 2.0)
            legit.report("legal", 1, 1, 2.0)
            assert server.wait_finished()
            moment = Moment("finished", "finished", joined, round=1, version=1, material=material)
            sent += fuzzer.fuzz(moment)
            records = server._store.rounds()
            digest = fuzzer.digest
        finally:
            fuzzer.close()
            legit.close()

    # Assert: the round committed the mean of the three real updates, first time, nothing dropped.
    expected_model = initial_vector() + np.mean([deltas[w] for w in WORKERS], axis=0)
    step = float(dequantize_sum(np.array([1], dtype=np.uint32), clip=params.clip_range, bits=params.bits)[0])
    assert np.abs(committed - expected_model).max() <= 3 * step * params.max_examples / 300 + 1e-7
    assert [(r.round, r.attempt, r.status, r.dropped) for r in records] == [
        (0, 0, "completed", ()),
        (1, 1, "completed", ()),
    ]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["base_eval_loss"] == 3.0
    assert report["rounds"][0]["eval_loss"] == 2.0
    print(f"secure run: {sent} fuzz cases (digest {digest}), by method {dict(sorted(CASES.items()))}")
    assert sent >= 1000


def test_every_rpc_of_a_plain_run_refuses_bad_input_precisely_and_the_accumulator_holds_each_update_once(
    tmp_path: Path, fuzz_seed: int
) -> None:
    # Prepare: a plain (float) run of one round.
    print(f"plain run: FEDLORA_FUZZ_SEED={fuzz_seed}")
    identities = {w: identity_keypair() for w in ACTORS}
    workers = [{"id": w, "token_sha256": hashlib.sha256(token_of(w).encode()).hexdigest()} for w in ACTORS]
    settings = run_settings(
        tmp_path, rounds=1, workers=workers, limits={"chunk_bytes": CHUNK, "max_update_bytes": MAX_UPDATE}
    )
    deltas = _deltas()
    examples = {"clinical": 100, "finance": 300, "legal": 600}
    sent = 0
    with CoordinatorServer(settings=settings) as server:
        fuzzer, legit = Fuzzer(server, seed=fuzz_seed), Legit(server, identities)
        try:
            for w in WORKERS:
                legit.join(w)
            legit.upload("clinical", *right_upload(Moment("init", "initialize", frozenset(WORKERS)), "clinical"))
            for w in WORKERS:
                legit.report(w, 0, 0, 3.0)
            material = Material(deltas={w: deltas[w].tobytes() for w in WORKERS})
            moment = Moment(
                "train",
                "upload",
                frozenset(WORKERS),
                round=1,
                version=0,
                members=frozenset(WORKERS),
                answered=frozenset({"legal"}),
                material=material,
                secure=False,
            )

            def upload(w: str) -> None:
                header, payload = right_upload(moment, w)
                header.num_examples = examples[w]
                legit.upload(w, header, payload)

            # Execute: one update in, then fuzz, then the rest.
            upload("legal")
            sent += fuzzer.fuzz(moment, examples=2 * EXAMPLES_PER_RPC)
            upload("clinical")
            upload("finance")
            committed = legit.download("finance", 1)
            sent += fuzzer.fuzz(
                Moment(
                    "evaluate-1",
                    "evaluate",
                    frozenset(WORKERS),
                    round=1,
                    version=1,
                    members=frozenset(WORKERS),
                    material=material,
                    secure=False,
                )
            )
            for w in WORKERS:
                legit.report(w, 1, 1, 2.0)
            assert server.wait_finished()
            uploads = server._store.uploads(1, 1)
            received = server.registry.get_sample_value("fedlora_received_bytes_total")
            digest = fuzzer.digest
        finally:
            fuzzer.close()
            legit.close()

    # Assert: the example-weighted mean of the three updates, each counted once.
    weights = np.array([examples[w] for w in WORKERS], dtype=np.float64)
    mean = np.average([deltas[w] for w in WORKERS], axis=0, weights=weights)
    np.testing.assert_allclose(committed, initial_vector() + mean, rtol=0, atol=1e-6)
    assert sorted((u.worker_id, u.num_examples, u.size_bytes) for u in uploads) == [
        (w, examples[w], MANIFEST.numel * 4) for w in WORKERS
    ]
    assert received is not None
    assert received >= 3 * MANIFEST.numel * 4
    print(f"plain run: {sent} fuzz cases (digest {digest})")
    assert sent >= 300
