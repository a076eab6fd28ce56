"""The settings a run is pinned to at its first start, and which of them an operator may amend.

A restart compares run.yaml with what the state holds, field by field: a field that changes what the
run computes or protects (the model, LoRA, training, aggregation, privacy, secure aggregation, the
audit, seeds, how many rounds) is refused, one line per field, and changed on purpose only through
`fedlora-server amend`, which journals it. Where the coordinator listens, its deadlines, limits and
state directory are the site's own and may differ at any start.

An amendment must keep every committed round valid: more rounds (never fewer: a committed round
stands; not under client-level DP solved for a target epsilon, whose noise was planned for the
rounds first asked), sites added to the allow-list (they take part from the next round), a site's
token or identity key rotated, a site revoked, another min_workers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedlora_server.config import RunSettings

__all__ = ["PINNED", "Change", "amend_refusal", "changes", "pinned"]

PINNED = (
    "base_model",
    "mode",
    "aggregation",
    "lora",
    "base_precisions",
    "server_optimizer",
    "training",
    "rounds",
    "min_workers",
    "seed",
    "max_examples",
    "secure_aggregation",
    "privacy",
    "audit",
    "workers",
)
ABSENT = object()
"""A field one side does not have (a worker not on the other allow-list)."""


@dataclass(frozen=True)
class Change:
    """One pinned field that differs: its dotted path (workers by id), what the state holds, what is asked now."""

    field: str
    old: Any
    new: Any

    def line(self) -> str:
        return f"{self.field}: {_shown(self.old)} -> {_shown(self.new)}"

    def as_json(self) -> list[Any]:
        return [self.field, None if self.old is ABSENT else self.old, None if self.new is ABSENT else self.new]


def _shown(value: Any) -> str:
    if value is ABSENT:
        return "(absent)"
    return json.dumps(value, sort_keys=True)


def pinned(settings: RunSettings | Mapping[str, Any]) -> dict[str, Any]:
    """The pinned part of a run's settings (or of the JSON the state holds of them), as JSON values, the allow-list
    keyed by worker id. A stored config is read as it is, never validated again (that would read the environment)."""
    values = settings.model_dump(mode="json") if isinstance(settings, RunSettings) else dict(settings)
    out = {field: values.get(field, ABSENT) for field in PINNED}
    if isinstance(out["workers"], list):
        out["workers"] = {entry["id"]: entry for entry in out["workers"]}
    return out


def changes(stored: Mapping[str, Any], asked: Mapping[str, Any]) -> list[Change]:
    """Every pinned field that differs between two `pinned` views, by its dotted path, in a stable order.

    A field the stored settings lack (a setting added by a later release) counts as unchanged while it is
    asked at its default."""
    found: list[Change] = []
    _compare("", stored, asked, found)
    return [c for c in found if not (c.old is ABSENT and _default_at(c.field) == c.new)]


def _compare(path: str, old: Any, new: Any, found: list[Change]) -> None:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new), key=str):
            _compare(f"{path}.{key}" if path else str(key), old.get(key, ABSENT), new.get(key, ABSENT), found)
    elif old != new:
        found.append(Change(path, old, new))


def _default_at(path: str) -> Any:
    """The default of the setting at a dotted path of RunSettings, as JSON; ABSENT when it has none."""
    model: Any = RunSettings
    default: Any = ABSENT
    for part in path.split("."):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return ABSENT
        info = fields[part]
        if info.is_required():
            return ABSENT
        default = info.get_default(call_default_factory=True)
        model = type(default) if default is not None else info.annotation
    return json.loads(json.dumps(default, default=lambda v: v.model_dump(mode="json")))


def amend_refusal(change: Change, stored: Mapping[str, Any]) -> str | None:
    """Why `change` cannot be an amendment of the run pinned to `stored` (a `pinned` view), or None if it can."""
    head, _, rest = change.field.partition(".")
    if head == "rounds":
        if change.new < change.old:
            return f"rounds: {change.old} rounds were asked for and committed rounds stand: only more may be asked"
        client_dp = (stored.get("privacy") or {}).get("client_dp") or {}
        if client_dp.get("target_epsilon") is not None:
            return (
                "rounds: client-level DP solved its noise for the target epsilon over the rounds first asked; "
                "more rounds would spend past it"
            )
        return None
    if head == "min_workers":
        return None
    if head == "workers":
        if change.old is ABSENT or change.new is ABSENT:  # a site added, or revoked
            return None
        if rest.partition(".")[2] in ("token_sha256", "identity_public"):  # a credential rotated
            return None
        return f"{change.field}: only a site's token_sha256 and identity_public can be rotated"
    return f"{change.field}: it changes what the committed rounds computed or protected; start a new run for it"
