"""A worker's side of secure aggregation, stage by stage: advertise keys, share them, upload the masked update
(or complain of shares that cannot be opened), reveal what unmasks the sum.

The daemon holds one `SecureSteps`: `begin` once this round's update is encoded (everything up to the mask),
`step` for each secure-aggregation task. What the site keeps between the stages of one round attempt lives here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
import structlog

from fedlora_common.messages import RunSpec, Task, TaskKind
from fedlora_common.secagg import SecAggParams, StageError
from fedlora_worker import protect
from fedlora_worker.coordinator import Coordinator
from fedlora_worker.secagg_session import UnopenableShares, WorkerSession

__all__ = ["MaskedUpload", "SecureSteps"]

log = structlog.get_logger()


@dataclass(frozen=True)
class _SecureState:
    """What a worker keeps between the secure-aggregation stages of one round attempt."""

    session: WorkerSession
    encoded: npt.NDArray[np.uint32]
    loss: float


class MaskedUpload(Protocol):
    """Sends the masked update as the worker sends any update (its model's manifest, progress and byte counts)."""

    def __call__(self, spec: RunSpec, task: Task, masked: npt.NDArray[np.uint32], *, loss: float, tag: int) -> None: ...


class SecureSteps:
    """One site's secure-aggregation session per round attempt; a protocol violation abandons it."""

    def __init__(
        self,
        *,
        client: Coordinator,
        identity: Callable[[], bytes | None],
        peers: Mapping[str, str],
        idle: Callable[[float], bool],
        upload: MaskedUpload,
    ) -> None:
        """`identity` is read when a round begins (a worker without one fails only in a run that aggregates
        securely); `peers` maps worker id to identity public key (hex), the consortium's allow-list."""
        self._client = client
        self._identity = identity
        self._peers = peers
        self._idle = idle
        self._upload = upload
        self._state: _SecureState | None = None

    def begin(self, spec: RunSpec, params: SecAggParams, encoded: npt.NDArray[np.uint32], loss: float) -> None:
        """Keep the encoded update for the masking stage; advertise this round's keys."""
        identity = self._identity()
        if identity is None:
            raise StageError("this run aggregates securely but the worker has no identity_key")
        peers = {worker: bytes.fromhex(key) for worker, key in self._peers.items()}
        session = WorkerSession(
            worker_id=self._client.worker_id, params=params, identity_private=identity, peer_identities=peers
        )
        self._state = _SecureState(session, encoded, loss)
        self._client.advertise(spec.run_id, params.tag, session.advertise())
        log.info("keys_advertised", tag=params.tag, threshold=params.threshold)

    def step(self, spec: RunSpec, task: Task) -> None:
        """One secure-aggregation stage; a protocol violation abandons this round's session."""
        assert task.secagg is not None
        state, secagg = self._state, task.secagg
        if state is None or state.session.params.tag != secagg.params.tag:
            log.warning("no_session_for_round", tag=secagg.params.tag)
            self._idle(1.0)
            return
        tag = secagg.params.tag
        try:
            if task.kind is TaskKind.SECAGG_SHARE_KEYS:
                self._client.share_keys(spec.run_id, tag, state.session.share_keys(secagg.roster))
            elif task.kind is TaskKind.SECAGG_MASKED_UPLOAD:
                try:
                    seeds = state.session.mask_seeds(secagg.inbox, secagg.survivors)
                except UnopenableShares as exc:  # the sender is at fault, not this site: prove it
                    log.warning("shares_unopenable", tag=tag, senders=exc.senders)
                    self._client.complain(spec.run_id, tag, state.session.complain(exc.senders))
                    self._state = None
                    return
                masked = protect.mask(state.encoded, seeds)
                self._upload(spec, task, masked, loss=state.loss, tag=tag)
            elif task.kind is TaskKind.SECAGG_UNMASK:
                self._client.reveal(spec.run_id, tag, state.session.reveal(secagg.survivors, secagg.dropped))
                self._state = None
        except StageError as exc:
            log.error("secure_aggregation_refused", tag=tag, stage=task.kind.name, reason=str(exc))
            self._state = None
