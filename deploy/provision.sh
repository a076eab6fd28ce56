#!/bin/sh
# Provision a federation's identities and configs on one machine (a demo, the compose stack's init step,
# and examples/two-sites/setup.sh all use it):
#
#   deploy/provision.sh TEMPLATES_DIR OUT_DIR SITE [SITE ...]
#
# For each SITE (a worker id), unless OUT_DIR already holds them:
#   OUT_DIR/identities/SITE.key, SITE.pub  its Ed25519 identity (`fedlora-worker keygen`; .key is 0600)
#   OUT_DIR/tokens/SITE.token              its bearer token (64 hex characters, no newline, 0600)
#   OUT_DIR/tls/                           a CA, the coordinator's certificate and one per site
#                                          (`fedlora-server certs`; SANS adds names/addresses workers dial)
# Then every TEMPLATES_DIR/*.yaml is written to OUT_DIR with REPLACE_<SITE>_TOKEN_SHA256 and
# REPLACE_<SITE>_IDENTITY_PUBLIC filled in (SITE upper-cased, . and - as _): the allow-list of run.yaml
# and every worker's peers. A placeholder left over stops the script.
#
# In a real federation each site runs `fedlora-worker keygen` and makes its token itself, and sends the
# coordinator only the public key and `sha256sum` of its token: private keys never leave a site.
# fedlora-server and fedlora-worker must be on PATH.
set -eu

usage() {
    echo "usage: $0 TEMPLATES_DIR OUT_DIR SITE [SITE ...]" >&2
    exit 2
}
[ $# -ge 3 ] || usage
templates=$1
out=$2
shift 2

umask 077
mkdir -p "$out/identities" "$out/tokens"
sites=""
certs_needed=""
for site in "$@"; do
    case $site in
    *[!A-Za-z0-9._-]* | "" | ca | coordinator)
        echo "provision: '$site' is not a usable worker id ([A-Za-z0-9._-], not ca or coordinator)" >&2
        exit 2
        ;;
    esac
    sites="${sites:+$sites,}$site"
    if [ ! -s "$out/identities/$site.key" ]; then
        rm -f "$out/identities/$site.key"
        fedlora-worker keygen --out "$out/identities/$site.key" >"$out/identities/$site.pub"
        echo "provision: identity of $site: $(cat "$out/identities/$site.pub")"
    fi
    if [ ! -s "$out/tokens/$site.token" ]; then
        od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$out/tokens/$site.token"
        echo "provision: token of $site written"
    fi
    [ -s "$out/tls/$site.crt" ] || certs_needed=yes
done
if [ -n "$certs_needed" ] || [ ! -s "$out/tls/coordinator.crt" ]; then
    fedlora-server certs --out "$out/tls" --workers "$sites" ${SANS:+--san "$SANS"}
fi

rendered=0
for template in "$templates"/*.yaml; do
    [ -f "$template" ] || continue
    target="$out/$(basename "$template")"
    script=""
    for site in "$@"; do
        name=$(printf '%s' "$site" | tr 'a-z.-' 'A-Z__')
        token_sha256=$(sha256sum "$out/tokens/$site.token" | cut -d' ' -f1)
        public=$(tr -d ' \n' <"$out/identities/$site.pub")
        script="${script}s/REPLACE_${name}_TOKEN_SHA256/${token_sha256}/g;s/REPLACE_${name}_IDENTITY_PUBLIC/${public}/g;"
    done
    sed -e "$script" "$template" >"$target.tmp"
    if grep -nE 'REPLACE_[A-Z0-9_]+_(TOKEN_SHA256|IDENTITY_PUBLIC)' "$target.tmp" >&2; then
        rm -f "$target.tmp"
        echo "provision: $template names a site not given ($*)" >&2
        exit 2
    fi
    chmod 0644 "$target.tmp"
    mv "$target.tmp" "$target"
    rendered=$((rendered + 1))
done
[ "$rendered" -gt 0 ] || {
    echo "provision: no *.yaml templates in $templates" >&2
    exit 2
}
echo "provision: $rendered configs written to $out"
