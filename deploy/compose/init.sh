#!/bin/sh
# The compose stack's one-shot `init` service (worker image, as uid 10001):
#   1. the lab base model at /data/base-model and one data set per site at /data/<site> (kept if there);
#   2. identities, tokens, certificates and the rendered configs at /etc/fedlora (the `config` volume),
#      by deploy/provision.sh from the templates beside this file (kept if there: a second `up` reuses them).
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
ls -l "$data" "$config"
