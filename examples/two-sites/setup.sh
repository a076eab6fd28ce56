#!/bin/sh
# examples/two-sites/setup.sh OUT_DIR: everything the two-site example needs, in OUT_DIR.
#   - each site's identity key, bearer token and client certificate, a CA and the coordinator's
#     certificate, and run.yaml, worker-a.yaml and worker-b.yaml with the allow-list and peers filled in
#     (deploy/provision.sh; SANS=name,address adds what the sites dial to the coordinator's certificate);
#   - unless OUT_DIR has them: the tiny lab base model (base-model/) and one data set per site
#     (data/site-a: clinical records, data/site-b: legal records), made by fedlora-lab.
# Then, in OUT_DIR:  fedlora-server --config run.yaml   and   fedlora-worker --config worker-a.yaml (and b).
# fedlora-server, fedlora-worker and fedlora-lab must be on PATH (`. .venv/bin/activate` after `make install`).
set -eu
[ $# -eq 1 ] || {
    echo "usage: $0 OUT_DIR" >&2
    exit 2
}
here=$(cd "$(dirname "$0")" && pwd)
out=$1
mkdir -p "$out"
sh "$here/../../deploy/provision.sh" "$here" "$out" site-a site-b
[ -f "$out/base-model/config.json" ] || fedlora-lab make-model "$out/base-model" --size tiny
[ -f "$out/data/site-a/train.jsonl" ] || fedlora-lab make-data "$out/data/site-a" --domain clinical --records 60
[ -f "$out/data/site-b/train.jsonl" ] || fedlora-lab make-data "$out/data/site-b" --domain legal --records 60 --seed 1
echo "setup: done; in $out run: fedlora-server --config run.yaml, fedlora-worker --config worker-a.yaml, fedlora-worker --config worker-b.yaml"
