"""The mask keystream's rate against a bare AES-256-CTR loop, measured in the same run.

Masks are the AES-256-CTR keystream of a 32-byte seed read as uint32 (fedlora_common.secagg.
keystream_u32). The reference is the fastest plain use of `cryptography`: one encryptor,
`update_into` one output buffer in 1 MiB slices of zeros. Both produce the same bytes.

Two comparisons, each timed best-of-R and interleaved so a noisy neighbour hurts both alike:
* like for like (the target): both write a freshly allocated output per call, as
  keystream_u32 must, since it returns a new array. The ratio is the wrapper's cost (seeking,
  slicing, the numpy view).
* strict: the raw loop reuses one buffer allocated before timing. Above glibc's mmap threshold
  (32 MiB) every fresh array is new pages, and first-touch page faults then cost about 2/3 of
  the AES time; that is memory, not the keystream. mask_vector, the hot path, never pays it:
  it generates into one reused 256 KiB scratch buffer.

Also printed, for information: mask_vector with one self mask and k pairwise masks (k + 1
keystreams plus one uint32 add per keystream).

Usage: python bench/secagg_keystream.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedlora_common.secagg import keystream_u32, mask_vector

SLICE = 1 << 20
TARGET = 0.8


def raw_ctr_into(seed: bytes, out: memoryview, nbytes: int) -> None:
    """The reference: AES-256-CTR from the zero counter block into `out` (nbytes + 15 long)."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    zeros = memoryview(bytes(SLICE))
    for start in range(0, nbytes, SLICE):
        n = min(SLICE, nbytes - start)
        encryptor.update_into(zeros[:n], out[start : start + n + 15])


def raw_ctr_fresh(seed: bytes, nbytes: int) -> memoryview:
    """The reference with a fresh output per call, allocated as numpy allocates keystream_u32's."""
    out = np.empty(nbytes + 15, dtype=np.uint8).data
    raw_ctr_into(seed, out, nbytes)
    return out


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 MiB instead of 128 MiB, fewer repeats")
    args = parser.parse_args()
    nbytes = (16 if args.quick else 128) << 20
    repeats = 3 if args.quick else 7
    count = nbytes // 4
    seed = os.urandom(32)

    reused = memoryview(bytearray(nbytes + 15))  # allocated and touched once, outside the timing
    raw_ctr_into(seed, reused, nbytes)
    reference = np.frombuffer(reused, dtype="<u4", count=count)
    assert np.array_equal(keystream_u32(seed, count), reference), "keystream_u32 is not AES-256-CTR from block 0"

    fresh_s = reused_s = ours_s = float("inf")
    for _ in range(repeats):
        fresh_s = min(fresh_s, seconds(lambda: raw_ctr_fresh(seed, nbytes)))
        reused_s = min(reused_s, seconds(lambda: raw_ctr_into(seed, reused, nbytes)))
        ours_s = min(ours_s, seconds(lambda: keystream_u32(seed, count)))
    fresh, strict, ours = (nbytes / s / 1e6 for s in (fresh_s, reused_s, ours_s))
    verdict = "met" if ours / fresh >= TARGET else "MISSED"

    print(f"keystream of {nbytes >> 20} MiB per call, best of {repeats} (MB = 1e6 bytes)")
    print(f"  raw AES-256-CTR loop, fresh output       {fresh:7.0f} MB/s")
    print(f"  raw AES-256-CTR loop, reused output      {strict:7.0f} MB/s")
    print(f"  keystream_u32 (returns a fresh array)    {ours:7.0f} MB/s")
    print(f"  ratio, like for like (fresh / fresh)     {ours / fresh:7.3f}   target >= {TARGET}: {verdict}")
    print(f"  ratio, strict (fresh / reused)           {ours / strict:7.3f}   (< 1: page faults of a fresh array)")

    values = np.zeros(count, dtype=np.uint32)
    for k in (1, 4):
        pairwise = [(os.urandom(32), 1 if i % 2 else -1) for i in range(k)]
        mask = functools.partial(mask_vector, values, self_seed=seed, pairwise=pairwise)
        best = min(seconds(mask) for _ in range(max(3, repeats // 2)))
        print(
            f"  mask_vector, self + {k} pairwise          {nbytes / best / 1e6:7.0f} MB/s of vector"
            f"  ({(k + 1) * nbytes / best / 1e6:.0f} MB/s of keystream, adds included)"
        )


if __name__ == "__main__":
    main()
