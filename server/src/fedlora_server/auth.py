"""Who is calling: a bearer token on the allow-list, and with mutual TLS a matching certificate."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from fedlora_server.config import WorkerEntry
from fedlora_server.errors import PermissionDenied, Unauthenticated

__all__ = ["Authenticator", "check_claim"]


class Authenticator:
    def __init__(self, allow_list: Sequence[WorkerEntry], *, require_client_cert: bool = False) -> None:
        self._by_digest = {entry.token_sha256: entry.id for entry in allow_list}
        self._require_client_cert = require_client_cert

    def identify(self, token: str | None, peer_names: Sequence[str] = ()) -> str:
        """The worker whose bearer token this is (and, with mTLS, whose certificate the peer holds)."""
        owner = self.owner(token)
        self.check_certificate(owner, peer_names)
        return owner

    def owner(self, token: str | None) -> str:
        """The worker whose bearer token this is: what a call's metadata proves before any message is read."""
        if not token:
            raise Unauthenticated("missing bearer token")
        # The allow-list holds `sha256sum` of the token file, which may end in a newline the worker does not send
        # (`openssl rand -hex 32 > token` writes one): either digest names the same secret.
        digests = [hashlib.sha256(token.encode() + end).hexdigest() for end in (b"", b"\n")]
        owner = next(
            (wid for d, wid in self._by_digest.items() if any(hmac.compare_digest(d, mine) for mine in digests)),
            None,
        )
        if owner is None:
            raise Unauthenticated("unknown credentials")
        return owner

    def check_certificate(self, owner: str, peer_names: Sequence[str]) -> None:
        """With mutual TLS, the peer's certificate must name the token's owner."""
        if self._require_client_cert and owner not in peer_names:
            raise PermissionDenied(f"client certificate does not name {owner}")


def check_claim(owner: str, claimed_id: str) -> str:
    """A request names the worker it acts for; only that worker's own credentials may."""
    if claimed_id != owner:
        raise PermissionDenied(f"credentials of {owner} cannot act as {claimed_id!r}")
    return owner
