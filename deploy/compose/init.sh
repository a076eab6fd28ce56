#!/bin/sh
# The compose stack's one-shot `init` service (worker image, as uid 10001):
#   1. the lab base model at /data/base-model and one data set per site at /data/<site> (kept if there);
#   2. identities, tokens, certificates and the rendered configs at /etc/fedlora (the `config` volume),
#      by deploy/provision.sh from the templates beside this file (kept if there: a second `up` reuses them);
#   3. Grafana's admin password at /etc/fedlora/grafana/admin-password (kept if there): 48 random hex
#      characters. Grafana mounts only that directory (as /run/secrets/grafana) and runs as its own user,
#      so the directory is 0755 and the file 0644; Grafana sees nothing else of the volume.
# FEDLORA_DATA_DIR and FEDLORA_CONFIG_DIR move both places (the test suite runs this script that way).
set -eu
here=$(dirname "$0")
data=${FEDLORA_DATA_DIR:-/data}
config=${FEDLORA_CONFIG_DIR:-/etc/fedlora}
sites="clinical legal finance"
[ -f "$data/base-model/config.json" ] || fedlora-lab make-model "$data/base-model"
for site in $sites; do
    [ -f "$data/$site/train.jsonl" ] || fedlora-lab make-data "$data/$site" --domain "$site"
done
# shellcheck disable=SC2086 # the site list is split on purpose
sh "$here/../provision.sh" "$here" "$config" $sites
grafana="$config/grafana"
if [ ! -s "$grafana/admin-password" ]; then
    mkdir -p "$grafana"
    chmod 0755 "$grafana"
    od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$grafana/admin-password.tmp"
    chmod 0644 "$grafana/admin-password.tmp"
    mv "$grafana/admin-password.tmp" "$grafana/admin-password"
    echo "init: Grafana's admin password written: docker compose exec grafana cat /run/secrets/grafana/admin-password"
fi
ls -l "$data" "$config"
