"""`fedlora-server backup|restore|export`: a run's state carried out of its directory, consistently.

backup: the database (SQLite's online backup, while the coordinator runs or not) with the versions it records;
restore: such a backup into a new state directory, checked whole before anything is written; export: the
latest committed adapter as plain files, with report.json and a model card.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fedlora_common.settings import ConfigError, load_settings
from fedlora_server.commandline import OneLineParser, config_error
from fedlora_server.config import RunSettings

__all__ = ["backup", "export", "restore"]


def _state_parser(prog: str, description: str) -> OneLineParser:
    """A parser for a command on one run's state: `--config run.yaml` or `--state-dir DIR`."""
    parser = OneLineParser(prog=prog, description=description)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="the run's run.yaml (its state_dir, and its run_id checked)")
    source.add_argument("--state-dir", type=Path, help="the coordinator's state directory")
    return parser


def _state_of(args: argparse.Namespace) -> tuple[Path, RunSettings | None]:
    """The state directory the arguments name, and the run's settings when a run.yaml gave them."""
    if args.config is None:
        return args.state_dir, None
    settings = load_settings(RunSettings, ["--config", str(args.config)])
    return settings.state_dir, settings


def _refused(prog: str, exc: Exception) -> int:
    """A refusal: one line, exit 2. A failing disk is not a refusal: exit 1."""
    sys.stderr.write(f"{prog}: {exc}\n")
    return 1 if isinstance(exc, OSError) else 2


def backup(argv: Sequence[str]) -> int:
    """`backup (--config run.yaml | --state-dir DIR) --out FILE`: a consistent backup, the coordinator running or not."""
    from time import monotonic

    from fedlora_server.backup import BackupError, create_backup, versions_text
    from fedlora_server.store import StateError

    prog = "fedlora-server backup"
    parser = _state_parser(prog, "Back up a run's state: database snapshot, committed versions, adapter link.")
    parser.add_argument("--out", type=Path, required=True, help="the archive to write (.tar.gz); never overwritten")
    try:
        args = parser.parse_args(argv)
        state_dir, settings = _state_of(args)
    except SystemExit as exc:  # a bad argument: OneLineParser has written its one line
        return int(exc.code or 0)
    except ConfigError as exc:
        return config_error(exc)
    started = monotonic()
    try:
        made = create_backup(state_dir, args.out, expect_run=settings.run_id if settings else None)
    except (BackupError, StateError, OSError) as exc:
        return _refused(prog, exc)
    m = made.manifest
    sys.stdout.write(
        f"wrote {made.path}: run {m.run_id}, {versions_text(m)} (adapter: {m.adapter or 'none yet'}), "
        f"{len(m.files)} files, {made.size_bytes} bytes in {monotonic() - started:.1f} s\n"
    )
    return 0


def restore(argv: Sequence[str]) -> int:
    """`restore --from FILE --state-dir DIR`: DIR absent or empty; the archive is checked before anything is written."""
    from fedlora_server.backup import BackupError, versions_text
    from fedlora_server.restore import restore_backup

    prog = "fedlora-server restore"
    parser = OneLineParser(prog=prog, description="Restore a backup into a new state directory.")
    parser.add_argument("--from", dest="archive", type=Path, required=True, help="a fedlora-server backup archive")
    parser.add_argument("--state-dir", type=Path, required=True, help="where to restore it: absent or empty")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        restored = restore_backup(args.archive, args.state_dir)
    except (BackupError, OSError) as exc:
        return _refused(prog, exc)
    m = restored.manifest
    sys.stdout.write(
        f"restored run {m.run_id}, {versions_text(m)} ({len(m.files)} files, {restored.size_bytes} bytes) into "
        f"{restored.state_dir}; resume it with: fedlora-server --config run.yaml --state_dir {restored.state_dir}\n"
    )
    return 0


def export(argv: Sequence[str]) -> int:
    """`export (--config run.yaml | --state-dir DIR) --out DIR`: adapter files, report.json, model card."""
    from fedlora_server.backup import BackupError
    from fedlora_server.export import ExportError, export_run
    from fedlora_server.store import StateError

    prog = "fedlora-server export"
    parser = _state_parser(prog, "Export the run's latest committed adapter with its report and a model card.")
    parser.add_argument("--out", type=Path, required=True, help="the directory to write (absent or empty)")
    try:
        args = parser.parse_args(argv)
        state_dir, settings = _state_of(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    except ConfigError as exc:
        return config_error(exc)
    try:
        done = export_run(state_dir, args.out, settings=settings)
    except (ExportError, BackupError, StateError, OSError) as exc:
        return _refused(prog, exc)
    sys.stdout.write(
        f"exported version {done.version.version} (round {done.version.round}) of run {done.run_id} to {done.out}: "
        f"{', '.join(done.files)} ({done.size_bytes} bytes)\n"
    )
    return 0
