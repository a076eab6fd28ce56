"""A secure round over the real wire: refusals get precise statuses and the round still completes."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_common.secagg import KeyPair, dequantize_sum, identity_keypair, quantize
from fedlora_common.serde import (
    advertisement_from_proto,
    advertisement_to_proto,
    encrypted_share_from_proto,
    encrypted_share_to_proto,
    revealed_share_to_proto,
    task_from_proto,
)
from fedlora_server.server import CoordinatorServer
from fedlora_worker.secagg_session import WorkerSession
from tests.server.conftest import MANIFEST, WORKERS, connect, initial_vector, run_settings, start_round_one


def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def _secure_settings(tmp_path: Path, identities: dict[str, KeyPair]) -> Any:
    settings = run_settings(tmp_path, rounds=1)
    workers = [
        {"id": w.id, "token_sha256": w.token_sha256, "identity_public": identities[w.id].public.hex()}
        for w in settings.workers
    ]
    return run_settings(tmp_path, rounds=1, workers=workers, secure_aggregation={"enabled": True, "clip_range": 1.0})


def test_a_secure_round_refuses_bad_messages_precisely_and_still_commits_the_mean(tmp_path: Path) -> None:
    identities = {w: identity_keypair() for w in WORKERS}
    peers = {w: k.public for w, k in identities.items()}
    deltas = {
        w: np.random.default_rng(i).normal(0, 0.01, MANIFEST.numel).astype(np.float32) for i, w in enumerate(WORKERS)
    }
    with CoordinatorServer(settings=_secure_settings(tmp_path, identities)) as server, connect(server) as wire:
        start_round_one(wire)
        task = task_from_proto(wire.poll("clinical"), run_id="test-run")
        assert task.secagg is not None
        params = task.secagg.params
        sessions = {
            w: WorkerSession(worker_id=w, params=params, identity_private=identities[w].private, peer_identities=peers)
            for w in WORKERS
        }
        vectors = {}
        for w in WORKERS:
            weight = 100
            q = quantize(
                deltas[w] * np.float32(weight / params.max_examples),
                clip=params.clip_range,
                bits=params.bits,
                rng=np.random.default_rng(1),
            )
            vectors[w] = np.concatenate([q, np.array([weight], dtype=np.uint32)])

        def advertise(worker: str, ad: pb.Advertisement, tag: int = params.tag) -> Any:
            return wire.stub.AdvertiseKeys(
                pb.AdvertiseKeysRequest(worker_id=worker, run_id="test-run", tag=tag, keys=ad), metadata=wire.md(worker)
            )

        ads = {w: advertisement_to_proto(sessions[w].advertise()) for w in WORKERS}
        assert (
            _code(lambda: advertise("clinical", ads["clinical"], tag=params.tag - 1))
            == grpc.StatusCode.FAILED_PRECONDITION
        )
        forged = pb.Advertisement()
        forged.CopyFrom(ads["legal"])
        forged.mask_public = ads["finance"].mask_public
        assert _code(lambda: advertise("legal", forged)) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: advertise("clinical", ads["legal"])) == grpc.StatusCode.PERMISSION_DENIED
        for w in WORKERS:
            advertise(w, ads[w])
        assert _code(lambda: advertise("clinical", ads["clinical"])) == grpc.StatusCode.FAILED_PRECONDITION

        roster_task = task_from_proto(wire.poll("clinical"), run_id="test-run")
        assert roster_task.secagg is not None
        roster = [advertisement_from_proto(advertisement_to_proto(a)) for a in roster_task.secagg.roster]
        shares = {w: sessions[w].share_keys(roster) for w in WORKERS}

        def share(worker: str, items: list[Any]) -> Any:
            return wire.stub.ShareKeys(
                pb.ShareKeysRequest(
                    worker_id=worker,
                    run_id="test-run",
                    tag=params.tag,
                    shares=[encrypted_share_to_proto(s) for s in items],
                ),
                metadata=wire.md(worker),
            )

        assert _code(lambda: share("clinical", shares["clinical"][:1])) == grpc.StatusCode.INVALID_ARGUMENT
        assert _code(lambda: share("clinical", shares["legal"])) == grpc.StatusCode.PERMISSION_DENIED
        for w in WORKERS:
            share(w, shares[w])

        def masked_upload(worker: str, vector: np.ndarray) -> Any:
            return wire.upload(
                worker,
                vector.view(np.float32),
                round_=1,
                kind=pb.UPLOAD_KIND_MASKED,
                header_changes={"dtype": "uint32", "tag": params.tag},
            )

        for w in WORKERS:
            masked_task = wire.poll(w)
            assert masked_task.kind == pb.TASK_KIND_SECAGG_MASKED_UPLOAD
            inbox = [encrypted_share_from_proto(s) for s in masked_task.secagg.inbox]
            masked = sessions[w].mask(inbox, tuple(masked_task.secagg.survivors), vectors[w])
            assert _code(partial(masked_upload, w, masked[:-2])) == grpc.StatusCode.INVALID_ARGUMENT
            masked_upload(w, masked)

        for w in WORKERS:
            unmask = wire.poll(w)
            assert unmask.kind == pb.TASK_KIND_SECAGG_UNMASK
            reveals = sessions[w].reveal(tuple(unmask.secagg.survivors), tuple(unmask.secagg.dropped))
            wire.stub.RevealShares(
                pb.RevealSharesRequest(
                    worker_id=w, run_id="test-run", tag=params.tag, shares=[revealed_share_to_proto(r) for r in reveals]
                ),
                metadata=wire.md(w),
            )

        _, payload = wire.download("legal", 1)
        committed = np.frombuffer(payload, dtype=np.float32)
        expected = initial_vector() + np.mean([deltas[w] for w in WORKERS], axis=0)
        step = float(dequantize_sum(np.array([1], dtype=np.uint32), clip=params.clip_range, bits=params.bits)[0])
        bound = 3 * step * params.max_examples / 300
        assert np.abs(committed - expected).max() <= bound + 1e-7
        record = [r for r in server._store.rounds() if r.round == 1][-1]
        assert record.dropped == ()
