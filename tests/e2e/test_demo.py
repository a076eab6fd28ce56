"""`fedlora-lab demo` end to end: a coordinator and three workers as OS processes on 127.0.0.1.

Run once (small model, few steps); while it runs, both kinds of metrics endpoint are scraped.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

REQUIRED = {
    "run_id",
    "mode",
    "aggregation",
    "secure_aggregation",
    "base_model",
    "lora",
    "workers",
    "adapter_path",
    "base_eval_loss",
    "rounds",
}
ROUND_FIELDS = {
    "round",
    "participants",
    "dropped",
    "train_loss",
    "eval_loss",
    "upload_bytes",
    "download_bytes",
    "duration_s",
    "epsilon",
    "delta",
    "memorization",
}


def _metrics_ports(logs: Path) -> dict[str, int]:
    ports: dict[str, int] = {}
    for log in logs.glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            if event.get("event") == "coordinator_listening" and event.get("metrics_port"):
                ports[log.stem] = event["metrics_port"]
            elif event.get("event") == "metrics_listening":
                ports[log.stem] = event["port"]
    return ports


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


@pytest.mark.slow
def test_private_demo_runs_a_federation_of_processes_reports_epsilon_and_memorization(
    tmp_path: Path, lab_cache: Path
) -> None:
    out = tmp_path / "demo"
    command = [
        sys.executable,
        "-m",
        "fedlora_lab",
        "demo",
        "--out",
        str(out),
        "--rounds",
        "2",
        "--workers",
        "3",
        "--local-steps",
        "4",
        "--records",
        "24",
        "--canaries",
        "4",
        "--controls",
        "2",
        "--model-size",
        "tiny",
        "--cache-dir",
        str(lab_cache),
        # The README's private flag set: client-level DP with a target epsilon, and Goldfish loss.
        "--dp-epsilon",
        "8",
        "--goldfish",
    ]
    demo = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    scraped: dict[str, str] = {}
    deadline = time.monotonic() + 600
    while demo.poll() is None and time.monotonic() < deadline:
        for name, port in _metrics_ports(out / "logs").items() if (out / "logs").exists() else []:
            if name not in scraped:
                with contextlib.suppress(OSError):
                    scraped[name] = _scrape(port)
        time.sleep(0.2)
    stdout, stderr = demo.communicate(timeout=60)

    assert demo.returncode == 0, stderr[-3000:]
    assert "| round |" in stdout
    assert set(scraped) == {"coordinator", "clinical", "legal", "finance"}
    assert "fedlora_rounds_started_total" in scraped["coordinator"]
    assert "fedlora_workers_connected" in scraped["coordinator"]
    assert all("fedlora_worker_training_steps_total" in scraped[w] for w in ("clinical", "legal", "finance"))
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= REQUIRED
    assert len(report["rounds"]) == 2
    assert all(set(r) >= ROUND_FIELDS for r in report["rounds"])
    epsilons = [r["epsilon"] for r in report["rounds"]]
    assert 0 < epsilons[0] < epsilons[1] <= 8.0
    assert all(r["delta"] == 1e-5 for r in report["rounds"])
    assert report["privacy"]["client_level"]["placement"] == "distributed"
    assert report["privacy"]["goldfish"]["k"] == 4
    assert all(r["memorization"]["by_duplication"]["control"]["count"] > 0 for r in report["rounds"])
    assert "## Memorization" in stdout
    assert (out / "report.md").exists()
    assert (out / "report.html").read_text().count("data:image/png") == 2
    for log in ("coordinator", "clinical", "legal", "finance"):
        assert (out / "logs" / f"{log}.log").stat().st_size > 0
    base = AutoModelForCausalLM.from_pretrained(out / "base-model")
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base-model"), out / "adapter")
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.inference_mode():
        assert not torch.allclose(base(input_ids=ids).logits, tuned(input_ids=ids).logits, atol=1e-4)
