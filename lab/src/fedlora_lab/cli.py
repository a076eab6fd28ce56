"""`fedlora-lab`: make a base model and site data from nothing, and run a local federation (processes or simulated)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
from pydantic import ValidationError

from fedlora_common.logs import configure_logging
from fedlora_common.memorization import AuditRates, AuditSummary, audit_summary_from_json
from fedlora_common.plans import AuditPlan
from fedlora_common.settings import ConfigError, describe
from fedlora_lab.datagen import DOMAINS, DataSpec, generate_site, write_site
from fedlora_lab.engines import ENGINES, run_federation
from fedlora_lab.federation import FederationPlan
from fedlora_lab.model_factory import LAB_SIZES, LabModelConfig, LabSize, ProgressFn, cached_model, make_model
from fedlora_lab.plan_command import add_plan_arguments, plan_command
from fedlora_lab.simulation import command as simulate_command
from fedlora_lab.simulation.command import SUMMARY, add_simulate_arguments, simulate

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


_N = TypeVar("_N", int, float)


def _bounded(kind: Callable[[str], _N], low: _N, *, strict: bool = False) -> Callable[[str], _N]:
    """An argparse type: `kind` read from the text, at least `low` (above it when strict)."""

    def parse(text: str) -> _N:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
        return value

    return parse


_positive = _bounded(int, 1)
_non_negative = _bounded(int, 0)
_positive_float = _bounded(float, 0.0, strict=True)
_non_negative_float = _bounded(float, 0.0)


def _prefix_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts like 10,50, got {text!r}") from None
    if any(v < 1 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"prefixes must be distinct and at least 1, got {text!r}")
    return values


def _privacy_settings(args: argparse.Namespace) -> dict[str, Any]:
    """run.yaml's privacy and audit sections from the demo's flags."""
    privacy: dict[str, Any] = {}
    if args.dp_noise is not None or args.dp_epsilon is not None:
        privacy["client_dp"] = {"clip_norm": args.dp_clip, "delta": args.dp_delta}
        if args.dp_noise is not None:
            privacy["client_dp"]["noise_multiplier"] = args.dp_noise
        else:
            privacy["client_dp"]["target_epsilon"] = args.dp_epsilon
    if args.dp_sgd_noise is not None:
        privacy["record_dp"] = {"noise_multiplier": args.dp_sgd_noise, "max_grad_norm": args.dp_sgd_clip}
        privacy["record_dp"]["delta"] = args.dp_delta
    if args.goldfish:
        privacy["goldfish"] = {"k": 4, "h": 13}
    out: dict[str, Any] = {"privacy": privacy}
    if args.audit_every > 0:
        out["audit"] = {"every": args.audit_every}
    return out


def _default_cache() -> Path:
    return Path(os.environ.get("FEDLORA_CACHE_DIR", Path.home() / ".cache" / "fedlora"))


def _model_config(size: LabSize) -> LabModelConfig:
    return LabModelConfig.named(size)


def _progress(label: str) -> ProgressFn:
    def report(step: int, total: int, loss: float) -> None:
        if step == total or step % max(1, total // 20) == 0:
            sys.stderr.write(f"\r{label}: step {step}/{total} loss {loss:.3f}")
            sys.stderr.flush()
            if step == total:
                sys.stderr.write("\n")

    return report


def _live(line: str) -> None:
    """The demo's live line (on a terminal only): where the run stands, each time that changes."""
    sys.stderr.write(f"  {line}\n")
    sys.stderr.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedlora-lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    make = sub.add_parser("make-model", help="build and pre-train the tiny lab base model into DIR")
    make.add_argument("dir", type=Path)
    make.add_argument("--size", choices=LAB_SIZES, default="default")

    data = sub.add_parser("make-data", help="generate one site's records, canaries, controls and eval split")
    data.add_argument("dir", type=Path)
    data.add_argument("--domain", choices=DOMAINS, required=True)
    data.add_argument("--records", type=_positive, default=DataSpec().n_train)
    data.add_argument("--seed", type=int, default=0)

    demo = sub.add_parser("demo", help="run a local federation (1 coordinator + N workers) and print its report")
    demo.add_argument("--out", type=Path, required=True)
    demo.add_argument("--rounds", type=_positive, default=3)
    demo.add_argument("--workers", type=_positive, default=3)
    demo.add_argument("--mode", choices=("lora", "qlora", "full"), default="lora")
    demo.add_argument(
        "--engine",
        choices=ENGINES,
        default="processes",
        help="processes: a coordinator and a worker per site over gRPC; simulation: all in this process",
    )
    demo.add_argument("--aggregation", choices=("fedavg", "ffa"), default="fedavg")
    demo.add_argument(
        "--secagg",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="secure aggregation: the coordinator sees only the sum of the updates (default: on)",
    )
    demo.add_argument("--local-steps", type=_positive, default=30)
    demo.add_argument("--records", type=_positive, default=DataSpec().n_train)
    demo.add_argument("--canaries", type=_non_negative, default=DataSpec().n_canaries, help="canaries per site")
    demo.add_argument("--controls", type=_non_negative, default=DataSpec().n_controls, help="never-trained controls")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--model-size", choices=LAB_SIZES, default="default")
    demo.add_argument("--cache-dir", type=Path, default=None, help="where built base models are kept")
    privacy = demo.add_argument_group("privacy (each off unless given)")
    noise = privacy.add_mutually_exclusive_group()
    noise.add_argument("--dp-noise", type=_positive_float, help="client-level DP-FedAvg noise multiplier z")
    noise.add_argument("--dp-epsilon", type=_positive_float, help="client-level target epsilon (z solved for it)")
    privacy.add_argument("--dp-clip", type=_positive_float, default=0.5, help="update L2 clip for client-level DP")
    privacy.add_argument("--dp-delta", type=_positive_float, default=1e-5)
    privacy.add_argument("--dp-sgd-noise", type=_positive_float, help="record-level DP-SGD noise multiplier")
    privacy.add_argument("--dp-sgd-clip", type=_positive_float, default=1.0, help="per-record gradient clip")
    privacy.add_argument("--goldfish", action="store_true", help="Goldfish loss (k=4, h=13)")
    demo.add_argument(
        "--audit-every",
        type=_non_negative,
        default=1,
        help="audit the global model every N rounds (0: never; the last always)",
    )

    add_simulate_arguments(
        sub.add_parser(
            "simulate",
            help=SUMMARY,
            description=simulate_command.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )

    add_plan_arguments(
        sub.add_parser("plan", help="bytes, GPU memory and secure-aggregation cost per site and round, from a config")
    )

    experiment = sub.add_parser("experiment", help="run an experiment config (methods x seeds), audit, report")
    experiment.add_argument("--config", type=Path, required=True, help="an experiments/*.yaml file")
    experiment.add_argument("--out", type=Path, required=True)
    experiment.add_argument("--cache-dir", type=Path, default=None, help="where built base models are kept")
    audit = sub.add_parser("audit", help="measure how much of its canaries a model gives back, beside controls")
    audit.add_argument("--base", type=Path, required=True, help="base model dir (for full fine-tuning: the model)")
    audit.add_argument("--adapter", type=Path, default=None, help="peft adapter dir loaded on top of --base")
    audit.add_argument(
        "--records", type=Path, action="append", required=True, help="canaries.jsonl or controls.jsonl (repeatable)"
    )
    audit.add_argument("--prefixes", type=_prefix_list, default=None, help="prompt lengths in tokens, e.g. 10,50")
    audit.add_argument("--candidates", type=_positive, default=None, help="|R| for exposure (default 128)")
    audit.add_argument(
        "--frequency-penalty",
        type=_non_negative_float,
        default=None,
        help="lower each token's logit by this times its count in the continuation so far (default 0: argmax)",
    )
    audit.add_argument("--batch-size", type=_positive, default=64)
    audit.add_argument("--seed", type=int, default=0, help="seeds the exposure candidates")
    audit.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    merge = sub.add_parser("merge", help="merge a LoRA adapter into its base: a model that loads without peft")
    merge.add_argument("--base", type=Path, required=True, help="the base model directory the adapter was trained on")
    merge.add_argument("--adapter", type=Path, required=True, help="a peft adapter directory (an export, adapter/)")
    merge.add_argument("--out", type=Path, required=True, help="where to save the merged model (absent or empty)")
    return parser


def _demo(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    made = cached_model(
        args.cache_dir or _default_cache(),
        _model_config(args.model_size),
        progress=_progress("pre-training base model"),
    )
    learning_rate = 1e-3 if args.mode == "full" else 3e-3
    plan = FederationPlan(
        out_dir=args.out,
        base_model=made.path,
        workers=args.workers,
        rounds=args.rounds,
        mode=args.mode,
        aggregation=args.aggregation,
        secure_aggregation=args.secagg,
        seed=args.seed,
        data=DataSpec(n_train=args.records, n_canaries=args.canaries, n_controls=args.controls, seed=args.seed),
        run={
            "training": {"local_steps": args.local_steps, "learning_rate": learning_rate, "batch_size": 8},
            **_privacy_settings(args),
        },
        timeout=timedelta(minutes=60),
    )
    sys.stderr.write(
        f"running {args.workers} workers x {args.rounds} rounds ({args.mode}, {args.engine}); logs in {args.out}/logs\n"
    )
    try:
        result = run_federation(plan, engine=args.engine, say=_live if sys.stderr.isatty() else None)
    except ValidationError as exc:
        sys.stderr.write(f"fedlora-lab demo: error: run.yaml {describe(exc)}\n")
        return 2
    sys.stdout.write(result.report_markdown)
    failed = {name: code for name, code in result.exit_codes.items() if code != 0}
    if failed:
        sys.stderr.write(f"fedlora-lab: processes failed: {failed}\n")
        return 1
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from fedlora_lab.experiment import load_experiment_config, run_experiment

    try:
        config = load_experiment_config(args.config)
    except ConfigError as exc:
        sys.stderr.write(f"fedlora-lab experiment: {args.config}: {exc}\n")
        return 2
    outcome = run_experiment(
        config,
        args.out,
        cache_dir=args.cache_dir or _default_cache(),
        model_progress=_progress("pre-training base model"),
    )
    runs = outcome.results["runs"]
    sys.stderr.write(
        f"{len(runs) - len(outcome.failed)}/{len(runs)} runs succeeded; results in {outcome.out_dir / 'results.json'}, "
        f"report in {outcome.out_dir / 'report.md'}\n"
    )
    return 1 if outcome.failed else 0


def _audit_inputs(args: argparse.Namespace) -> str | None:
    """What is wrong with the audit's paths, in one line, or None."""
    if not (args.base / "config.json").is_file():
        return f"--base {args.base}: not a model directory (no config.json)"
    if args.adapter is not None and not (args.adapter / "adapter_config.json").is_file():
        return f"--adapter {args.adapter}: not a peft adapter directory (no adapter_config.json)"
    for path in args.records:
        if not path.is_file():
            return f"--records {path}: no such file"
    return None


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _audit_table(summary: AuditSummary) -> str:
    """Group x prefix ("any" = best prefix per record), the rates of the summary, one line each; exposure
    and its extrapolation as mean/worst."""
    lines = [
        f"{'group':<8} {'prefix':>6} {'n':>4} {'exact':>6} {'approx':>6} {'tokacc':>6} {'PII':>6} {'exposure':>12} "
        f"{'extrapolated':>12}"
    ]
    rows: list[tuple[str, dict[str, AuditRates]]] = [("any", summary.by_duplication), *summary.by_prefix.items()]
    for group in ("control", "1x", "10x"):
        for prefix, by_group in rows:
            stats = by_group[group]
            exposure = f"{_cell(stats.mean_exposure)}/{_cell(stats.worst_exposure)}"
            extrapolated = f"{_cell(stats.mean_exposure_extrapolated)}/{_cell(stats.worst_exposure_extrapolated)}"
            lines.append(
                f"{group:<8} {prefix:>6} {stats.count:>4} {_cell(stats.exact_match_rate):>6} "
                f"{_cell(stats.approx_match_rate):>6} {_cell(stats.token_accuracy):>6} "
                f"{_cell(stats.pii_extraction_rate):>6} {exposure:>12} {extrapolated:>12}"
            )
    return "\n".join(lines) + "\n"


def _audit(args: argparse.Namespace) -> int:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedlora_worker.audit import AuditOptions, audit_model, load_canaries

    problem = _audit_inputs(args)
    records = []
    if problem is None:
        try:
            records = load_canaries(args.records)
        except (OSError, ValueError) as exc:
            problem = str(exc)
    if problem is None and not records:
        problem = "--records: the files hold no records"
    if problem is not None:
        sys.stderr.write(f"fedlora-lab audit: error: {problem}\n")
        return 2
    given = {
        "prefixes": args.prefixes,
        "exposure_candidates": args.candidates,
        "frequency_penalty": args.frequency_penalty,
    }
    try:
        plan = AuditPlan.model_validate({name: value for name, value in given.items() if value is not None})
    except ValidationError as exc:
        sys.stderr.write(f"fedlora-lab audit: error: {describe(exc)}\n")
        return 2
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(args.base)
    if args.adapter is not None:
        model = PeftModel.from_pretrained(model, args.adapter)

    def progress(done: int, total: int) -> None:
        sys.stderr.write(f"\rdecoding: {done}/{total} prompts" + ("\n" if done == total else ""))
        sys.stderr.flush()

    options = AuditOptions(batch_size=args.batch_size, seed=args.seed)
    summary = audit_model(model, tokenizer, records, plan=plan, options=options, progress=progress).summary()
    sys.stdout.write(_audit_table(audit_summary_from_json(summary)))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


def _merge(args: argparse.Namespace) -> int:
    import transformers

    from fedlora_lab.merge import MergeError, merge_adapter

    if not sys.stderr.isatty():  # loading bars are for a terminal; a refusal stays one line elsewhere
        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        merged = merge_adapter(args.base, args.adapter, args.out)
    except MergeError as exc:
        sys.stderr.write(f"fedlora-lab merge: error: {exc}\n")
        return 2
    tokenizer = "with the base's tokenizer" if merged.tokenizer else "without a tokenizer (the base has none)"
    sys.stdout.write(
        f"{merged.out}: {args.adapter} merged into {args.base} ({merged.merged_modules} modules, "
        f"{merged.parameters} parameters), {tokenizer}; loads with AutoModelForCausalLM.from_pretrained\n"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "simulate":  # only simulate passes flags on (to run.yaml)
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    configure_logging(json=False, level="warning")
    if args.command == "simulate":
        return simulate(args, rest)
    if args.command == "make-model":
        made = make_model(args.dir, _model_config(args.size), progress=_progress("pre-training"))
        sys.stdout.write(
            f"{made.path}: held-out loss {made.heldout_loss:.3f} nats (uniform {made.uniform_loss:.3f}), "
            f"{made.seconds:.0f} s\n"
        )
        return 0
    if args.command == "make-data":
        paths = write_site(args.dir, generate_site(args.domain, DataSpec(n_train=args.records, seed=args.seed)))
        sys.stdout.write(f"{paths.root}: train, eval, canaries and controls written\n")
        return 0
    if args.command == "plan":
        return plan_command(args)
    if args.command == "experiment":
        return _experiment(args)
    if args.command == "audit":
        return _audit(args)
    if args.command == "merge":
        return _merge(args)
    return _demo(args)
