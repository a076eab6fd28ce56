"""What secure aggregation costs a round, against the plain path, for the 8B LoRA update size.

One process drives both stage machines (fedlora_worker.secagg_session.WorkerSession and
fedlora_server.secure_round.SecureRound), as tests/server/test_secure_round.py does, with the
steps the daemon and the coordinator take: each worker weights its delta (w / max_examples),
quantizes it, appends its weight as one more coordinate, and masks it; the coordinator adds the
masked vectors slice by slice (4 MiB, as it folds uploads), unmasks and dequantizes the mean.
The plain path folds each float32 delta into a StreamingAccumulator in the same slices.

For each n, one set of n worker sessions feeds two coordinator rounds at once: one where every
worker uploads (0% dropouts, the round that is timed end to end) and one where the last 30%
drop after masking (they advertised and shared keys, never uploaded). The masked vectors are
the same in both, since masking uses the set that shared keys; each vector is added to both
rounds and discarded before the next worker masks. Each session reveals to both rounds (a
copy of it reveals to the second): a benchmark shortcut; a real worker would answer one only.

The float32 delta (~N(0, 1e-3)) is drawn once and reused by every worker; each worker quantizes
it with its own np.random.default_rng. Secure-aggregation settings are the coordinator's
defaults (SecureAggregationSection: threshold 2/3, clip 0.05, bits the most that cannot wrap;
RunSettings.max_examples 65536). Each sum is checked: the weight coordinate exactly, the mean within the
quantization bound.

Usage: python bench/secagg.py [--quick] [--workers N ...] [--link-gbps G]
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from google.protobuf.message import Message

from fedlora_common.aggregation import StreamingAccumulator
from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_common.secagg import (
    Advertisement,
    EncryptedShare,
    RevealedShare,
    SecAggParams,
    dequantize_sum,
    identity_keypair,
    keystream_u32,
    max_bits,
    quantization_step,
    round_tag,
)
from fedlora_common.serde import advertisement_to_proto, encrypted_share_to_proto, revealed_share_to_proto
from fedlora_server.config import RunSettings, SecureAggregationSection
from fedlora_server.intake import READ_SLICE_BYTES as FOLD_SLICE_BYTES
from fedlora_server.secure_round import SecureRound
from fedlora_worker import protect
from fedlora_worker.secagg_session import WorkerSession

LLAMA_8B_LORA_NUMEL = 41_943_040  # Llama-3.1-8B, rank 16, all 7 projections (bench/comm.py)
QUICK_NUMEL = 4 * 2**20
FOLD_SLICE = FOLD_SLICE_BYTES // 4  # elements per add_slice / add_masked call
DROP_FRACTION = 0.3
EXAMPLES = 1000  # each worker's example count (its weight)
RUN_ID = "bench-secagg"
MAX_EXAMPLES = RunSettings.model_fields["max_examples"].default  # the coordinator's default cap
SLICE = 1 << 20  # the raw AES-CTR loop's slice, as in bench/secagg_keystream.py
GRPC_PREFIX = 5  # gRPC's length prefix per message
TARGET_ROUND = 1.3
TARGET_ROUND_N = 10
TARGET_KEYSTREAM = 0.8
TARGET_BYTES = 1.0

T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# ---- keystream rate ----------------------------------------------------------------------


def raw_ctr_fresh(seed: bytes, nbytes: int) -> memoryview:
    """The reference: AES-256-CTR from block 0 into a fresh buffer, 1 MiB update_into slices."""
    out = np.empty(nbytes + 15, dtype=np.uint8).data
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    zeros = memoryview(bytes(SLICE))
    for start in range(0, nbytes, SLICE):
        n = min(SLICE, nbytes - start)
        encryptor.update_into(zeros[:n], out[start : start + n + 15])
    return out


@dataclass(frozen=True)
class KeystreamResult:
    nbytes: int
    raw_mb_s: float
    ours_mb_s: float
    repeats: int


def keystream_rate(count: int, repeats: int) -> KeystreamResult:
    """Best of `repeats`, interleaved; both write a fresh output per call (keystream_u32 must)."""
    seed = os.urandom(32)
    nbytes = count * 4
    reference = np.frombuffer(raw_ctr_fresh(seed, nbytes), dtype="<u4", count=count)
    assert np.array_equal(keystream_u32(seed, count), reference), "keystream_u32 is not AES-256-CTR from block 0"
    del reference
    raw_s = ours_s = float("inf")
    for _ in range(repeats):
        raw_s = min(raw_s, timed(lambda: raw_ctr_fresh(seed, nbytes))[1])
        ours_s = min(ours_s, timed(lambda: keystream_u32(seed, count))[1])
    return KeystreamResult(nbytes, nbytes / raw_s / 1e6, nbytes / ours_s / 1e6, repeats)


# ---- the plain round ---------------------------------------------------------------------


def plain_round(delta: npt.NDArray[np.float32], n: int) -> float:
    """Coordinator seconds: fold n float32 deltas in 4 MiB slices, then the mean."""

    def run() -> npt.NDArray[np.float32]:
        acc = StreamingAccumulator(delta.size)
        for _ in range(n):
            for offset in range(0, delta.size, FOLD_SLICE):
                acc.add_slice(offset, delta[offset : offset + FOLD_SLICE], float(EXAMPLES))
            acc.close_update(float(EXAMPLES))
        return acc.mean()

    mean, seconds = timed(run)
    assert np.allclose(mean, delta, rtol=1e-5, atol=0), "the plain mean of identical deltas is the delta"
    return seconds


# ---- the secure round --------------------------------------------------------------------


@dataclass
class SecureResult:
    n: int
    bits: int
    threshold: int
    dropped: int
    quantize_s: list[float] = field(default_factory=list)
    mask_s: list[float] = field(default_factory=list)
    worker_s: dict[str, float] = field(default_factory=dict)  # all worker-side time, per worker
    coordinator_s: float = 0.0  # all coordinator-side time of the 0%-dropout round
    finish_s: float = 0.0
    dequantize_s: float = 0.0
    finish_dropped_s: float = 0.0
    wire: dict[str, int] = field(default_factory=dict)  # one worker's key/share messages, bytes


def _message_bytes(message: Message) -> int:
    return int(message.ByteSize()) + GRPC_PREFIX


def _wire_sizes(
    worker: str,
    tag: int,
    ad: Advertisement,
    shares: Sequence[EncryptedShare],
    reveals: dict[str, list[RevealedShare]],
    roster: Sequence[Advertisement],
    inbox: Sequence[EncryptedShare],
) -> dict[str, int]:
    """Serialized sizes of what one worker sends and receives for keys and shares (protobuf + 5)."""
    sizes = {
        "advertisement": _message_bytes(
            pb.AdvertiseKeysRequest(worker_id=worker, run_id=RUN_ID, tag=tag, keys=advertisement_to_proto(ad))
        ),
        "shares": _message_bytes(
            pb.ShareKeysRequest(
                worker_id=worker, run_id=RUN_ID, tag=tag, shares=[encrypted_share_to_proto(s) for s in shares]
            )
        ),
        "sealed_share": len(shares[0].ciphertext),
        "peers": len(shares),
        # What the coordinator relays down in the task's SecAggPlan (its other fields left out).
        "roster": _message_bytes(pb.SecAggPlan(roster=[advertisement_to_proto(a) for a in roster])),
        "inbox": _message_bytes(pb.SecAggPlan(inbox=[encrypted_share_to_proto(s) for s in inbox])),
    }
    for case, revealed in reveals.items():
        sizes[f"reveal_{case}"] = _message_bytes(
            pb.RevealSharesRequest(
                worker_id=worker, run_id=RUN_ID, tag=tag, shares=[revealed_share_to_proto(r) for r in revealed]
            )
        )
    return sizes


def _add_masked(server: SecureRound, worker: str, masked: npt.NDArray[np.uint32]) -> None:
    """What the coordinator does with a verified masked upload: check, add in 4 MiB slices, close."""
    server.check_masked_upload(worker, masked.size)
    for offset in range(0, masked.size, FOLD_SLICE):
        server.add_masked(worker, masked[offset : offset + FOLD_SLICE], offset)
    server.close_masked_upload(worker)


def _check_mean(
    total: npt.NDArray[np.uint32],
    mean: npt.NDArray[np.float32],
    delta: npt.NDArray[np.float32],
    params: SecAggParams,
    uploads: int,
) -> None:
    assert int(total[-1]) == uploads * EXAMPLES, "the weight coordinate is the sum of the uploaders' weights"
    # Each upload's coordinate rounds by less than one level, so the mean by less than step * M / w;
    # float32 rounding (of delta * w / M and of the mean) adds a few ulps of the delta.
    bound = quantization_step(params.clip_range, params.bits) * params.max_examples / EXAMPLES
    bound += 4 * float(np.finfo(np.float32).eps) * float(np.max(np.abs(delta)))
    error = float(np.max(np.abs(mean.astype(np.float64) - delta)))
    assert error <= bound, f"unmasked mean off by {error:.3g} (bound {bound:.3g})"


def _dequantized_mean(total: npt.NDArray[np.uint32], params: SecAggParams) -> npt.NDArray[np.float32]:
    """As the coordinator's _dequantized_mean: sum_u (w_u/M) delta_u / sum_u (w_u/M)."""
    weight = float(total[-1])
    values = dequantize_sum(total[:-1], clip=params.clip_range, bits=params.bits)
    return (values * (params.max_examples / weight)).astype(np.float32)


def secure_round(delta: npt.NDArray[np.float32], n: int, settings: SecureAggregationSection) -> SecureResult:
    ids = tuple(f"w{i:02d}" for i in range(n))
    identities = {w: identity_keypair() for w in ids}
    public = {w: k.public for w, k in identities.items()}
    params = SecAggParams(
        run_id=RUN_ID,
        tag=round_tag(1, 1),
        participants=ids,
        threshold=SecAggParams.threshold_for(n, settings.threshold_fraction),
        bits=settings.bits or max_bits(n),
        clip_range=settings.clip_range,
        max_examples=MAX_EXAMPLES,
    )
    dropped = round(DROP_FRACTION * n)
    gone = set(ids[n - dropped :])
    result = SecureResult(n, params.bits, params.threshold, dropped)
    numel = delta.size + 1
    worker_s = dict.fromkeys(ids, 0.0)
    coordinator_s = 0.0

    def worker(w: str, fn: Callable[[], T]) -> T:
        out, seconds = timed(fn)
        worker_s[w] += seconds
        return out

    def coordinator(fn: Callable[[], T]) -> T:
        nonlocal coordinator_s
        out, seconds = timed(fn)
        coordinator_s += seconds
        return out

    full = coordinator(lambda: SecureRound(params=params, identities=public, numel=numel))  # timed end to end
    dropping = SecureRound(params=params, identities=public, numel=numel)  # 30% drop after masking

    # Advertise: fresh round keys, signed.
    sessions: dict[str, WorkerSession] = {}
    ads: dict[str, Advertisement] = {}
    for w in ids:
        sessions[w] = worker(
            w,
            partial(
                WorkerSession,
                worker_id=w,
                params=params,
                identity_private=identities[w].private,
                peer_identities=public,
            ),
        )
        ads[w] = worker(w, sessions[w].advertise)
        coordinator(partial(full.advertise, ads[w]))
        dropping.advertise(ads[w])
    coordinator(full.close_advertise)
    dropping.close_advertise()

    # Share keys: Shamir shares of the self seed and mask key, sealed to each peer.
    roster = coordinator(full.roster)
    shares: dict[str, list[EncryptedShare]] = {}
    for w in ids:
        shares[w] = worker(w, partial(sessions[w].share_keys, roster))
        coordinator(partial(full.submit_shares, w, shares[w]))
        dropping.submit_shares(w, shares[w])
    coordinator(full.close_share)
    dropping.close_share()

    # Masked upload: weight, quantize, append the weight, mask; the coordinator adds it, then it is dropped.
    inboxes: dict[str, list[EncryptedShare]] = {}
    for i, w in enumerate(ids):
        inboxes[w] = coordinator(partial(full.inbox, w))
        rng = np.random.default_rng([0, params.tag, i])
        vector, quantize_s = timed(
            partial(protect.encode, delta, clip_norm=0.0, examples=EXAMPLES, params=params, rounding=rng, noise_rng=rng)
        )
        masked, mask_s = timed(partial(sessions[w].mask, inboxes[w], full.u2, vector))
        worker_s[w] += quantize_s + mask_s
        result.quantize_s.append(quantize_s)
        result.mask_s.append(mask_s)
        del vector
        coordinator(partial(_add_masked, full, w, masked))
        if w not in gone:
            _add_masked(dropping, w, masked)
        del masked
    coordinator(full.close_masked)
    dropping.close_masked()

    # Unmask: each survivor reveals; a copy of each session answers the 30%-dropout round.
    reveals: dict[str, list[RevealedShare]] = {}
    for w in ids:
        twin = copy.deepcopy(sessions[w])
        revealed = worker(w, partial(sessions[w].reveal, full.u3, full.dropped))
        coordinator(partial(full.submit_reveal, w, revealed))
        reveals.setdefault("all", revealed)
        if w not in gone:
            revealed = twin.reveal(dropping.u3, dropping.dropped)
            dropping.submit_reveal(w, revealed)
            reveals.setdefault("dropped", revealed)

    total, result.finish_s = timed(full.finish)
    mean, result.dequantize_s = timed(partial(_dequantized_mean, total, params))
    coordinator_s += result.finish_s + result.dequantize_s
    _check_mean(total, mean, delta, params, n)
    del total, mean

    total, result.finish_dropped_s = timed(dropping.finish)
    _check_mean(total, _dequantized_mean(total, params), delta, params, n - dropped)
    del total

    result.worker_s = worker_s
    result.coordinator_s = coordinator_s
    first = ids[0]
    result.wire = _wire_sizes(first, params.tag, ads[first], shares[first], reveals, roster, inboxes[first])
    return result


# ---- report ------------------------------------------------------------------------------


def _mean_max(values: Sequence[float]) -> str:
    return f"{sum(values) / len(values):5.2f} /{max(values):5.2f}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(
    numel: int,
    workers: Sequence[int],
    link_gbps: float,
    keystream: KeystreamResult,
    plain: dict[int, float],
    secure: dict[int, SecureResult],
) -> None:
    float_bytes = numel * 4
    masked_bytes = (numel + 1) * 4
    link = link_gbps * 1e9 / 8  # bytes per second

    print(
        f"Secure aggregation vs plain, {numel:,}-element update ({float_bytes / 1e6:.1f} MB as float32), "
        f"one process, {os.cpu_count()} cores; seconds unless marked"
    )
    print()
    header = (
        f"{'n':>3} {'bits':>4} {'t':>3} | {'quantize':>13} {'mask':>13} | {'finish':>6} {'finish 30%':>12} | "
        f"{'plain':>6} {'secure':>7} {'secure':>7} {'ratio':>6} | {'xfer':>6} {'ratio':>6}"
    )
    header2 = (
        f"{'':>3} {'':>4} {'':>3} | {'mean / max':>13} {'mean / max':>13} | {'0%':>6} {'(dropped)':>12} | "
        f"{'round':>6} {'serial':>7} {'crit':>7} {'crit':>6} | {'1Gb/s':>6} {'+xfer':>6}"
    )
    print(header.replace("1Gb/s", f"{link_gbps:g}Gb/s"))
    print(header2.replace("1Gb/s", f"{link_gbps:g}Gb/s"))
    print("-" * len(header))
    ratios: dict[int, tuple[float, float]] = {}
    for n in workers:
        r, p = secure[n], plain[n]
        serial = sum(r.worker_s.values()) + r.coordinator_s
        critical = max(r.worker_s.values()) + r.coordinator_s
        key_bytes = n * sum(r.wire[k] for k in ("advertisement", "shares", "reveal_all", "roster", "inbox"))
        plain_xfer = n * float_bytes / link
        secure_xfer = (n * masked_bytes + key_bytes) / link
        ratio, ratio_xfer = critical / p, (critical + secure_xfer) / (p + plain_xfer)
        ratios[n] = (ratio, ratio_xfer)
        print(
            f"{n:>3} {r.bits:>4} {r.threshold:>3} | {_mean_max(r.quantize_s):>13} {_mean_max(r.mask_s):>13} | "
            f"{r.finish_s:6.2f} {f'{r.finish_dropped_s:.2f} ({r.dropped})':>12} | "
            f"{p:6.2f} {serial:7.2f} {critical:7.2f} {ratio:6.2f} | {secure_xfer:6.2f} {ratio_xfer:6.2f}"
        )
    print()
    drop = f"{round(DROP_FRACTION * 100)}%"
    header = (
        f"{'n':>3} | {'masked up':>12} {'float32 up':>12} {'ratio':>12} | {'advert':>6} {'shares':>7} "
        f"{'sealed':>6} {'reveal':>6} {'reveal':>6} | {'roster':>6} {'inbox':>6} | {'keys total':>10}"
    )
    print(header)
    print(
        f"{'':>3} | {'bytes':>12} {'bytes':>12} {'':>12} | {'up':>6} {'up':>7} "
        f"{'each':>6} {'0%':>6} {drop:>6} | {'down':>6} {'down':>6} | {'up+down':>10}"
    )
    print("-" * len(header))
    for n in workers:
        w = secure[n].wire
        keys = sum(w[k] for k in ("advertisement", "shares", "reveal_all", "roster", "inbox"))
        print(
            f"{n:>3} | {masked_bytes:>12,} {float_bytes:>12,} {masked_bytes / float_bytes:12.10f} | "
            f"{w['advertisement']:>6} {w['shares']:>7,} {w['sealed_share']:>6} {w['reveal_all']:>6,} "
            f"{w['reveal_dropped']:>6,} | {w['roster']:>6,} {w['inbox']:>6,} | {keys:>10,}"
        )
    print()
    ks_ratio = keystream.ours_mb_s / keystream.raw_mb_s
    print(
        f"keystream, {keystream.nbytes / 1e6:.1f} MB per call, best of {keystream.repeats}: "
        f"keystream_u32 {keystream.ours_mb_s:.0f} MB/s, raw AES-256-CTR loop {keystream.raw_mb_s:.0f} MB/s"
    )
    print()
    bytes_ratio = masked_bytes / float_bytes
    targets: list[tuple[str, str, str]] = []
    if TARGET_ROUND_N in ratios:
        ratio, ratio_xfer = ratios[TARGET_ROUND_N]
        targets += [
            (
                f"round secure / plain, n = {TARGET_ROUND_N}, critical path, compute only",
                f"{ratio:.3f}",
                f"<= {TARGET_ROUND}: {_verdict(ratio <= TARGET_ROUND)}",
            ),
            (
                f"the same plus {link_gbps:g} Gbit/s transfer",
                f"{ratio_xfer:.3f}",
                f"<= {TARGET_ROUND}: {_verdict(ratio_xfer <= TARGET_ROUND)}",
            ),
        ]
    over = " (above 1.0: the 4-byte weight coordinate)" if bytes_ratio > TARGET_BYTES else ""
    targets += [
        (
            "keystream_u32 / raw AES-256-CTR",
            f"{ks_ratio:.3f}",
            f">= {TARGET_KEYSTREAM}: {_verdict(ks_ratio >= TARGET_KEYSTREAM)}",
        ),
        (
            "masked upload / float32 delta, bytes",
            f"{bytes_ratio:.10f}",
            f"<= {TARGET_BYTES}: {_verdict(bytes_ratio <= TARGET_BYTES)}{over}",
        ),
    ]
    print("targets:")
    for label, value, verdict in targets:
        print(f"  {label:<58} {value:>12}   {verdict}")
    print()
    print(LEGEND.format(gbps=f"{link_gbps:g}", slice_mib=FOLD_SLICE_BYTES >> 20, drop=round(DROP_FRACTION * 100)))


LEGEND = """\
legend:
  bits, t      quantization bits (the most n signed values can sum in without wrapping) and Shamir threshold
  quantize     per worker: protect.encode without clipping or noise: delta * (w / max_examples), quantize
               (float32 -> uint32, stochastic rounding from np.random.default_rng), append the weight coordinate
  mask         per worker: WorkerSession.mask: open n-1 sealed shares, n-1 key agreements, and n AES-CTR
               masks (self + n-1 pairwise) over the whole vector
  finish       SecureRound.finish() alone: reconstruct seeds/keys, strip masks. 0%: n self masks. {drop}%
               (dropped after masking: they advertised and shared keys, never uploaded): s self masks plus
               s x d pairwise masks for s survivors and d dropped
  plain round  the coordinator folds n float32 deltas into StreamingAccumulator ({slice_mib} MiB add_slice calls +
               close_update), then mean(); workers do nothing beyond training, so serial = critical path
  secure       worker side per worker: session keys, advertise, share_keys, quantize, mask, reveal;
               coordinator side: advertise/submit_shares/inbox checks, add_masked of every vector in
               {slice_mib} MiB slices, submit_reveal, finish(), dequantize_sum and the weighted mean.
               serial = all of it one after another; crit = max over workers of worker side + all of the
               coordinator side (workers run in parallel on their own machines). ratio = secure crit / plain
  xfer         seconds to move the secure round's uploads (n masked vectors, and every worker's key and
               share messages up and down) through the coordinator's one {gbps} Gbit/s link, which all
               workers share; plain moves n x 4 bytes and the key traffic less. ratio +xfer =
               (secure crit + its xfer) / (plain + its xfer). Local training and the new global's
               download are left out of both: they are the same with and without secure aggregation
  bytes        masked up: (numel + 1) x 4 (uint32 and the weight coordinate) against numel x 4 float32.
               Key traffic is serialized protobuf (ByteSize() + gRPC's 5-byte prefix) built from the
               round's actual objects, for one worker: its AdvertiseKeysRequest, ShareKeysRequest (n-1
               sealed shares of `each` bytes), RevealSharesRequest with 0% and {drop}% dropouts, and the
               roster and inbox it receives in its task; keys total = up + down with 0% dropouts
  keystream    keystream_u32 vs a raw `cryptography` AES-256-CTR update_into loop (1 MiB slices), both
               writing a fresh output per call, best of R, interleaved"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 MiB vector, n in {3, 10}")
    parser.add_argument("--workers", type=int, nargs="+", help="numbers of workers (default 3 10 30)")
    parser.add_argument("--link-gbps", type=float, default=1.0, help="assumed coordinator link for the xfer column")
    args = parser.parse_args()
    numel = QUICK_NUMEL if args.quick else LLAMA_8B_LORA_NUMEL
    workers: list[int] = args.workers or ([3, 10] if args.quick else [3, 10, 30])
    if min(workers) < 3:
        parser.error("at least 3 workers (a threshold of 2 and one dropout)")

    keystream = keystream_rate(numel, 3 if args.quick else 5)
    delta = np.random.default_rng(0).normal(0.0, 1e-3, numel).astype(np.float32)
    settings = SecureAggregationSection()
    plain: dict[int, float] = {}
    secure: dict[int, SecureResult] = {}
    for n in workers:
        plain[n] = plain_round(delta, n)
        secure[n] = secure_round(delta, n, settings)
    report(numel, workers, args.link_gbps, keystream, plain, secure)


if __name__ == "__main__":
    main()
