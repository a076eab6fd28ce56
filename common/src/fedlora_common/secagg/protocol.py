"""Messages and parameters of the secure-aggregation protocol (Bonawitz et al., CCS 2017).

Both stage machines (the worker's session, the coordinator's round) speak these; nothing
here touches the network. A round attempt is identified by its `tag`, so that a message
from another round or attempt can never be taken for one of this attempt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Advertisement",
    "Complaint",
    "EncryptedShare",
    "RevealedShare",
    "SecAggParams",
    "ShareKind",
    "StageError",
    "round_tag",
]

ShareKind = Literal["self_seed", "mask_key"]


class StageError(Exception):
    """A protocol step asked for out of order, or with inputs the protocol forbids."""


def round_tag(round_: int, attempt: int) -> int:
    """One integer naming a round attempt: what keys are signed for and shares are bound to."""
    return round_ * 2**16 + attempt


@dataclass(frozen=True)
class SecAggParams:
    """Fixed for one round attempt and known to every participant."""

    run_id: str
    tag: int
    participants: tuple[str, ...]
    threshold: int
    bits: int
    clip_range: float
    max_examples: int
    noise_variance: float = 0.0
    """Skellam noise each worker adds to its quantized update (distributed DP); 0 = none."""

    def __post_init__(self) -> None:
        n = len(self.participants)
        if not 2 <= self.threshold <= n:
            raise ValueError(f"threshold {self.threshold} must lie in [2, {n}]")
        if len(set(self.participants)) != n:
            raise ValueError("participants must be unique")

    @staticmethod
    def threshold_for(n: int, fraction: float) -> int:
        return min(n, max(2, math.ceil(fraction * n)))


@dataclass(frozen=True)
class Advertisement:
    """A worker's two public keys for one round attempt, signed with its long-term identity key."""

    worker_id: str
    mask_public: bytes
    enc_public: bytes
    signature: bytes
    seed_commitment: bytes
    """Commitment to the self-mask seed (fedlora_common.secagg.seed_commitment), signed with the keys."""


@dataclass(frozen=True)
class EncryptedShare:
    """Shares of the sender's self-mask seed and mask private key, sealed to one recipient."""

    sender: str
    recipient: str
    ciphertext: bytes


@dataclass(frozen=True)
class RevealedShare:
    """What a survivor reveals about one peer in the unmasking stage."""

    owner: str
    kind: ShareKind
    share: bytes


@dataclass(frozen=True)
class Complaint:
    """A worker's proof that the sealed shares of `accused` to it do not open: its encryption key of the attempt.

    With it the coordinator opens those shares itself and learns who is at fault. The key opens every share
    sealed to or by this worker in this attempt, so the attempt is abandoned and its keys never used again."""

    accused: tuple[str, ...]
    enc_private: bytes
