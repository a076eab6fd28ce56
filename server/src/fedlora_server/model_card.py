"""The model card (README.md) an export carries: how the model was trained, by whom, under what privacy.

Pure: rendered from the run's report (report.json, built from the store) and its settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from fedlora_server.config import RunSettings

__all__ = ["CARD_NAME", "ExportedVersion", "model_card"]

CARD_NAME = "README.md"

MODES: Final = {
    "lora": "LoRA on a float base",
    "qlora": "QLoRA: LoRA on a 4-bit NF4 base",
    "full": "full fine-tuning (every weight)",
}
AGGREGATIONS: Final = {
    "fedavg": "FedAvg, A and B averaged separately",
    "ffa": "FFA-LoRA, A frozen at a seeded random init shared by every site, only B trained and averaged",
}
GROUPS: Final = ("control", "1x", "10x")


@dataclass(frozen=True)
class ExportedVersion:
    version: int
    round: int
    sha256: str
    size_bytes: int


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _front_matter(report: dict[str, Any]) -> list[str]:
    library = "transformers" if report["mode"] == "full" else "peft"
    kind = "full-fine-tuning" if report["mode"] == "full" else report["mode"]
    return [
        "---",
        f"library_name: {library}",
        f"base_model: {report['base_model']}",
        f"tags: [fedlora, federated-learning, {kind}]",
        "---",
        "",
    ]


def _loading(report: dict[str, Any], load_path: str) -> list[str]:
    base = report["base_model"]
    if report["mode"] == "full":
        return [
            "## How to load",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{load_path}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")  # the base model\'s',
            "```",
            "",
        ]
    return [
        "## How to load",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(base, "{load_path}")',
        "```",
        "",
        f"`fedlora-lab merge --base {base} --adapter {load_path} --out merged` merges the adapter into the base:",
        'a model that loads alone with `AutoModelForCausalLM.from_pretrained("merged")`.',
        "",
    ]


def _aggregation(report: dict[str, Any]) -> str:
    how = "FedAvg, every weight averaged" if report["mode"] == "full" else AGGREGATIONS[report["aggregation"]]
    # DP-FedAvg averages unweighted: an example count would scale a site's influence past the clip.
    weights = "unweighted (client-level DP)" if report["privacy"]["client_level"] else "weighted by examples"
    return f"{how}, {weights} (`{report['aggregation']}`)"


def _training(report: dict[str, Any], settings: RunSettings, exported: ExportedVersion) -> list[str]:
    t = settings.training
    rows = [("base model", f"`{report['base_model']}`"), ("mode", f"{MODES[report['mode']]} (`{report['mode']}`)")]
    lora = report["lora"]
    if lora is not None:
        rows.append(
            (
                "LoRA",
                f"rank {lora['rank']}, alpha {lora['alpha']}, dropout {settings.lora.dropout}, "
                f"targets {', '.join(lora['targets'])}",
            )
        )
        if lora["adapted_modules"]:
            rows.append(
                ("adapted modules", f"{', '.join(lora['adapted_modules'])} ({_count(lora['adapted_count'], 'module')})")
            )
    rows += [
        (
            "rounds",
            f"{exported.round} committed of {settings.rounds} planned; per round at each site {t.local_steps} "
            f"local steps, batch {t.batch_size}, learning rate {t.learning_rate:g}, windows of {t.max_seq_len} tokens",
        ),
        ("aggregation", _aggregation(report)),
        (
            "secure aggregation",
            "on: updates were masked (Bonawitz et al. 2017); the coordinator saw only their sum"
            if report["secure_aggregation"]
            else "off: the coordinator saw each site's update",
        ),
    ]
    final = next((r for r in report["rounds"] if r["round"] == exported.round), None)
    if report["base_eval_loss"] is not None or (final and final["eval_loss"] is not None):
        after = final["eval_loss"] if final else None
        rows.append(
            (
                "held-out loss",
                f"{_number(report['base_eval_loss'])} (base model), {_number(after)} after round {exported.round}",
            )
        )
    return ["## How it was trained", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def _sites(report: dict[str, Any], exported: ExportedVersion) -> list[str]:
    final = next((r for r in report["rounds"] if r["round"] == exported.round), None)
    lines = ["## Sites", "", "| site | examples | note |", "|---|---:|---|"]
    for worker in report["workers"]:
        note = f"left: {worker['left']}" if worker["left"] else ""
        lines.append(f"| {worker['id']} | {worker['num_examples']} | {note} |")
    if final is not None:
        lines += ["", f"Round {exported.round} combined the updates of {len(final['participants'])} sites."]
    return [*lines, ""]


def _privacy(report: dict[str, Any], exported: ExportedVersion) -> list[str]:
    privacy = report["privacy"]
    final: dict[str, Any] = next((r for r in report["rounds"] if r["round"] == exported.round), {})
    client, record, goldfish = privacy["client_level"], privacy["record_level"], privacy["goldfish"]
    lines = ["## Privacy", ""]
    if client is not None:
        lines.append(
            f"- Client-level DP: {client['mechanism']}; noise multiplier {client['noise_multiplier']:.3f}, "
            f"clip {client['clip_norm']}: epsilon {_number(final.get('epsilon'), 2)} at delta {client['delta']:g} "
            f"after {_count(exported.round, 'round')} ({client['trust']})."
        )
    else:
        lines.append("- Client-level DP: off.")
    if record is not None:
        lines.append(
            f"- Record-level DP: {record['mechanism']}; noise multiplier {record['noise_multiplier']}, "
            f"per-record clip {record['max_grad_norm']}: epsilon {_number(final.get('record_epsilon'), 2)} "
            f"(the largest of any site) at delta {record['delta']:g} after {_count(exported.round, 'round')}."
        )
    else:
        lines.append("- Record-level DP: off.")
    if goldfish is not None:
        lines.append(
            f"- Goldfish loss: on, k = {goldfish['k']}, h = {goldfish['h']} (about 1/{goldfish['k']} of tokens left "
            "out of the loss, chosen by a hash of the tokens before them)."
        )
    else:
        lines.append("- Goldfish loss: off.")
    return [*lines, ""]


def _memorization(report: dict[str, Any], exported: ExportedVersion) -> list[str]:
    audited = [r for r in report["rounds"] if r["memorization"] and r["round"] <= exported.round]
    lines = ["## Memorization audit", ""]
    if not audited:
        return [*lines, "No round was audited.", ""]
    last = audited[-1]
    memo = last["memorization"]
    lines += [
        f"Canary audit of round {last['round']}, by {memo['sites']} sites: the rates by how often a canary was in "
        "the training data (control: the same format, never trained on).",
        "",
        "| group | canaries | exact match | approx. match | token accuracy | PII extracted | mean exposure (bits) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for group in GROUPS:
        rates = memo["by_duplication"].get(group)
        if rates is None:
            continue
        lines.append(
            f"| {group} | {rates['count']} | {_number(rates['exact_match_rate'])} | "
            f"{_number(rates['approx_match_rate'])} | {_number(rates['token_accuracy'])} | "
            f"{_number(rates['pii_extraction_rate'])} | {_number(rates['mean_exposure'], 2)} |"
        )
    return [*lines, ""]


def model_card(report: dict[str, Any], *, settings: RunSettings, exported: ExportedVersion, load_path: str) -> str:
    """The card, in markdown with Hugging Face front matter; `load_path` is where the export is to be loaded from."""
    what = "A fully fine-tuned model" if report["mode"] == "full" else "A LoRA adapter"
    sites = _count(len(report["workers"]), "site")
    rounds = _count(exported.round, "federated round")
    secure = "on" if report["secure_aggregation"] else "off"
    lines = [
        *_front_matter(report),
        f"# {report['run_id']}",
        "",
        f"{what} for `{report['base_model']}`, trained with FedLoRA by {sites} over {rounds}, "
        f"secure aggregation {secure}: no site's records left it. Global version {exported.version}, "
        f"committed after round {exported.round}; sha256 of its weights `{exported.sha256}`.",
        "",
        *_loading(report, load_path),
        *_training(report, settings, exported),
        *_sites(report, exported),
        *_privacy(report, exported),
        *_memorization(report, exported),
        "## Files",
        "",
        "- "
        + (
            "`config.json`, `model.safetensors`: the model"
            if report["mode"] == "full"
            else "`adapter_config.json`, `adapter_model.safetensors`: the adapter (peft)"
        ),
        "- `fedlora.json`: version, tensor manifest and digest",
        "- `report.json`: the run's report: per round participants, losses, bytes, privacy spent, memorization",
        "",
    ]
    return "\n".join(lines)
