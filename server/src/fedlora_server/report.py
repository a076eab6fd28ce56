"""The run report: report.json (the contract DESIGN.md names), report.md and report.html with plots.

Built only from what the store holds, so a restarted coordinator reports the same run.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedlora_server.config import RunSettings
from fedlora_server.store import CoordinatorStore, RoundRecord

__all__ = ["build_report", "render_markdown", "write_reports"]

ROUND_FIELDS = (
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
)


def _final_attempts(records: list[RoundRecord]) -> dict[int, RoundRecord]:
    """The last attempt of each round (earlier attempts failed and were retried)."""
    out: dict[int, RoundRecord] = {}
    for record in records:
        out[record.round] = record
    return out


def build_report(settings: RunSettings, store: CoordinatorStore) -> dict[str, Any]:
    rounds = _final_attempts(store.rounds())
    base = rounds.get(0)
    latest = store.latest_artifact()
    failed = sum(1 for r in store.rounds() if r.status == "failed")
    return {
        "report_version": 1,
        "run_id": settings.run_id,
        "mode": settings.mode,
        "aggregation": settings.aggregation,
        "secure_aggregation": settings.secure_aggregation.enabled,
        "base_model": settings.base_model,
        "lora": None
        if settings.mode == "full"
        else {
            "rank": settings.lora.rank,
            "alpha": settings.lora.alpha,
            "targets": list(settings.lora.target_modules),
        },
        "workers": [{"id": w.worker_id, "num_examples": w.num_examples} for w in store.workers()],
        "adapter_path": str((settings.state_dir / "adapter").absolute()) if latest else None,
        "base_eval_loss": base.eval_loss if base else None,
        "failed_attempts": failed,
        "rounds": [
            {
                "round": r.round,
                "participants": list(r.participants),
                "dropped": list(r.dropped),
                "train_loss": r.train_loss,
                "eval_loss": r.eval_loss,
                "upload_bytes": r.upload_bytes,
                "download_bytes": r.download_bytes,
                "duration_s": None if r.finished_at is None else round(r.finished_at - r.started_at, 3),
                "epsilon": None,
                "delta": None,
                "memorization": None,
                "secagg": json.loads(r.secagg) if r.secagg else None,
            }
            for number, r in sorted(rounds.items())
            if number > 0
        ],
    }


def _fmt(value: object, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f}"


def render_markdown(report: dict[str, Any]) -> str:
    lora = report["lora"]
    lines = [
        f"# FedLoRA run `{report['run_id']}`",
        "",
        f"- mode: **{report['mode']}**, aggregation: **{report['aggregation']}**, "
        f"secure aggregation: **{'on' if report['secure_aggregation'] else 'off'}**",
        f"- base model: `{report['base_model']}`"
        + (f"; LoRA rank {lora['rank']}, alpha {lora['alpha']}, targets {', '.join(lora['targets'])}" if lora else ""),
        f"- workers: {', '.join(w['id'] for w in report['workers'])}",
        f"- base model held-out loss: **{_fmt(report['base_eval_loss'])}**",
        f"- final adapter: `{report['adapter_path']}`",
        "",
        "| round | participants | dropped | train loss | eval loss | up MiB | down MiB | seconds | epsilon |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rounds"]:
        lines.append(
            f"| {r['round']} | {len(r['participants'])} | {len(r['dropped'])} | {_fmt(r['train_loss'])} "
            f"| {_fmt(r['eval_loss'])} | {_mib(r['upload_bytes'])} | {_mib(r['download_bytes'])} "
            f"| {_fmt(r['duration_s'], 1)} | {_fmt(r['epsilon'], 2)} |"
        )
    return "\n".join(lines) + "\n"


def _plot_png(report: dict[str, Any]) -> tuple[bytes, bytes]:
    rounds = [r["round"] for r in report["rounds"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(rounds, [r["train_loss"] for r in report["rounds"]], marker="o", label="train loss")
    ax.plot(rounds, [r["eval_loss"] for r in report["rounds"]], marker="s", label="held-out loss")
    if report["base_eval_loss"] is not None:
        ax.axhline(report["base_eval_loss"], linestyle="--", color="grey", label="base model")
    ax.set(xlabel="round", ylabel="loss (nats/token)", title="Loss per round")
    ax.legend()
    loss_png = _to_png(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([x - 0.2 for x in rounds], [r["upload_bytes"] / 2**20 for r in report["rounds"]], 0.4, label="up")
    ax.bar([x + 0.2 for x in rounds], [r["download_bytes"] / 2**20 for r in report["rounds"]], 0.4, label="down")
    ax.set(xlabel="round", ylabel="MiB (all workers)", title="Bytes on the wire per round")
    ax.legend()
    return loss_png, _to_png(fig)


def _to_png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_reports(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write report.json, report.md, report.html and the PNG plots; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(report)
    loss_png, bytes_png = _plot_png(report)
    files = {
        "report.json": json.dumps(report, indent=2).encode(),
        "report.md": markdown.encode(),
        "loss.png": loss_png,
        "bytes.png": bytes_png,
    }
    images = "".join(
        f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        for name, png in (("loss per round", loss_png), ("bytes per round", bytes_png))
    )
    page = (
        "<!doctype html><meta charset='utf-8'><title>FedLoRA report</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em}</style>"
        f"<pre>{html.escape(markdown)}</pre>{images}"
    )
    files["report.html"] = page.encode()
    written = []
    for name, data in files.items():
        _atomic_write(out_dir / name, data)
        written.append(out_dir / name)
    return written
