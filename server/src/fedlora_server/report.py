"""The run report: report.json (the contract DESIGN.md names), report.md and report.html with plots.

Built only from what the store holds, so a restarted coordinator reports the same run.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedlora_common.files import atomic_write
from fedlora_server.config import RunSettings
from fedlora_server.memorization import combine_reports
from fedlora_server.privacy import ClientPrivacy
from fedlora_server.store import CoordinatorStore, MetricsRecord, RoundRecord

__all__ = ["build_report", "figure_png", "markdown_to_html", "render_markdown", "write_reports"]

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


def _round_privacy(
    settings: RunSettings, client: ClientPrivacy | None, reports: Sequence[MetricsRecord], round_: int
) -> dict[str, Any]:
    """epsilon/delta: client level when DP-FedAvg is on, else the largest site's record-level spend."""
    spent = [m.record_epsilon for m in reports if m.record_epsilon is not None]
    record = max(spent) if spent else None
    record_dp = settings.privacy.record_dp
    if client is not None:
        epsilon, delta = client.epsilon_after(round_), client.delta
    elif record is not None and record_dp is not None:
        epsilon, delta = record, record_dp.delta
    else:
        epsilon, delta = None, None
    return {"epsilon": epsilon, "delta": delta, "record_epsilon": record}


def _privacy_section(settings: RunSettings, client: ClientPrivacy | None) -> dict[str, Any]:
    p = settings.privacy
    record = None
    if p.record_dp is not None:
        record = {
            "mechanism": "DP-SGD (Opacus, Poisson sampling, per-sample clipping), PLD accountant, per site",
            **p.record_dp.model_dump(),
        }
    return {
        "client_level": client.describe() if client else None,
        "record_level": record,
        "goldfish": p.goldfish.model_dump() if p.goldfish else None,
    }


def build_report(settings: RunSettings, store: CoordinatorStore) -> dict[str, Any]:
    rounds = _final_attempts(store.rounds())
    client = ClientPrivacy.from_settings(settings)
    reports = {number: store.metrics(number) for number in rounds}
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
        "privacy": _privacy_section(settings, client),
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
                **_round_privacy(settings, client, reports[number], number),
                "memorization": _memorization(reports[number]),
                "secagg": json.loads(r.secagg) if r.secagg else None,
            }
            for number, r in sorted(rounds.items())
            if number > 0
        ],
    }


def _memorization(reports: list[MetricsRecord]) -> dict[str, Any] | None:
    combined = combine_reports(reports)
    return None if combined is None else combined.to_json()


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
    lines += _privacy_lines(report)
    lines += _memorization_lines(report)
    return "\n".join(lines) + "\n"


def _privacy_lines(report: dict[str, Any]) -> list[str]:
    p = report["privacy"]
    lines = []
    if p["client_level"]:
        c = p["client_level"]
        lines.append(
            f"- client-level DP: {c['mechanism']}; noise multiplier {c['noise_multiplier']:.3f}, clip {c['clip_norm']}, "
            f"delta {c['delta']:g}; {c['trust']}"
        )
    if p["record_level"]:
        r = p["record_level"]
        lines.append(
            f"- record-level DP: {r['mechanism']}; noise multiplier {r['noise_multiplier']}, "
            f"clip {r['max_grad_norm']}, delta {r['delta']:g}"
        )
    if p["goldfish"]:
        g = p["goldfish"]
        lines.append(f"- Goldfish loss: k = {g['k']}, h = {g['h']}")
    return ["", "## Privacy", "", *lines] if lines else []


_GROUPS = ("10x", "1x", "control")


def _memorization_lines(report: dict[str, Any]) -> list[str]:
    audited = [r for r in report["rounds"] if r["memorization"]]
    if not audited:
        return []
    lines = [
        "",
        "## Memorization (canary audit; control = same format, never trained on)",
        "",
        "| round | group | canaries | exact match | approx match | token accuracy | PII extracted | exposure (bits) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in audited:
        for group in _GROUPS:
            g = r["memorization"]["by_duplication"].get(group)
            if g is None:
                continue
            lines.append(
                f"| {r['round']} | {group} | {g['count']} | {_fmt(g['exact_match_rate'], 3)} "
                f"| {_fmt(g['approx_match_rate'], 3)} | {_fmt(g['token_accuracy'], 3)} "
                f"| {_fmt(g['pii_extraction_rate'], 3)} | {_fmt(g['mean_exposure'], 2)} |"
            )
    return lines


def _inline(text: str) -> str:
    """Escape, then render `code` and **bold**, the only inline markup the report uses."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def markdown_to_html(markdown: str) -> str:
    """The report's own markdown (headings, bullets, pipe tables) as HTML, so tables are real tables."""
    parts: list[str] = []
    table: list[list[str]] = []

    def flush() -> None:
        if table:
            head, *body = table
            parts.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>")
            parts.extend("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body)
            parts.append("</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set(":-") for c in cells):
                table.append(cells)
            continue
        flush()
        level = len(line) - len(line.lstrip("#"))
        if 0 < level <= 6 and line[level : level + 1] == " ":
            parts.append(f"<h{level}>{_inline(line[level + 1 :])}</h{level}>")
        elif line.startswith("- "):
            parts.append(f"<p>&bull; {_inline(line[2:])}</p>")
        elif line.strip():
            parts.append(f"<p>{_inline(line)}</p>")
    flush()
    return "\n".join(parts)


def _plot_png(report: dict[str, Any]) -> tuple[bytes, bytes]:
    rounds = [r["round"] for r in report["rounds"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(rounds, [r["train_loss"] for r in report["rounds"]], marker="o", label="train loss")
    ax.plot(rounds, [r["eval_loss"] for r in report["rounds"]], marker="s", label="held-out loss")
    if report["base_eval_loss"] is not None:
        ax.axhline(report["base_eval_loss"], linestyle="--", color="grey", label="base model")
    ax.set(xlabel="round", ylabel="loss (nats/token)", title="Loss per round")
    ax.legend()
    loss_png = figure_png(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([x - 0.2 for x in rounds], [r["upload_bytes"] / 2**20 for r in report["rounds"]], 0.4, label="up")
    ax.bar([x + 0.2 for x in rounds], [r["download_bytes"] / 2**20 for r in report["rounds"]], 0.4, label="down")
    ax.set(xlabel="round", ylabel="MiB (all workers)", title="Bytes on the wire per round")
    ax.legend()
    return loss_png, figure_png(fig)


def figure_png(fig: Any) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it (figures are never left open)."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


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
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em}"
        "td{text-align:right}</style>"
        f"{markdown_to_html(markdown)}{images}"
    )
    files["report.html"] = page.encode()
    written = []
    for name, data in files.items():
        atomic_write(out_dir / name, data)
        written.append(out_dir / name)
    return written
