import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora_common.secagg import (
    agree,
    identity_keypair,
    new_x25519,
    open_sealed,
    round_keys_message,
    seal,
    seed_commitment,
    session_id,
    share_associated_data,
    sign,
    verify,
    x25519_public_of,
)

SESSION = b"\7" * 32
COMMITMENT = seed_commitment(b"\1" * 32)


def test_a_signed_key_message_verifies_under_the_identity() -> None:
    identity = identity_keypair()
    mask, enc = new_x25519(), new_x25519()
    message = round_keys_message("hospital-a", "run-1", 3, mask.public, enc.public, COMMITMENT)

    signature = sign(identity.private, message)

    assert verify(identity.public, message, signature)
    assert not verify(identity_keypair().public, message, signature)


def test_a_signature_does_not_cover_a_swapped_key() -> None:
    identity = identity_keypair()
    mask, enc, attacker = new_x25519(), new_x25519(), new_x25519()
    signature = sign(identity.private, round_keys_message("a", "run", 1, mask.public, enc.public, COMMITMENT))

    swapped = [
        round_keys_message("a", "run", 1, attacker.public, enc.public, COMMITMENT),
        round_keys_message("a", "run", 1, mask.public, attacker.public, COMMITMENT),
        round_keys_message("a", "run", 1, enc.public, mask.public, COMMITMENT),
        round_keys_message("b", "run", 1, mask.public, enc.public, COMMITMENT),
        round_keys_message("a", "run", 2, mask.public, enc.public, COMMITMENT),
        round_keys_message("a", "run", 1, mask.public, enc.public, seed_commitment(b"another seed")),
    ]

    assert not any(verify(identity.public, m, signature) for m in swapped)


def test_a_malformed_identity_key_or_signature_is_a_failed_verification() -> None:
    message = b"m"
    signature = sign(identity_keypair().private, message)

    assert not verify(b"short", message, signature)
    assert not verify(identity_keypair().public, message, b"\0" * 3)


def test_round_keys_messages_are_unambiguous() -> None:
    """Length prefixes: moving a byte from one field to the next changes the message."""
    key = b"k" * 32

    assert round_keys_message("ab", "c", 1, key, key, key) != round_keys_message("a", "bc", 1, key, key, key)


def test_session_id_binds_every_advertised_key_and_the_round() -> None:
    keys = {w: (new_x25519().public, new_x25519().public) for w in ("a", "b", "c")}
    base = session_id("run", 4, keys)

    reordered = session_id("run", 4, dict(reversed(list(keys.items()))))
    variants = [
        session_id("run", 5, keys),
        session_id("other", 4, keys),
        session_id("run", 4, {**keys, "c": (keys["c"][1], keys["c"][0])}),
        session_id("run", 4, {w: k for w, k in keys.items() if w != "c"}),
    ]

    assert len(base) == 32
    assert reordered == base
    assert base not in variants


def test_agreement_is_symmetric_and_depends_on_session_and_purpose() -> None:
    i, j = new_x25519(), new_x25519()

    ij = agree(i.private, j.public, session=SESSION, purpose=b"mask")
    ji = agree(j.private, i.public, session=SESSION, purpose=b"mask")

    assert len(ij) == 32
    assert ij == ji
    assert agree(i.private, j.public, session=b"\x08" * 32, purpose=b"mask") != ij
    assert agree(i.private, j.public, session=SESSION, purpose=b"shares") != ij
    assert agree(i.private, new_x25519().public, session=SESSION, purpose=b"mask") != ij


def test_a_keypair_from_an_explicit_source_is_reproducible_and_consistent() -> None:
    first = new_x25519(lambda k: b"\5" * k)
    second = new_x25519(lambda k: b"\5" * k)

    assert first == second
    assert x25519_public_of(first.private) == first.public
    assert x25519_public_of(new_x25519().private) != first.public


@settings(max_examples=25, deadline=None)
@given(plaintext=st.binary(max_size=300), associated=st.binary(max_size=64))
def test_sealed_data_opens_with_the_same_key_and_associated_data(plaintext: bytes, associated: bytes) -> None:
    key = b"\1" * 32

    sealed = seal(key, plaintext, associated_data=associated)

    assert len(sealed) == 12 + len(plaintext) + 16
    assert open_sealed(key, sealed, associated_data=associated) == plaintext


def test_sealing_twice_uses_fresh_nonces() -> None:
    key = b"\1" * 32

    assert seal(key, b"x", associated_data=b"") != seal(key, b"x", associated_data=b"")


@pytest.mark.parametrize("position", [0, 11, 12, -1])
def test_a_tampered_seal_is_refused(position: int) -> None:
    key, ad = b"\1" * 32, share_associated_data("a", "b", 1, SESSION)
    sealed = bytearray(seal(key, b"share bytes", associated_data=ad))
    sealed[position] ^= 1

    with pytest.raises(ValueError, match="authentication"):
        open_sealed(key, bytes(sealed), associated_data=ad)


def test_a_seal_opened_with_the_wrong_key_or_associated_data_is_refused() -> None:
    key, ad = b"\1" * 32, share_associated_data("a", "b", 1, SESSION)
    sealed = seal(key, b"share bytes", associated_data=ad)

    wrong = [
        (b"\2" * 32, ad),
        (key, share_associated_data("b", "a", 1, SESSION)),
        (key, share_associated_data("a", "c", 1, SESSION)),
        (key, share_associated_data("a", "b", 2, SESSION)),
        (key, share_associated_data("a", "b", 1, b"\0" * 32)),
        (b"\1" * 16, ad),
    ]

    for k, associated in wrong:
        with pytest.raises(ValueError, match="authentication"):
            open_sealed(k, sealed, associated_data=associated)
    with pytest.raises(ValueError, match="authentication"):
        open_sealed(key, sealed[:11], associated_data=ad)
