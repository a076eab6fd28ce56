import os
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora_common.secagg import (
    PRIME,
    SHARE_BYTES,
    Share,
    combine_shares,
    consistent,
    recover_secret,
    split_secret,
)


def _interpolate(points: list[tuple[int, int]], x: int) -> int:
    """Lagrange evaluation at x of the unique polynomial of degree < len(points) through `points`."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * (x - xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        total = (total + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total


@st.composite
def sharings(draw: st.DrawFn) -> tuple[int, int]:
    shares = draw(st.integers(1, 12))
    return draw(st.integers(1, shares)), shares


@settings(max_examples=60, deadline=None)
@given(secret=st.binary(max_size=64), sharing=sharings(), seed=st.integers(0, 2**32 - 1))
def test_any_threshold_shares_reconstruct_the_secret(secret: bytes, sharing: tuple[int, int], seed: int) -> None:
    threshold, n = sharing
    shares = split_secret(secret, threshold=threshold, shares=n)
    subset = random.Random(seed).sample(shares, threshold)

    recovered = combine_shares(subset, threshold=threshold)

    assert recovered == secret


@settings(max_examples=30, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    candidate=st.binary(min_size=32, max_size=32),
    sharing=sharings().filter(lambda tn: tn[0] >= 2),
    seed=st.integers(0, 2**32 - 1),
)
def test_fewer_than_threshold_shares_are_consistent_with_every_secret(
    secret: bytes, candidate: bytes, sharing: tuple[int, int], seed: int
) -> None:
    """Information-theoretic hiding, shown by construction.

    Fix the t-1 shares an adversary holds. For any other candidate secret we build a full,
    valid t-of-n sharing of the candidate that agrees with those t-1 shares: g shares the
    candidate; d is the degree < t polynomial with d(0) = 0 and d(x_i) = y_i - g(x_i) at the
    seen points; g + d passes through the seen shares and has the candidate's constant term.
    So the seen shares say nothing about which secret was shared.
    """
    threshold, n = sharing
    seen = random.Random(seed).sample(split_secret(secret, threshold=threshold, shares=n), threshold - 1)
    g = split_secret(candidate, threshold=threshold, shares=n)
    correction = [(0, 0)] + [(s.x, (s.y - g[s.x - 1].y) % PRIME) for s in seen]

    forged = [Share(x, (g[x - 1].y + _interpolate(correction, x)) % PRIME) for x in range(1, n + 1)]

    assert all(forged[s.x - 1] == s for s in seen)
    others = [s for s in forged if s not in seen]
    assert combine_shares(random.Random(seed).sample(forged, threshold), threshold=threshold) == candidate
    assert combine_shares([*seen, others[0]], threshold=threshold) == candidate


@pytest.mark.parametrize("secret", [b"\0" * 32, b"\0\0\1", b"\0", b"", b"\xff" * 64, b"\0" + os.urandom(63)])
def test_leading_zero_bytes_and_length_survive(secret: bytes) -> None:
    shares = split_secret(secret, threshold=3, shares=5)

    recovered = combine_shares(shares[2:], threshold=3)

    assert recovered == secret


@settings(max_examples=50, deadline=None)
@given(x=st.integers(1, 2**16 - 1), y=st.integers(0, PRIME - 1))
def test_share_bytes_round_trip_at_fixed_width(x: int, y: int) -> None:
    share = Share(x, y)

    encoded = share.to_bytes()

    assert len(encoded) == SHARE_BYTES == 68
    assert Share.from_bytes(encoded) == share


@pytest.mark.parametrize("data", [bytes(68), bytes(67), b"\0\1" + PRIME.to_bytes(66, "big")])
def test_malformed_share_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match="share"):
        Share.from_bytes(data)


def test_duplicate_x_is_refused() -> None:
    shares = split_secret(b"k" * 32, threshold=2, shares=3)

    with pytest.raises(ValueError, match="same x"):
        combine_shares([shares[0], shares[0], shares[1]], threshold=2)


def test_too_few_shares_are_refused() -> None:
    shares = split_secret(b"k" * 32, threshold=3, shares=5)

    with pytest.raises(ValueError, match="are needed"):
        combine_shares(shares[:2], threshold=3)


@pytest.mark.parametrize(
    ("secret", "threshold", "shares"),
    [(b"s", 0, 3), (b"s", 4, 3), (b"s", 2, 2**16), (b"s" * 65, 2, 3)],
)
def test_invalid_parameters_are_refused(secret: bytes, threshold: int, shares: int) -> None:
    with pytest.raises(ValueError, match=r"need 1 <= threshold|at most 64 bytes"):
        split_secret(secret, threshold=threshold, shares=shares)


def _counting_source() -> Callable[[int], bytes]:
    """A deterministic byte source: 1, 2, 3, ... each as k big-endian bytes."""
    draws = iter(range(1, 10**6))
    return lambda k: next(draws).to_bytes(k, "big")


def test_coefficients_come_from_the_random_source_passed_in() -> None:
    same_a = split_secret(b"s" * 32, threshold=3, shares=4, random_bytes=_counting_source())
    same_b = split_secret(b"s" * 32, threshold=3, shares=4, random_bytes=_counting_source())

    fresh = split_secret(b"s" * 32, threshold=3, shares=4)

    assert same_a == same_b
    assert same_a != fresh


def _lie(shares: list[Share], liars: list[int], rng: random.Random) -> list[Share]:
    """The same shares, with a wrong y (right x) at each index in `liars`."""
    return [Share(s.x, (s.y + rng.randrange(1, PRIME)) % PRIME) if i in liars else s for i, s in enumerate(shares)]


@settings(max_examples=40, deadline=None)
@given(
    secret=st.binary(min_size=1, max_size=32),
    threshold=st.integers(min_value=2, max_value=6),
    extra=st.integers(min_value=0, max_value=8),
    data=st.data(),
)
def test_the_secret_is_recovered_and_every_liar_named_while_the_honest_shares_can_tell(
    secret: bytes, threshold: int, extra: int, data: st.DataObject
) -> None:
    # Prepare: n = t + extra shares, of which up to max(1, extra // 2) lie (one liar needs one share to spare,
    # found by trying subsets; more liars are corrected by decoding), placed anywhere, the first t included.
    n = threshold + extra
    shares = split_secret(secret, threshold=threshold, shares=n)
    count = data.draw(st.integers(0, max(1, extra // 2) if extra else 0))
    liars = sorted(data.draw(st.lists(st.integers(0, n - 1), min_size=count, max_size=count, unique=True)))
    lied = _lie(shares, liars, random.Random(data.draw(st.integers(0, 2**32))))

    # Execute: the owner's commitment is all the coordinator checks a candidate against.
    recovered = recover_secret(lied, threshold=threshold, valid=lambda s: s == secret)

    # Assert
    assert recovered.secret == secret
    assert list(recovered.off_polynomial) == liars


def test_decoding_corrects_more_liars_than_any_subset_search_would_reach() -> None:
    # Prepare: 40 revealers, threshold 20, 10 liars: C(40, 20) subsets, of which almost none is honest.
    shares = split_secret(b"k" * 32, threshold=20, shares=40)
    liars = list(range(0, 40, 4))
    lied = _lie(shares, liars, random.Random(3))

    # Execute: no subset search at all; decoding alone must find it.
    recovered = recover_secret(lied, threshold=20, valid=lambda s: s == b"k" * 32, max_subsets=0)

    # Assert
    assert recovered.secret == b"k" * 32
    assert list(recovered.off_polynomial) == liars


def test_a_lying_share_cannot_pass_off_another_secret() -> None:
    # Prepare: t = n = 2, so the two shares always define some polynomial; one lies.
    shares = split_secret(b"seed", threshold=2, shares=2)
    lied = _lie(shares, [1], random.Random(5))

    # Execute / Assert: its secret is not the committed one, and with no share to spare nobody can be named.
    with pytest.raises(ValueError, match="no 2 of the 2 shares reconstruct a valid secret"):
        recover_secret(lied, threshold=2, valid=lambda s: s == b"seed")


def test_shares_of_another_secret_are_consistent_but_invalid() -> None:
    # Prepare: the owner dealt shares of a secret other than the one it committed to.
    shares = split_secret(b"other", threshold=3, shares=5)

    # Execute / Assert: the shares agree with each other, so the fault is the dealer's, not a revealer's.
    assert consistent(shares, threshold=3)
    with pytest.raises(ValueError, match="valid secret"):
        recover_secret(shares, threshold=3, valid=lambda s: s == b"committed")


def test_with_only_one_share_to_spare_a_bad_share_is_detected() -> None:
    shares = split_secret(b"seed", threshold=3, shares=4)
    altered = [*shares[:3], Share(shares[3].x, (shares[3].y + 7) % PRIME)]

    assert consistent(shares, threshold=3)
    assert not consistent(altered, threshold=3)
