"""TLS to the coordinator from the site's side: its files as they must be, a key made at home, and why a handshake fails.

- `material`: the files read and judged (certificates, keys, their dates and names); a fault is a `TlsFault`,
  one line naming the file.
- `check`: `check_tls`, what `check-config` (and every start) checks of `tls.ca`, `tls.cert` and `tls.key`.
- `request`: `make_request`, `fedlora-worker csr`: an EC key written here and a CSR whose CN is the worker id.
- `doctor`: `HandshakeDoctor`, one line naming the cause of a failed connection.

No gRPC here (gRPC's C core is silenced; what it says reaches `doctor` as a call's details), no torch.
"""

from fedlora_worker.tls.check import EXPIRY_WARNING, TlsCheck, check_tls
from fedlora_worker.tls.doctor import Handshake, HandshakeDoctor, classify, handshake
from fedlora_worker.tls.material import TlsFault, split_target
from fedlora_worker.tls.request import Request, make_request

__all__ = [
    "EXPIRY_WARNING",
    "Handshake",
    "HandshakeDoctor",
    "Request",
    "TlsCheck",
    "TlsFault",
    "check_tls",
    "classify",
    "handshake",
    "make_request",
    "split_target",
]
