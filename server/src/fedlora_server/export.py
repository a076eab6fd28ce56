"""A run's result as a directory to hand over: the final adapter as real files, report.json and a model card.

Everything comes from one consistent snapshot of the store (the copy `backup.snapshot_of` takes), so
an export while the coordinator runs is the latest version the store records, never one half-written.
The adapter's files are copied (never the `adapter` link, which would dangle elsewhere) and read back
against the digest the store recorded before the directory is renamed into place: the target holds
the whole export or nothing, and it is never a directory that held anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from fedlora_common.settings import describe
from fedlora_server.backup import BackupError, latest_trained, snapshot_of
from fedlora_server.config import RunSettings
from fedlora_server.model_card import CARD_NAME, ExportedVersion, model_card
from fedlora_server.report import build_report
from fedlora_server.store import RunRecord, StateError
from fedlora_server.versions import artifact_path, verified_artifact

__all__ = ["REPORT_NAME", "ExportError", "ExportResult", "export_run"]

REPORT_NAME = "report.json"


class ExportError(Exception):
    """An export refused; the message is one line naming the directory and the fault."""


@dataclass(frozen=True)
class ExportResult:
    out: Path
    run_id: str
    version: ExportedVersion
    files: tuple[str, ...]
    """The model's files, then report.json and the card."""
    size_bytes: int


def _settings_of(run: RunRecord, state_dir: Path, given: RunSettings | None) -> RunSettings:
    """The settings the card describes: those given (run.yaml), else the ones the run was started with."""
    if given is not None:
        if given.run_id != run.run_id:
            raise ExportError(f"{state_dir}: holds run {run.run_id!r}, not {given.run_id!r}")
        return given.model_copy(update={"state_dir": state_dir})
    try:
        stored = RunSettings.model_validate_json(run.config_json)
    except ValidationError as exc:
        raise ExportError(
            f"{state_dir}: the run's stored settings do not load here ({describe(exc, RunSettings)}); "
            "give --config run.yaml"
        ) from None
    return stored.model_copy(update={"state_dir": state_dir})


def export_run(state_dir: Path, out: Path, *, settings: RunSettings | None = None) -> ExportResult:
    """Export the latest committed round of the run in state_dir to `out` (absent or empty).

    ExportError (or backup.BackupError, versions' StateError) if refused; nothing is written then.
    """
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise ExportError(f"{out}: exists and is not empty; an export never overwrites")
    with snapshot_of(state_dir) as (store, _):
        run = store.load_run()
        if run is None:
            raise BackupError(f"{state_dir}: its database records no run")
        run_settings = _settings_of(run, state_dir, settings)
        latest = latest_trained(store.artifacts())
        if latest is None:
            raise ExportError(f"{state_dir}: run {run.run_id!r} has committed no round yet; nothing to export")
        report = {**build_report(run_settings, store), "adapter_path": "."}
    exported = ExportedVersion(latest.version, latest.round, latest.sha256, latest.size_bytes)
    target = Path(os.path.abspath(out))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.export-{os.getpid()}")
    try:
        tmp.mkdir()
        source = artifact_path(state_dir, latest.path)
        names = [p.name for p in sorted(source.iterdir()) if p.is_file() and not p.is_symlink()]
        for name in names:
            shutil.copyfile(source / name, tmp / name, follow_symlinks=False)
        try:  # the copy itself is read back: it holds the very version the store recorded
            verified_artifact(tmp.parent, dataclasses.replace(latest, path=tmp.name))
        except StateError as exc:
            raise ExportError(f"{str(exc).replace(str(tmp), str(source))}; nothing exported") from None
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        card = model_card(report, settings=run_settings, exported=exported, load_path=str(out))
        (tmp / CARD_NAME).write_text(card, encoding="utf-8")
        files = (*names, REPORT_NAME, CARD_NAME)
        size = sum((tmp / name).stat().st_size for name in files)
        os.replace(tmp, target)  # onto an empty directory, or none
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return ExportResult(out, run.run_id, exported, files, size)
