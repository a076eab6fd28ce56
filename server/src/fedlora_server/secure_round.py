"""The coordinator's side of secure aggregation for one round attempt: a stage machine.

advertise -> share -> masked -> unmask -> done. The coordinator relays keys and sealed
shares it cannot open, adds masked vectors it cannot read, and learns only the sum of
the survivors' quantized updates (their example weights included) once at least
`threshold` survivors reveal their shares. Below the threshold at any stage the attempt
fails and nothing of it is kept.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from fedlora_common.secagg import (
    KEY_BYTES,
    SEALED_SHARE_BYTES,
    SEED_BYTES,
    Advertisement,
    Complaint,
    EncryptedShare,
    RevealedShare,
    SecAggParams,
    Share,
    ShareKind,
    agree,
    consistent,
    open_share_pair,
    pairwise_sign,
    recover_secret,
    round_keys_message,
    seed_commitment,
    session_id,
    share_associated_data,
    unmask_sum,
    verify,
    x25519_public_of,
)
from fedlora_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, PermissionDenied

__all__ = ["RoundFailed", "SecureRound", "SecureStage"]

SecureStage = Literal["advertise", "share", "masked", "unmask", "done", "failed"]
UNMASK_SLICE = 2**20


class RoundFailed(Exception):
    """The attempt is abandoned whole: too few workers remain, or the revealed shares do not add up.

    `offenders` names the workers whose shares were shown to be bad, when that can be told.
    """

    def __init__(self, message: str, *, offenders: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.offenders = offenders


class SecureRound:
    def __init__(self, *, params: SecAggParams, identities: Mapping[str, bytes], numel: int) -> None:
        self.params = params
        self.stage: SecureStage = "advertise"
        self._identities = dict(identities)
        self._numel = numel
        self._advertised: dict[str, Advertisement] = {}
        self._shares: dict[str, list[EncryptedShare]] = {}
        self._masked: set[str] = set()
        self._gone: set[str] = set()
        self._reveals: dict[str, list[tuple[str, ShareKind, Share]]] = {}
        self._index: dict[str, int] = {}
        self._sum = np.zeros(numel, dtype=np.uint32)
        self._sum_lock = threading.Lock()
        self._session = b""
        self.u1: tuple[str, ...] = ()
        self.u2: tuple[str, ...] = ()
        self.u3: tuple[str, ...] = ()
        self.faults: dict[str, str] = {}
        """Workers a complaint proved at fault in this attempt, and why; the attempt fails without them."""
        self.liars: dict[str, str] = {}
        """Revealers whose shares lay off the polynomial of a secret reconstructed without them, and why."""

    # ---- what each stage accepts ------------------------------------------------------

    def _expect(self, stage: SecureStage, worker: str, members: Sequence[str]) -> None:
        if self.stage != stage:
            raise FailedPrecondition(f"secure aggregation is in stage {self.stage!r}, not {stage!r}")
        if worker not in members:
            raise PermissionDenied(f"{worker} is not part of stage {stage!r} of this round")

    def advertise(self, ad: Advertisement) -> None:
        self._expect("advertise", ad.worker_id, self.params.participants)
        if ad.worker_id in self._advertised:
            raise AlreadyExists(f"{ad.worker_id} already advertised keys for this round")
        if len(ad.mask_public) != 32 or len(ad.enc_public) != 32:
            raise InvalidArgument("public keys must be 32-byte X25519 keys")
        if len(ad.seed_commitment) != 32:
            raise InvalidArgument("the self-seed commitment must be a 32-byte SHA-256 digest")
        message = round_keys_message(
            ad.worker_id, self.params.run_id, self.params.tag, ad.mask_public, ad.enc_public, ad.seed_commitment
        )
        if not verify(self._identities[ad.worker_id], message, ad.signature):
            raise PermissionDenied(
                f"the signature on {ad.worker_id}'s keys does not verify for this round: the site's identity_key "
                f"is not the key whose public half the run's allow-list holds for {ad.worker_id} (identity_public)"
            )
        self._advertised[ad.worker_id] = ad

    def roster(self) -> list[Advertisement]:
        if self.stage not in ("share", "masked", "unmask"):
            raise FailedPrecondition("the key roster is published when advertising closes")
        return [self._advertised[w] for w in self.u1]

    def submit_shares(self, worker: str, shares: Sequence[EncryptedShare]) -> None:
        self._expect("share", worker, self.u1)
        if worker in self._shares:
            raise AlreadyExists(f"{worker} already shared its keys")
        recipients = [s.recipient for s in shares]
        if any(s.sender != worker for s in shares):
            raise PermissionDenied(f"{worker} sent a share in another worker's name")
        if sorted(recipients) != sorted(set(self.u1) - {worker}):
            raise InvalidArgument("exactly one sealed share for every other worker that advertised keys is required")
        short = sorted(s.recipient for s in shares if len(s.ciphertext) != SEALED_SHARE_BYTES)
        if short:  # relayed, it would make its recipient drop out while the sender stayed above suspicion
            raise InvalidArgument(
                f"the sealed shares for {', '.join(short)} are not {SEALED_SHARE_BYTES} bytes: no recipient could open them"
            )
        self._shares[worker] = list(shares)

    def inbox(self, worker: str) -> list[EncryptedShare]:
        if self.stage not in ("masked", "unmask"):
            raise FailedPrecondition("shares are delivered once key sharing closes")
        if worker not in self.u2:
            raise PermissionDenied(f"{worker} did not share keys this round")
        return [s for sender in self.u2 for s in self._shares[sender] if s.recipient == worker]

    def add_masked(self, worker: str, masked: npt.NDArray[np.uint32], offset: int) -> None:
        """Add one slice of a masked upload as it arrives (wrapping in Z_2^32); thread-safe."""
        with self._sum_lock:
            self._expect("masked", worker, self.u2)
            if worker in self._masked:
                raise AlreadyExists(f"{worker} already uploaded its masked update")
            self._sum[offset : offset + masked.size] += masked

    def subtract_masked(self, masked: npt.NDArray[np.uint32], offset: int) -> None:
        """Take back a slice added by a stream that turned out bad: exact, since the sum is modular."""
        with self._sum_lock:
            self._sum[offset : offset + masked.size] -= masked

    def close_masked_upload(self, worker: str) -> None:
        self._expect("masked", worker, self.u2)
        if worker in self._masked:
            raise AlreadyExists(f"{worker} already uploaded its masked update")
        self._masked.add(worker)

    def check_masked_upload(self, worker: str, numel: int) -> None:
        self._expect("masked", worker, self.u2)
        if worker in self._masked:
            raise AlreadyExists(f"{worker} already uploaded its masked update")
        if numel != self._numel:
            raise InvalidArgument(f"a masked vector of {numel} elements; this round masks {self._numel}")

    def submit_reveal(self, worker: str, reveals: Sequence[RevealedShare]) -> None:
        self._expect("unmask", worker, self.u3)
        if worker in self._reveals:
            raise AlreadyExists(f"{worker} already revealed its shares")
        wanted = {(w, "self_seed") for w in self.u3} | {(w, "mask_key") for w in self.dropped}
        if {(r.owner, r.kind) for r in reveals} != wanted or len(reveals) != len(wanted):
            raise InvalidArgument(
                "reveal exactly the self-seed share of each survivor and the key share of each dropped worker"
            )
        try:
            parsed = [(r.owner, r.kind, Share.from_bytes(r.share)) for r in reveals]
        except ValueError as exc:
            raise InvalidArgument(f"a revealed share does not parse: {exc}") from None
        if any(share.x != self._index[worker] for _, _, share in parsed):
            raise InvalidArgument(f"{worker} revealed shares that are not the ones sealed to it")
        self._reveals[worker] = parsed

    def complain(self, worker: str, complaint: Complaint) -> None:
        """`worker` cannot open the shares of `complaint.accused`: open them with the key it shows and record who
        is at fault (`faults`): each sender whose share does not open, or `worker` itself for a share that does.
        The attempt fails either way: that key opens every share `worker` sealed, its own secrets' included."""
        self._expect("masked", worker, self.u2)
        if worker in self._masked:
            raise FailedPrecondition(f"{worker} already uploaded its masked update: it had opened its shares")
        accused = complaint.accused
        if not accused or len(set(accused)) != len(accused) or not set(accused) <= set(self.u2) - {worker}:
            raise InvalidArgument("a complaint names other workers whose sealed shares were delivered to the worker")
        try:
            shown = x25519_public_of(complaint.enc_private)
        except ValueError:
            raise InvalidArgument("the key shown is not an X25519 private key") from None
        if shown != self._advertised[worker].enc_public:
            raise InvalidArgument(f"the key shown is not the encryption key {worker} advertised for this attempt")
        for sender in accused:
            if self._opens(sender, worker, complaint.enc_private):
                self.faults.setdefault(worker, f"complained of {sender}'s sealed share, which opens")
            else:
                self.faults[sender] = f"sealed a share to {worker} that does not open"
        self.stage = "failed"

    def _opens(self, sender: str, recipient: str, enc_private: bytes) -> bool:
        """Whether the share `sender` sealed to `recipient` opens with the recipient's key and holds its shares."""
        sealed = next(s.ciphertext for s in self._shares[sender] if s.recipient == recipient)
        key = agree(enc_private, self._advertised[sender].enc_public, session=self._session, purpose=b"shares")
        try:
            pair = open_share_pair(
                key, sealed, associated_data=share_associated_data(sender, recipient, self.params.tag, self._session)
            )
        except ValueError:
            return False
        return all(share.x == self._index[recipient] for share in pair)

    def has_advertised(self, worker: str) -> bool:
        return worker in self._advertised

    def has_shared(self, worker: str) -> bool:
        return worker in self._shares

    def has_masked(self, worker: str) -> bool:
        return worker in self._masked

    def has_revealed(self, worker: str) -> bool:
        return worker in self._reveals

    # ---- closing stages ---------------------------------------------------------------

    @property
    def dropped(self) -> tuple[str, ...]:
        return tuple(w for w in self.u2 if w not in self.u3)

    def _enough(self, present: Sequence[str], stage: str) -> tuple[str, ...]:
        if len(present) < self.params.threshold:
            self.stage = "failed"
            raise RoundFailed(f"{len(present)} workers completed {stage}; the threshold is {self.params.threshold}")
        return tuple(sorted(present))

    def close_advertise(self) -> None:
        self.u1 = self._enough(list(self._advertised), "advertising")
        self._index = {w: i + 1 for i, w in enumerate(self.u1)}
        self._session = session_id(
            self.params.run_id,
            self.params.tag,
            {w: (self._advertised[w].mask_public, self._advertised[w].enc_public) for w in self.u1},
        )
        self.stage = "share"

    def close_share(self) -> None:
        self.u2 = self._enough(list(self._shares), "key sharing")
        self.stage = "masked"

    def close_masked(self) -> None:
        self.u3 = self._enough(list(self._masked), "the masked upload")
        self.stage = "unmask"

    def drop(self, worker: str) -> None:
        """`worker` left the run: stages stop waiting for it; without its answer it drops out where it is."""
        self._gone.add(worker)

    def ready(self) -> bool:
        """Whether each stage's members still in the run all answered (stages also close on deadlines)."""
        waiting = {
            "advertise": set(self.params.participants) - self._advertised.keys(),
            "share": set(self.u1) - self._shares.keys(),
            "masked": set(self.u2) - self._masked,
            "unmask": set(self.u3) - self._reveals.keys(),
        }.get(self.stage, set())
        return not waiting - self._gone

    def _committed_seed_of(self, owner: str) -> Callable[[bytes], bool]:
        """Whether a reconstructed self-mask seed is the one `owner` committed to with its keys."""
        commitment = self._advertised[owner].seed_commitment
        return lambda seed: len(seed) == SEED_BYTES and seed_commitment(seed) == commitment

    def _advertised_key_of(self, owner: str) -> Callable[[bytes], bool]:
        """Whether a reconstructed mask key is the private half of the key `owner` advertised."""
        advertised = self._advertised[owner].mask_public
        return lambda key: len(key) == KEY_BYTES and x25519_public_of(key) == advertised

    def _reconstruct(
        self, owner: str, kind: str, revealed: list[tuple[str, Share]], valid: Callable[[bytes], bool]
    ) -> bytes:
        """The secret the revealed shares give, from any `threshold` of them consistent with what `owner`
        committed to; revealers of shares off its polynomial are added to `liars`. RoundFailed naming whoever
        broke it, if that can be told, when no `threshold` shares agree on the committed secret."""
        t = self.params.threshold
        shares = [share for _, share in revealed]
        try:
            recovered = recover_secret(shares, threshold=t, valid=valid)
        except ValueError:
            self.stage = "failed"
            # Every revealer agrees (and there is a share to spare, so agreeing means something): the owner
            # dealt shares of something else.
            if len(shares) > t and consistent(shares, threshold=t):
                raise RoundFailed(
                    f"the {kind} of {owner} cannot be reconstructed: {owner} dealt shares of a {kind} that is not "
                    "the one it advertised",
                    offenders=(owner,),
                ) from None
            raise RoundFailed(
                f"the {kind} of {owner} cannot be reconstructed: the {len(shares)} revealed shares disagree and "
                f"no {t} of them give the committed {kind}, so whose shares lie cannot be told"
            ) from None
        for index in recovered.off_polynomial:
            self.liars.setdefault(revealed[index][0], f"revealed a share of {owner}'s {kind} off its polynomial")
        return recovered.secret

    def finish(self) -> npt.NDArray[np.uint32]:
        """Reconstruct the seeds and keys, strip every mask, return the survivors' plain sum."""
        if self.stage != "unmask":
            raise FailedPrecondition(f"cannot unmask in stage {self.stage!r}")
        revealers = self._enough(list(self._reveals), "unmasking")
        collected: dict[tuple[str, str], list[tuple[str, Share]]] = {}
        for worker in revealers:
            for owner, kind, share in self._reveals[worker]:
                collected.setdefault((owner, kind), []).append((worker, share))
        index = self._index
        self_seeds = [
            self._reconstruct(w, "self_seed", collected[(w, "self_seed")], self._committed_seed_of(w)) for w in self.u3
        ]
        dropped_pairwise: list[tuple[bytes, int]] = []
        for gone in self.dropped:
            key = self._reconstruct(gone, "mask_key", collected[(gone, "mask_key")], self._advertised_key_of(gone))
            for survivor in self.u3:
                seed = agree(key, self._advertised[survivor].mask_public, session=self._session, purpose=b"mask")
                dropped_pairwise.append((seed, pairwise_sign(index[survivor], index[gone])))
        total = self._sum
        for start in range(0, self._numel, UNMASK_SLICE):
            stop = min(start + UNMASK_SLICE, self._numel)
            total[start:stop] = unmask_sum(
                total[start:stop], self_seeds=self_seeds, dropped_pairwise=dropped_pairwise, offset=start
            )
        self.stage = "done"
        return total
