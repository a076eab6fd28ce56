#!/usr/bin/env bash
# Make a private CA, a coordinator server certificate and one client certificate per worker, for
# (mutual) TLS between fedlora-server and fedlora-worker.
#
#   OUT_DIR/ca.crt, ca.key                 the CA (reused if OUT_DIR already holds one, so workers can be
#                                          added later; keep ca.key offline in production)
#   OUT_DIR/coordinator.crt, .key          server cert, SANs: coordinator, localhost, 127.0.0.1 (+ EXTRA_SANS);
#                                          also valid as a client cert, so the container health check can
#                                          present it to a coordinator that requires mTLS
#   OUT_DIR/<worker_id>.crt, .key          client cert per worker, CN = worker id (as in run.yaml's allow-list)
#
# Environment: DAYS (validity, default 365), EXTRA_SANS (e.g. "DNS:fedlora.example.org,IP:10.0.0.5").
set -euo pipefail

usage() {
    echo "usage: $(basename "$0") OUT_DIR WORKER_ID [WORKER_ID ...]" >&2
    exit 2
}

[[ $# -ge 2 ]] || usage
case "$1" in -h | --help) usage ;; esac

out=$1
shift
days=${DAYS:-365}
extra_sans=${EXTRA_SANS:-}

for id in "$@"; do
    if [[ ! $id =~ ^[A-Za-z0-9._-]{1,128}$ ]]; then
        echo "make-certs: worker id '$id' must match [A-Za-z0-9._-]{1,128}" >&2
        exit 2
    fi
    if [[ $id == ca || $id == coordinator ]]; then
        echo "make-certs: worker id '$id' would overwrite the $id files" >&2
        exit 2
    fi
done

mkdir -p "$out"
umask 077
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# sign NAME SUBJECT EXTENSIONS: a key and certificate OUT_DIR/NAME.{key,crt} signed by the CA.
sign() {
    local name=$1 subject=$2 extensions=$3
    new_key "$out/$name.key"
    openssl req -new -key "$out/$name.key" -subj "$subject" -out "$work/$name.csr"
    printf '%s\n' "$extensions" >"$work/$name.ext"
    openssl x509 -req -in "$work/$name.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days "$days" -sha256 \
        -extfile "$work/$name.ext" -out "$out/$name.crt" 2>/dev/null
    chmod 644 "$out/$name.crt"
    echo "wrote $out/$name.crt ($subject)"
}

if [[ -f $out/ca.key && -f $out/ca.crt ]]; then
    echo "reusing CA $out/ca.crt"
else
    new_key "$out/ca.key"
    openssl req -x509 -new -key "$out/ca.key" -subj "/O=FedLoRA/CN=FedLoRA demo CA" -days "$((days * 3))" \
        -sha256 -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" -out "$out/ca.crt"
    chmod 644 "$out/ca.crt"
    echo "wrote $out/ca.crt"
fi

sans="DNS:coordinator,DNS:localhost,IP:127.0.0.1${extra_sans:+,$extra_sans}"
sign coordinator "/O=FedLoRA/CN=coordinator" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$sans
authorityKeyIdentifier=keyid
subjectKeyIdentifier=hash"

for id in "$@"; do
    sign "$id" "/O=FedLoRA/CN=$id" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
authorityKeyIdentifier=keyid
subjectKeyIdentifier=hash"
done

echo "keys are mode 0600; containers running as uid 10001 need to read them (see deploy/README.md)"
