"""`fedlora-lab plan`: the capacity planner's command line and its human-readable table.

The numbers come from `fedlora_lab.plan` (pure estimates over a meta-device model); this module
only parses the flags, calls it and renders the result.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterable
from typing import cast, get_args

from transformers.utils import logging as hf_logging

from fedlora_common.chunking import DEFAULT_CHUNK_BYTES
from fedlora_common.plans import ALL_LINEAR, BasePrecision, LoraSpec, Mode
from fedlora_lab.plan import (
    GIB,
    KEYSTREAM_MB_S,
    MB,
    PLANNED_PRECISION,
    PUBLISHED,
    Capacity,
    SitePlan,
    SiteSpec,
    capacity,
    measure_keystream,
)

__all__ = ["add_plan_arguments", "plan_command", "render"]


def render(plan: Capacity) -> str:
    """The human-readable table."""
    m, sa = plan.memory, plan.secure_aggregation
    per_gpu = math.ceil(m.peak_checkpointed / plan.gpus_per_process)
    weights = {"lora": "bf16", "qlora": "NF4 linear layers, bf16 rest", "full": "float32"}[plan.mode]
    resolved = ", ".join(plan.adapted)
    targets = f"{ALL_LINEAR}: {resolved}" if plan.targets == (ALL_LINEAR,) else resolved
    adapted = f", LoRA rank {plan.rank} on {targets} ({plan.adapted_per_block} modules a block)"
    transients = "logits and loss" + (", a dequantized weight" if plan.mode == "qlora" else "")

    def row(label: str, value: str) -> str:
        return f"  {label:<50}{value:>16}"

    def gib(value: int) -> str:
        return f"{value / GIB:,.2f} GiB"

    def mb(value: int) -> str:
        return f"{value / MB:,.2f} MB"

    lines = [
        f"{plan.model}: {plan.architecture}, {plan.layers} layers, hidden {plan.hidden}, MLP {plan.intermediate}, "
        f"vocab {plan.vocab}",
        f"mode {plan.mode}, aggregation {plan.aggregation}" + (adapted if plan.mode != "full" else ""),
        f"micro-batch {plan.micro_batch} x {plan.seq_len} tokens per forward; {sa.sites} sites",
        "",
        row("parameters", f"{plan.parameters:,}"),
        row(f"trainable ({100 * plan.trainable_fraction:.3f}%)", f"{plan.trainable:,}"),
        "",
        "per site and round, on the wire (MB = 1e6 bytes)",
        row(f"down: global {'adapter' if plan.mode != 'full' else 'model'}", mb(plan.down_bytes)),
        row("up: update, plain (float32)", mb(plan.up_plain_bytes)),
        row("up: update, masked (uint32)", mb(plan.up_masked_bytes)),
        row("up: keys and shares (secure aggregation)", f"{sa.keys_up_bytes:,} B"),
        row("down: key roster and shares", f"{sa.keys_down_bytes:,} B"),
        "",
        "GPU memory of each training process (GiB = 2^30 bytes)",
        row(f"base weights ({weights})", gib(m.weights)),
        row("adapter (float32)", gib(m.adapter)),
        row("gradients (float32)", gib(m.gradients)),
        row("AdamW state (2 x float32)", gib(m.optimizer)),
        row("activations kept for the backward", gib(m.activations)),
        row("  with activation checkpointing", gib(m.activations_checkpointed)),
        row("  and one block recomputed in the backward", gib(m.recomputed)),
        row(f"transients ({transients})", gib(m.transient)),
        row("peak estimate", gib(m.peak)),
        row("  with activation checkpointing", gib(m.peak_checkpointed)),
        *(
            [
                row(f"  each of {plan.gpus_per_process} GPUs (device_map auto), checkpointing", gib(per_gpu)),
            ]
            if plan.gpus_per_process > 1
            else []
        ),
        "",
        f"secure aggregation at {sa.sites} sites (threshold {sa.threshold}; keystream {sa.keystream_mb_s:,.0f} MB/s)",
        row(f"masking, each site ({sa.keystreams_per_site} keystreams)", f"{sa.masking_s:,.2f} s"),
        row(f"unmasking, coordinator ({sa.sites} self masks)", f"{sa.unmasking_s:,.2f} s"),
        row("  each site dropping after masking adds", f"{sa.unmasking_per_dropout_s:,.2f} s"),
        *(_site_lines(plan) if plan.sites else []),
    ]
    return "\n".join(lines) + "\n"


def _site_lines(plan: Capacity) -> list[str]:
    """One row a site, in the order given: its rank, precision, peak per GPU and fit; the run's bytes."""
    width = max(4, *(len(site.name) for site in plan.sites))

    def gpu(site: SitePlan) -> str:
        return "-" if site.gpu_bytes is None else f"{site.gpus} x {site.gpu_bytes / GIB:,.2f} GiB"

    def fits(site: SitePlan) -> str:
        return "-" if site.fits is None else "yes" if site.fits else "no"

    def rank(site: SitePlan) -> str:
        return f"{site.rank} (auto)" if site.auto_rank else str(site.rank)

    header = (
        f"  {'site':<{width}}  {'rank':>9}  {'precision':<9}  {'peak a GPU':>12}  {'GPUs':>16}  {'fits':<4}"
        f"  {'down MB':>10}  {'up MB':>10}  {'masked MB':>10}"
    )
    return [
        "",
        f"per site: its own rank and base precision, bytes the run's (rank {plan.rank}, zero-padded below it); "
        f"peak {'with' if plan.sites[0].checkpointing else 'without'} activation checkpointing",
        header,
        *(
            f"  {s.name:<{width}}  {rank(s):>9}  {s.precision:<9}  {s.peak_bytes / GIB:>8,.2f} GiB  {gpu(s):>16}"
            f"  {fits(s):<4}  {s.down_bytes / MB:>10,.2f}  {s.up_plain_bytes / MB:>10,.2f}  {s.up_masked_bytes / MB:>10,.2f}"
            for s in plan.sites
        ),
    ]


# ---- the command -------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _targets(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(part for value in values for part in value.split(",") if part)


_SITE_SYNTAX = "NAME:rank=R|auto,precision=nf4|bfloat16|float32,gpu=[Nx]24GiB"
_UNITS = {"tib": 2**40, "gib": GIB, "mib": 2**20, "tb": 10**12, "gb": 10**9, "mb": 10**6, "b": 1}


def _gpus(text: str, site: str) -> tuple[int, int]:
    """`gpu=24GiB` or `gpu=8x80GiB`: (cards, bytes each)."""
    match = re.fullmatch(r"(?:(\d+)\s*x\s*)?(\d+(?:\.\d+)?)\s*([a-z]+)", text.strip().lower())
    if match is None or match.group(3) not in _UNITS or int(match.group(1) or 1) < 1 or float(match.group(2)) <= 0:
        raise ValueError(f"--site {site}: gpu={text} is not a card's memory such as 24GiB, 80GB or 8x80GiB")
    return int(match.group(1) or 1), int(float(match.group(2)) * _UNITS[match.group(3)])


def _site_spec(text: str, mode: Mode, run_rank: int) -> SiteSpec:
    """`--site NAME:key=value,...` as a SiteSpec; rank defaults to the run's, precision to the mode's."""
    name, colon, rest = text.partition(":")
    name = name.strip()
    if not name or not colon:
        raise ValueError(f"--site {text}: expected {_SITE_SYNTAX}")
    values: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, equals, value = item.partition("=")
        if not equals or key.strip() not in ("rank", "precision", "gpu") or key.strip() in values:
            raise ValueError(f"--site {name}: {item!r} is not one of rank=, precision=, gpu= (each once)")
        values[key.strip()] = value.strip()
    rank_text = values.get("rank", str(run_rank))
    if rank_text != "auto" and (not rank_text.isdigit() or int(rank_text) < 1):
        raise ValueError(f"--site {name}: rank={rank_text} is neither a whole number >= 1 nor auto")
    rank = None if rank_text == "auto" else int(rank_text)
    precision = values.get("precision", PLANNED_PRECISION[mode])
    if precision not in get_args(BasePrecision):
        raise ValueError(f"--site {name}: precision={precision} is not one of {', '.join(get_args(BasePrecision))}")
    gpus, gpu_bytes = _gpus(values["gpu"], name) if "gpu" in values else (1, None)
    return SiteSpec(name=name, rank=rank, precision=cast(BasePrecision, precision), gpu_bytes=gpu_bytes, gpus=gpus)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help=f"a model directory, a config.json, or one of {', '.join(PUBLISHED)}"
    )
    parser.add_argument("--mode", choices=("lora", "qlora", "full"), default="lora")
    parser.add_argument("--rank", type=_positive, default=LoraSpec().rank, help="LoRA rank")
    parser.add_argument("--alpha", type=_positive, default=None, help="LoRA alpha (default 2 x rank)")
    parser.add_argument("--dropout", type=float, default=LoraSpec().dropout, help="LoRA dropout")
    parser.add_argument("--targets", nargs="+", default=[ALL_LINEAR], help="LoRA target modules (default all-linear)")
    parser.add_argument(
        "--aggregation",
        choices=("fedavg", "ffa", "hetlora"),
        default="fedavg",
        help="hetlora: sites of less rank than the run's (--site rank=)",
    )
    parser.add_argument("--seq-len", type=_positive, default=2048, help="tokens per training window")
    parser.add_argument("--micro-batch", type=_positive, default=1, help="windows per forward pass")
    parser.add_argument(
        "--gpus-per-process",
        type=_positive,
        default=1,
        help="GPUs one process spreads the base over (worker.yaml device_map: auto); the peak is split evenly",
    )
    parser.add_argument(
        "--sites", type=_positive, default=None, help="sites taking part in a round (default: the --site count, or 3)"
    )
    parser.add_argument(
        "--site",
        action="append",
        default=[],
        metavar=_SITE_SYNTAX,
        help=(
            "a site of its own hardware, repeated, one row each: rank (default the run's; at most --rank; auto: the "
            "largest of 4, 8, 16, ... that fits gpu=), base precision (default the mode's; the run must allow it), "
            "its GPUs' memory, each (8x80GiB: eight cards, a process each)"
        ),
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="the run trains with activation checkpointing: the sites' peaks and fits count it",
    )
    parser.add_argument(
        "--keystream-mbps", type=float, default=None, help=f"keystream rate in MB/s (default {KEYSTREAM_MB_S:g})"
    )
    parser.add_argument("--measure-keystream", action="store_true", help="time the keystream on this machine instead")
    parser.add_argument("--chunk-bytes", type=_positive, default=DEFAULT_CHUNK_BYTES)
    parser.add_argument("--json", action="store_true", help="print JSON for tools")


def plan_command(args: argparse.Namespace) -> int:
    """`fedlora-lab plan`: exit 2 with one line on a bad argument."""
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    try:
        specs = [_site_spec(text, args.mode, args.rank) for text in args.site]
        names = [spec.name for spec in specs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"--site: {', '.join(repeated)} given more than once")
        sites = args.sites or (len(specs) if len(specs) >= 2 else 3)
        if sites < 2:
            raise ValueError("--sites: secure aggregation needs at least 2 sites")
        if args.mode == "full" and args.aggregation != "fedavg":
            raise ValueError(f"--aggregation: {args.aggregation} applies to LoRA adapters, not to mode full")
        lora = LoraSpec(
            rank=args.rank,
            alpha=args.alpha or 2 * args.rank,
            dropout=args.dropout,
            target_modules=_targets(args.targets),
        )
        rate = measure_keystream() if args.measure_keystream else (args.keystream_mbps or KEYSTREAM_MB_S)
        plan = capacity(
            args.model,
            mode=args.mode,
            lora=lora,
            aggregation=args.aggregation,
            seq_len=args.seq_len,
            micro_batch=args.micro_batch,
            gpus_per_process=args.gpus_per_process,
            sites=sites,
            keystream_mb_s=rate,
            chunk_bytes=args.chunk_bytes,
            site_specs=specs,
            gradient_checkpointing=args.gradient_checkpointing,
        )
    except ValueError as exc:
        message = " ".join(str(exc).split())
        sys.stderr.write(f"fedlora-lab plan: error: {message}\n")
        return 2
    sys.stdout.write(json.dumps(plan.to_json(), indent=2) + "\n" if args.json else render(plan))
    return 0
