"""examples/two-sites laid out as its setup.sh leaves it, for the tests that run it (loopback, namespaces)."""

from __future__ import annotations

from pathlib import Path

from fedlora_lab.datagen import DataSpec, generate_site, write_site
from fedlora_lab.model_factory import MadeModel
from tests.deploy.support import REPO, run_program

EXAMPLE = REPO / "examples" / "two-sites"
SITES = {"site-a": ("worker-a.yaml", "clinical"), "site-b": ("worker-b.yaml", "legal")}
"""Each site's worker id: its config and the lab domain of its records."""


def prepare_example(out: Path, lab_model: MadeModel, *, sans: str = "") -> str:
    """The example's directory as setup.sh leaves it, with the session's tiny model and small site data.

    `sans`: what the sites dial besides localhost, for the coordinator's certificate (setup.sh's SANS).
    """
    (out / "base-model").symlink_to(lab_model.path, target_is_directory=True)
    for seed, (site, (_, domain)) in enumerate(SITES.items()):
        spec = DataSpec(n_train=24, n_eval=4, n_canaries=2, n_controls=2, seed=seed)
        write_site(out / "data" / site, generate_site(domain, spec))
    setup = run_program(["sh", str(EXAMPLE / "setup.sh"), str(out)], timeout=300, env={"SANS": sans} if sans else {})
    assert setup.returncode == 0, setup.stderr
    return setup.stdout
