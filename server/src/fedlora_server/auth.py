"""Who is calling: a bearer token on the allow-list, and with mutual TLS a matching certificate."""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Sequence

from fedlora_server.config import WorkerEntry
from fedlora_server.errors import PermissionDenied, Unauthenticated

__all__ = ["Authenticator", "check_claim"]


class Authenticator:
    def __init__(self, allow_list: Sequence[WorkerEntry], *, require_client_cert: bool = False) -> None:
        self._by_digest = {entry.token_sha256: entry.id for entry in allow_list}
        self._retiring: dict[str, str] = {}
        self._lock = threading.Lock()
        self._require_client_cert = require_client_cert

    def allow(self, allow_list: Sequence[WorkerEntry]) -> None:
        """The allow-list was amended. A rotated token stays valid until its site first presents the new one, so
        a site mid-round finishes it with the old; a revoked site's token ends now."""
        with self._lock:
            current = {entry.token_sha256: entry.id for entry in allow_list}
            kept = set(current.values())
            old = {**self._retiring, **self._by_digest}
            self._retiring = {d: wid for d, wid in old.items() if wid in kept and d not in current}
            self._by_digest = current

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
        with self._lock:
            owner = _match(self._by_digest, digests)
            if owner is not None:  # its new token: the old one retires
                self._retiring = {d: wid for d, wid in self._retiring.items() if wid != owner}
            else:
                owner = _match(self._retiring, digests)
        if owner is None:
            raise Unauthenticated("unknown credentials")
        return owner

    def check_certificate(self, owner: str, peer_names: Sequence[str]) -> None:
        """With mutual TLS, the peer's certificate must name the token's owner."""
        if self._require_client_cert and owner not in peer_names:
            raise PermissionDenied(f"client certificate does not name {owner}")


def _match(by_digest: dict[str, str], digests: Sequence[str]) -> str | None:
    """The worker whose allow-listed digest is one of `digests`, compared in constant time."""
    return next((wid for d, wid in by_digest.items() if any(hmac.compare_digest(d, mine) for mine in digests)), None)


def check_claim(owner: str, claimed_id: str) -> str:
    """A request names the worker it acts for; only that worker's own credentials may."""
    if claimed_id != owner:
        raise PermissionDenied(f"credentials of {owner} cannot act as {claimed_id!r}")
    return owner
