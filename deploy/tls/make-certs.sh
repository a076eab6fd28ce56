#!/bin/sh
# Kept for existing scripts: `fedlora-server certs` makes the same files (in Python, with cryptography).
#
#   deploy/tls/make-certs.sh OUT_DIR WORKER_ID [WORKER_ID ...]
#   = fedlora-server certs --out OUT_DIR --workers WORKER_ID,... [--san "$EXTRA_SANS"] [--days "$DAYS"]
#
# OUT_DIR/ca.{crt,key} (kept if there, so sites can be added later), coordinator.{crt,key} (SANs:
# coordinator, localhost, 127.0.0.1 and EXTRA_SANS, e.g. "DNS:fedlora.example.org,IP:10.0.0.5"; also valid
# for client authentication, for the health check), and WORKER_ID.{crt,key} with CN = the worker id.
set -eu
if [ $# -lt 2 ]; then
    echo "usage: $(basename "$0") OUT_DIR WORKER_ID [WORKER_ID ...]" >&2
    exit 2
fi
out=$1
shift
workers=$(printf '%s,' "$@")
exec fedlora-server certs --out "$out" --workers "${workers%,}" ${EXTRA_SANS:+--san "$EXTRA_SANS"} --days "${DAYS:-365}"
