"""The run report: report.json (the contract DESIGN.md names), report.md and report.html with plots.

Built only from what the store holds, so a restarted coordinator reports the same run. The
markdown and HTML are one ``fedlora_server.document.Document``. Paths in the report are relative
to the state directory, which is where the report lies: `adapter_path` is "adapter" (None until a
trained round is committed), so a state directory moved or copied whole still reports truly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from fedlora_common.files import atomic_write
from fedlora_common.manifest import adapted_modules, module_leaves
from fedlora_server.artifacts import META_FILE
from fedlora_server.config import RunSettings
from fedlora_server.document import Align, Document, Figure, Table, figure_png, new_figure, write_document
from fedlora_server.journal import stop_request
from fedlora_server.memorization import combine_reports
from fedlora_server.privacy import ClientPrivacy
from fedlora_server.store import CoordinatorStore, MetricsRecord, RoundRecord
from fedlora_server.versions import ADAPTER_LINK

__all__ = ["build_report", "report_document", "write_reports"]

ROUND_FIELDS = (
    "round",
    "participants",
    "dropped",
    "excluded",
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
    failures = [r for r in store.rounds() if r.status == "failed"]
    run = store.load_run()
    return {
        "report_version": 1,
        "run_id": settings.run_id,
        "mode": settings.mode,
        "aggregation": settings.aggregation,
        "server_optimizer": None
        if settings.server_optimizer.name == "none"
        else settings.server_optimizer.model_dump(mode="json"),
        "secure_aggregation": settings.secure_aggregation.enabled,
        "base_model": settings.base_model,
        "lora": None
        if settings.mode == "full"
        else {
            "rank": settings.lora.rank,
            "alpha": settings.lora.alpha,
            "targets": list(settings.lora.target_modules),
            **_adapted(settings, store),
        },
        "workers": [
            {
                "id": w.worker_id,
                "num_examples": w.num_examples,
                "rank": w.rank or None,
                "base_precision": w.base_precision or None,
                "left": w.left_reason or None,
            }
            for w in store.workers()
        ],
        "adapter_path": ADAPTER_LINK if latest is not None and latest.round >= 1 else None,
        "base_eval_loss": base.eval_loss if base else None,
        "failure": run.failure or None if run is not None else None,
        "stopped": None if (stop := stop_request(store.events())) is None else (stop.reason or "by the operator"),
        "amendments": [
            {"at": e.at, "changes": [{"field": f, "old": o, "new": n} for f, o, n in json.loads(e.detail)]}
            for e in store.events()
            if e.kind == "amended"
        ],
        "failed_attempts": len(failures),
        "attempt_failures": [
            {"round": r.round, "attempt": r.attempt, "reason": r.failure, "excluded": list(r.excluded)}
            for r in failures
        ],
        "privacy": _privacy_section(settings, client),
        "rounds": [
            {
                "round": r.round,
                "participants": list(r.participants),
                "dropped": list(r.dropped),
                "excluded": list(r.excluded),
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


def _adapted(settings: RunSettings, store: CoordinatorStore) -> dict[str, Any]:
    """What the targets resolved to on the base model, read from the initial version's manifest (its
    lora_A/lora_B tensor names): `adapted_modules` by last name (q_proj, c_attn...), and how many modules.
    Both null before the initial version is committed (or when its manifest cannot be read)."""
    unknown: dict[str, Any] = {"adapted_modules": None, "adapted_count": None}
    artifacts = store.artifacts()
    if not artifacts:
        return unknown
    stored = Path(artifacts[0].path)  # relative to state_dir, or (older stores) absolute
    path = settings.state_dir / "artifacts" / stored.name if stored.is_absolute() else settings.state_dir / stored
    try:
        tensors = json.loads((path / META_FILE).read_text(encoding="utf-8"))["manifest"]
    except (OSError, ValueError, KeyError):
        return unknown
    modules = adapted_modules(t["name"] for t in tensors)
    return {"adapted_modules": list(module_leaves(modules)), "adapted_count": len(modules)}


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


def _site(worker: dict[str, Any]) -> str:
    """A site by id, with the rank and base precision it said it trains at, where it said them."""
    profile = [f"rank {worker['rank']}"] if worker.get("rank") else []
    profile += [worker["base_precision"]] if worker.get("base_precision") else []
    return f"{worker['id']} ({', '.join(profile)})" if profile else str(worker["id"])


def _run_table(report: dict[str, Any]) -> Table:
    """The run's settings as notes, then one row per round."""
    lora = report["lora"]
    notes = (
        f"mode: **{report['mode']}**, aggregation: **{report['aggregation']}**, "
        f"secure aggregation: **{'on' if report['secure_aggregation'] else 'off'}**"
        + (f", server optimizer: **{o['name']}** (lr {o['lr']:g})" if (o := report["server_optimizer"]) else ""),
        f"base model: `{report['base_model']}`"
        + (f"; LoRA rank {lora['rank']}, alpha {lora['alpha']}, targets {', '.join(lora['targets'])}" if lora else ""),
        *(
            [f"adapted: {', '.join(lora['adapted_modules'])} ({lora['adapted_count']} modules)"]
            if lora and lora["adapted_modules"]
            else []
        ),
        f"workers: {', '.join(_site(w) for w in report['workers'])}",
        f"base model held-out loss: **{_fmt(report['base_eval_loss'])}**",
        f"final adapter: `{report['adapter_path']}`",
        *([f"**run failed**: {report['failure']}"] if report["failure"] else []),
        *(f"worker {w['id']} left: {w['left']}" for w in report["workers"] if w["left"]),
        *(
            f"round {f['round']} attempt {f['attempt']} failed: {f['reason']}"
            + (f" (excluded: {', '.join(f['excluded'])})" if f["excluded"] else "")
            for f in report["attempt_failures"]
            if f["reason"]
        ),
    )
    columns = (
        "round",
        "participants",
        "dropped",
        "train loss",
        "eval loss",
        "up MiB",
        "down MiB",
        "seconds",
        "epsilon",
    )
    rows = tuple(
        (
            str(r["round"]),
            str(len(r["participants"])),
            str(len(r["dropped"])),
            _fmt(r["train_loss"]),
            _fmt(r["eval_loss"]),
            _mib(r["upload_bytes"]),
            _mib(r["download_bytes"]),
            _fmt(r["duration_s"], 1),
            _fmt(r["epsilon"], 2),
        )
        for r in report["rounds"]
    )
    right: Align = "right"
    return Table(columns=columns, rows=rows, notes=notes, align=(right,) * len(columns))


def _privacy_table(report: dict[str, Any]) -> Table | None:
    p = report["privacy"]
    notes = []
    if p["client_level"]:
        c = p["client_level"]
        notes.append(
            f"client-level DP: {c['mechanism']}; noise multiplier {c['noise_multiplier']:.3f}, clip {c['clip_norm']}, "
            f"delta {c['delta']:g}; {c['trust']}"
        )
    if p["record_level"]:
        r = p["record_level"]
        notes.append(
            f"record-level DP: {r['mechanism']}; noise multiplier {r['noise_multiplier']}, "
            f"clip {r['max_grad_norm']}, delta {r['delta']:g}"
        )
    if p["goldfish"]:
        g = p["goldfish"]
        notes.append(f"Goldfish loss: k = {g['k']}, h = {g['h']}")
    return Table(title="Privacy", notes=tuple(notes)) if notes else None


_GROUPS: Final = ("10x", "1x", "control")
_MEMORIZATION_COLUMNS: Final = (
    "round",
    "group",
    "canaries",
    "exact match",
    "approx match",
    "token accuracy",
    "PII extracted",
    "exposure (bits)",
)


def _memorization_table(report: dict[str, Any]) -> Table | None:
    audited = [r for r in report["rounds"] if r["memorization"]]
    if not audited:
        return None
    rows = []
    for r in audited:
        for group in _GROUPS:
            g = r["memorization"]["by_duplication"].get(group)
            if g is None:
                continue
            rows.append(
                (
                    str(r["round"]),
                    group,
                    str(g["count"]),
                    _fmt(g["exact_match_rate"], 3),
                    _fmt(g["approx_match_rate"], 3),
                    _fmt(g["token_accuracy"], 3),
                    _fmt(g["pii_extraction_rate"], 3),
                    _fmt(g["mean_exposure"], 2),
                )
            )
    return Table(
        title="Memorization (canary audit; control = same format, never trained on)",
        columns=_MEMORIZATION_COLUMNS,
        rows=tuple(rows),
        align=("right", None, *("right",) * 6),
    )


def _plots(report: dict[str, Any]) -> tuple[Figure, Figure]:
    rounds = [r["round"] for r in report["rounds"]]
    fig = new_figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(rounds, [r["train_loss"] for r in report["rounds"]], marker="o", label="train loss")
    ax.plot(rounds, [r["eval_loss"] for r in report["rounds"]], marker="s", label="held-out loss")
    if report["base_eval_loss"] is not None:
        ax.axhline(report["base_eval_loss"], linestyle="--", color="grey", label="base model")
    ax.set(xlabel="round", ylabel="loss (nats/token)", title="Loss per round")
    ax.legend()
    loss = Figure("loss per round", "loss.png", figure_png(fig))
    fig = new_figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.bar([x - 0.2 for x in rounds], [r["upload_bytes"] / 2**20 for r in report["rounds"]], 0.4, label="up")
    ax.bar([x + 0.2 for x in rounds], [r["download_bytes"] / 2**20 for r in report["rounds"]], 0.4, label="down")
    ax.set(xlabel="round", ylabel="MiB (all workers)", title="Bytes on the wire per round")
    ax.legend()
    return loss, Figure("bytes per round", "bytes.png", figure_png(fig))


def report_document(report: dict[str, Any]) -> Document:
    """report.json as a document: settings and rounds, privacy, memorization, then the two plots."""
    sections = [_run_table(report), _privacy_table(report), _memorization_table(report)]
    return Document(
        title=f"FedLoRA run `{report['run_id']}`",
        blocks=(*(s for s in sections if s is not None), *_plots(report)),
    )


def write_reports(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write report.json, report.md, report.html and the PNG plots; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "report.json", json.dumps(report, indent=2, allow_nan=False).encode())
    return [out_dir / "report.json", *write_document(report_document(report), out_dir)]
