"""Secure aggregation's pure parts: Shamir sharing, quantization, AES-CTR masks, keys, and protocol messages.

Pure functions over bytes and numpy arrays; every source of randomness is passed in. The
stage machines that use them live with the worker and the coordinator.
"""

from fedlora_common.secagg.crypto import (
    KEY_BYTES,
    KeyPair,
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
from fedlora_common.secagg.masking import SEED_BYTES, keystream_u32, mask_vector, pairwise_sign, unmask_sum
from fedlora_common.secagg.protocol import (
    Advertisement,
    Complaint,
    EncryptedShare,
    RevealedShare,
    SecAggParams,
    ShareKind,
    StageError,
    round_tag,
)
from fedlora_common.secagg.quantize import dequantize_sum, max_bits, quantization_step, quantize
from fedlora_common.secagg.sealed import SEALED_SHARE_BYTES, open_share_pair, seal_share_pair
from fedlora_common.secagg.shamir import (
    MAX_SECRET_BYTES,
    PRIME,
    SHARE_BYTES,
    Recovered,
    Share,
    combine_shares,
    consistent,
    recover_secret,
    split_secret,
)

__all__ = [
    "KEY_BYTES",
    "MAX_SECRET_BYTES",
    "PRIME",
    "SEALED_SHARE_BYTES",
    "SEED_BYTES",
    "SHARE_BYTES",
    "Advertisement",
    "Complaint",
    "EncryptedShare",
    "KeyPair",
    "Recovered",
    "RevealedShare",
    "SecAggParams",
    "Share",
    "ShareKind",
    "StageError",
    "agree",
    "combine_shares",
    "consistent",
    "dequantize_sum",
    "identity_keypair",
    "keystream_u32",
    "mask_vector",
    "max_bits",
    "new_x25519",
    "open_sealed",
    "open_share_pair",
    "pairwise_sign",
    "quantization_step",
    "quantize",
    "recover_secret",
    "round_keys_message",
    "round_tag",
    "seal",
    "seal_share_pair",
    "seed_commitment",
    "session_id",
    "share_associated_data",
    "sign",
    "split_secret",
    "unmask_sum",
    "verify",
    "x25519_public_of",
]
