"""The generated data is pinned byte for byte: a template change is a data change, and says so here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fedlora_lab.datagen import DOMAINS, DataSpec, generate_site, pretraining_corpus, write_site

# Computed from the single-module datagen before its templates moved to fedlora_lab.templates.
# Bump it only with a change that is meant to alter the records (and the lab model's cache version).
DIGEST = "59f98dabd4dc6e46a46e8ae8519d2fcc6103219e3acd3e92a5b70981176e953b"


def test_site_files_and_pretraining_corpus_match_the_pinned_digest(tmp_path: Path) -> None:
    # Prepare
    specs = (DataSpec(n_train=40, n_eval=8, n_canaries=10, n_controls=6, frac_10x=0.3, seed=7), DataSpec())
    digest = hashlib.sha256()

    # Execute
    for index, spec in enumerate(specs):
        for domain in DOMAINS:
            paths = write_site(tmp_path / f"{index}-{domain}", generate_site(domain, spec))
            for path in (paths.train, paths.eval, paths.canaries, paths.controls, paths.manifest):
                digest.update(path.read_bytes())
    digest.update(json.dumps(pretraining_corpus(300, seed=3)).encode())

    # Assert
    assert digest.hexdigest() == DIGEST
