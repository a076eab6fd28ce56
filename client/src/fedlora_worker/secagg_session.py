"""The worker's side of secure aggregation for one round attempt: a stage machine over keys and shares.

new -> advertised -> shared -> masked -> revealed. Each step checks what the coordinator
relayed: peers' keys are signed by identities this site knows (not by what the coordinator
says), shares are addressed to this worker and bound to the session, and no peer's self-mask
seed and mask key are ever both revealed. The session decides which masks an update gets
(`mask_seeds`); adding them is the protection pipeline's last step (`fedlora_worker.protect.mask`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from fedlora_common.secagg import (
    Advertisement,
    Complaint,
    EncryptedShare,
    RevealedShare,
    SecAggParams,
    Share,
    StageError,
    agree,
    new_x25519,
    open_share_pair,
    pairwise_sign,
    round_keys_message,
    seal_share_pair,
    seed_commitment,
    session_id,
    share_associated_data,
    sign,
    split_secret,
    verify,
)
from fedlora_worker.protect import MaskSeeds, mask

__all__ = ["UnopenableShares", "WorkerSession"]

Stage = Literal["new", "advertised", "shared", "masked", "revealed", "complained"]


class UnopenableShares(StageError):
    """Sealed shares from these senders did not open (or did not hold this worker's shares): complain, with proof."""

    def __init__(self, senders: Sequence[str]) -> None:
        super().__init__(f"the sealed shares from {', '.join(senders)} do not open: altered, replayed or misaddressed")
        self.senders = tuple(senders)


class WorkerSession:
    def __init__(
        self,
        *,
        worker_id: str,
        params: SecAggParams,
        identity_private: bytes,
        peer_identities: Mapping[str, bytes],
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if worker_id not in params.participants:
            raise StageError(f"{worker_id} is not a participant of this round")
        self.worker_id = worker_id
        self.params = params
        self.stage: Stage = "new"
        self._identity = identity_private
        self._peers = dict(peer_identities)
        self._random = random_bytes
        self._mask_keys = new_x25519()
        self._enc_keys = new_x25519()
        self._self_seed = random_bytes(32)
        self._roster: dict[str, Advertisement] = {}
        self._index: dict[str, int] = {}
        self._session = b""
        self._own_shares: tuple[Share, Share] | None = None
        self._held: dict[str, tuple[Share, Share]] = {}
        self._survivors: frozenset[str] = frozenset()

    def _expect(self, stage: Stage, step: str) -> None:
        if self.stage != stage:
            raise StageError(f"cannot {step} in stage {self.stage!r} (needs {stage!r})")

    def advertise(self) -> Advertisement:
        self._expect("new", "advertise keys")
        commitment = seed_commitment(self._self_seed)
        message = round_keys_message(
            self.worker_id,
            self.params.run_id,
            self.params.tag,
            self._mask_keys.public,
            self._enc_keys.public,
            commitment,
        )
        self.stage = "advertised"
        return Advertisement(
            self.worker_id, self._mask_keys.public, self._enc_keys.public, sign(self._identity, message), commitment
        )

    def share_keys(self, roster: Sequence[Advertisement]) -> list[EncryptedShare]:
        """Check every advertised key against its owner's identity, then seal shares to each peer."""
        self._expect("advertised", "share keys")
        by_id = {a.worker_id: a for a in roster}
        if len(by_id) != len(roster):
            raise StageError("the roster names a worker twice")
        for ad in roster:
            identity = self._peers.get(ad.worker_id)
            if identity is None or ad.worker_id not in self.params.participants:
                raise StageError(f"unknown key: {ad.worker_id} is not on this site's allow-list for the round")
            message = round_keys_message(
                ad.worker_id, self.params.run_id, self.params.tag, ad.mask_public, ad.enc_public, ad.seed_commitment
            )
            if not verify(identity, message, ad.signature):
                raise StageError(f"bad signature on the keys of {ad.worker_id}: keys were swapped or forged")
        mine = by_id.get(self.worker_id)
        if mine is None or (mine.mask_public, mine.enc_public) != (self._mask_keys.public, self._enc_keys.public):
            raise StageError("the roster does not carry this worker's own keys")
        if len(roster) < self.params.threshold:
            raise StageError(f"{len(roster)} workers advertised keys; the threshold is {self.params.threshold}")
        self._roster = by_id
        self._index = {wid: i + 1 for i, wid in enumerate(sorted(by_id))}
        self._session = session_id(
            self.params.run_id, self.params.tag, {w: (a.mask_public, a.enc_public) for w, a in by_id.items()}
        )
        n, t = len(by_id), self.params.threshold
        seed_shares = split_secret(self._self_seed, threshold=t, shares=n, random_bytes=self._random)
        key_shares = split_secret(self._mask_keys.private, threshold=t, shares=n, random_bytes=self._random)
        out = []
        for peer, index in self._index.items():
            pair = (seed_shares[index - 1], key_shares[index - 1])
            if peer == self.worker_id:
                self._own_shares = pair
                continue
            key = agree(self._enc_keys.private, by_id[peer].enc_public, session=self._session, purpose=b"shares")
            sealed = seal_share_pair(
                key,
                *pair,
                associated_data=share_associated_data(self.worker_id, peer, self.params.tag, self._session),
                random_bytes=self._random,
            )
            out.append(EncryptedShare(self.worker_id, peer, sealed))
        self.stage = "shared"
        return out

    def mask_seeds(self, inbox: Sequence[EncryptedShare], survivors: Sequence[str]) -> MaskSeeds:
        """Open the shares peers sealed to this worker, then derive the masks the survivors' sum cancels."""
        self._expect("shared", "mask the update")
        alive = frozenset(survivors)
        if self.worker_id not in alive or not alive <= self._roster.keys():
            raise StageError("the masking set must contain this worker and only workers that advertised keys")
        if len(alive) < self.params.threshold:
            raise StageError(f"{len(alive)} workers shared keys; the threshold is {self.params.threshold}")
        unopenable = []
        for item in inbox:
            if item.recipient != self.worker_id:
                raise StageError(f"a share addressed to {item.recipient} was delivered to {self.worker_id}")
            sender = self._roster.get(item.sender)
            if sender is None or item.sender == self.worker_id:
                raise StageError(f"a share from {item.sender}, which is not a peer in this session")
            pair = self._open(item, sender)
            if pair is None:
                unopenable.append(item.sender)
            else:
                self._held[item.sender] = pair
        if unopenable:
            raise UnopenableShares(sorted(unopenable))
        missing = sorted(alive - self._held.keys() - {self.worker_id})
        if missing:
            raise StageError(f"no shares from {', '.join(missing)}, which the coordinator counts as survivors")
        me = self._index[self.worker_id]
        pairwise = [
            (
                agree(self._mask_keys.private, self._roster[peer].mask_public, session=self._session, purpose=b"mask"),
                pairwise_sign(me, self._index[peer]),
            )
            for peer in sorted(alive - {self.worker_id})
        ]
        self._survivors = alive
        self.stage = "masked"
        return MaskSeeds(self._self_seed, tuple(pairwise))

    def _open(self, item: EncryptedShare, sender: Advertisement) -> tuple[Share, Share] | None:
        """The two shares `sender` sealed to this worker, or None if they do not open or are not at its index."""
        key = agree(self._enc_keys.private, sender.enc_public, session=self._session, purpose=b"shares")
        try:
            pair = open_share_pair(
                key,
                item.ciphertext,
                associated_data=share_associated_data(item.sender, self.worker_id, self.params.tag, self._session),
            )
        except ValueError:
            return None
        me = self._index[self.worker_id]
        return pair if all(share.x == me for share in pair) else None

    def complain(self, accused: Sequence[str]) -> Complaint:
        """The proof that the shares of `accused` do not open: this attempt's encryption key, which ends the session
        (it opens every share sealed to or by this worker, so nothing masked under these keys may follow)."""
        self._expect("shared", "complain of shares")
        self.stage = "complained"
        return Complaint(tuple(accused), self._enc_keys.private)

    def mask(
        self, inbox: Sequence[EncryptedShare], survivors: Sequence[str], encoded: npt.NDArray[np.uint32]
    ) -> npt.NDArray[np.uint32]:
        """`mask_seeds` and the pipeline's mask step in one call, as the coordinator's protocol tests drive it."""
        return mask(encoded, self.mask_seeds(inbox, survivors))

    def reveal(self, survivors: Sequence[str], dropped: Sequence[str]) -> list[RevealedShare]:
        """Self-seed shares of survivors, mask-key shares of dropped workers; never both for one peer."""
        self._expect("masked", "reveal shares")
        alive, gone = frozenset(survivors), frozenset(dropped)
        if alive & gone:
            raise StageError(f"asked for both shares of {', '.join(sorted(alive & gone))}: refused")
        if self.worker_id not in alive or not (alive | gone) <= self._survivors:
            raise StageError("survivors and dropped workers must come from this worker's masking set")
        if len(alive) < self.params.threshold:
            raise StageError(
                f"{len(alive)} survivors; revealing below the threshold {self.params.threshold} is refused"
            )
        assert self._own_shares is not None
        held = {**self._held, self.worker_id: self._own_shares}
        out = [RevealedShare(peer, "self_seed", held[peer][0].to_bytes()) for peer in sorted(alive)]
        out += [RevealedShare(peer, "mask_key", held[peer][1].to_bytes()) for peer in sorted(gone)]
        self.stage = "revealed"
        return out
