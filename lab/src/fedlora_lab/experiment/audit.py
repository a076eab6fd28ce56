"""The audit of a run's final model at each site, one `fedlora-lab audit` process per site.

transformers' model loading is not thread-safe and runs go side by side in threads, so each audit
is isolated in a process; what comes back is the typed summary it wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fedlora_common.memorization import AuditSummary, audit_summary_from_json
from fedlora_lab.experiment.config import AuditSection

__all__ = ["audit_site", "with_tokenizer"]


def with_tokenizer(model_dir: Path, tokenizer_dir: Path, out: Path) -> Path:
    """A directory of links: a full fine-tuned model (saved without a tokenizer) plus the base's tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    for source in [*model_dir.iterdir(), *tokenizer_dir.glob("*token*"), *tokenizer_dir.glob("*.model")]:
        link = out / source.name
        if source.is_file() and not link.exists():
            link.symlink_to(source.resolve())
    return out


def audit_site(
    run_dir: Path,
    site: str,
    base: Path,
    adapter: Path | None,
    audit: AuditSection,
    deadline: float,
    *,
    frequency_penalty: float | None = None,
) -> AuditSummary:
    """Audit the final model on one site's canaries and controls (decoding with the audit's frequency penalty,
    or with `frequency_penalty`); RuntimeError says where the log is."""
    site_dir = run_dir / "sites" / site
    name = site if frequency_penalty is None else f"{site}-frequency-penalty-{frequency_penalty:g}"
    out = run_dir / "audit" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "fedlora_lab", "audit", "--base", str(base)]
    if adapter is not None:
        argv += ["--adapter", str(adapter)]
    for name in ("canaries.jsonl", "controls.jsonl"):
        if (site_dir / name).exists():
            argv += ["--records", str(site_dir / name)]
    plan = audit.plan(frequency_penalty)
    argv += ["--prefixes", ",".join(str(p) for p in plan.prefixes), "--candidates", str(plan.exposure_candidates)]
    argv += ["--frequency-penalty", str(plan.frequency_penalty)]
    argv += ["--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with (run_dir / "logs" / f"audit-{name}.log").open("wb") as log_file:
        completed = subprocess.run(
            argv, stdout=log_file, stderr=log_file, env=env, timeout=max(60.0, deadline - time.monotonic())
        )
    if completed.returncode != 0:
        raise RuntimeError(f"audit of {site} exited with code {completed.returncode}; see logs/audit-{name}.log")
    try:
        return audit_summary_from_json(json.loads(out.read_text(encoding="utf-8")))
    except ValueError as exc:
        raise RuntimeError(f"audit of {site}: {out}: {exc}") from None
