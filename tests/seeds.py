"""One seed per test run for every generated case, printed, and replayed from the environment.

`FEDLORA_FUZZ_SEED=N python -m pytest ...` replays a run's generated cases. Unset, a seed is drawn
at random. tests/conftest.py hands the seed to hypothesis as its own `--hypothesis-seed` (each
`@given` draws from it) and prints it in pytest's header and under every failing test that
generates cases; the fuzz tests derive the seed of each of their nested searches from it
(`derived`) and name it in their assertion messages (`replay_hint`).

What the seed fixes is the list of cases generated: key material drawn by the code under test
(X25519, Ed25519 keys, sealed shares) stays fresh each run, so a case's bytes can differ but its
shape (the RPC, sender, defects, expected statuses, sizes) does not.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping

__all__ = ["VARIABLE", "derived", "replay_hint", "session_seed"]

VARIABLE = "FEDLORA_FUZZ_SEED"
SEED_BITS = 64


def session_seed(environ: Mapping[str, str], hypothesis_option: str | None) -> int:
    """The run's seed: FEDLORA_FUZZ_SEED, else pytest's --hypothesis-seed, else a fresh random one."""
    values: dict[str, int] = {}
    for name, value in ((VARIABLE, environ.get(VARIABLE)), ("--hypothesis-seed", hypothesis_option)):
        if value:
            values[name] = _parse(name, value)
    if len(set(values.values())) > 1:
        raise ValueError(f"{VARIABLE} and --hypothesis-seed name different seeds: {values}; give one")
    return next(iter(values.values()), secrets.randbits(SEED_BITS))


def _parse(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def derived(seed: int, *names: str) -> int:
    """A seed for one named search inside a test: fixed by the run's seed, different for each name."""
    digest = hashlib.sha256("\0".join([str(seed), *names]).encode()).digest()
    return int.from_bytes(digest[: SEED_BITS // 8], "big")


def replay_hint(seed: int, nodeid: str = "") -> str:
    """How to generate the same cases again."""
    return f"replay with {VARIABLE}={seed} python -m pytest {nodeid}".rstrip()
