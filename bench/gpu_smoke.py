"""A real model on a real GPU: 2 sites x 2 rounds of QLoRA with everything on, measured beside the planner.

The federation is the simulation engine's (fedlora_lab.simulation: the real coordinator and one
real worker daemon per site in this process, each on its own adapter over one loaded base; on a
GPU they train one at a time, so each site's memory peak is its own), with secure
aggregation, micro-batches with gradient accumulation, activation checkpointing, packing, a
cosine schedule with warmup across the rounds, and precision auto (bf16 autocast on a CUDA GPU
that has it, float32 on a CPU). Each site trains on generated clinical or legal records. Printed
per site and round: tokens/s and the GPU memory peak of training (torch.cuda.max_memory_allocated,
reset when training starts), beside `fedlora-lab plan`'s estimate for the same model and
settings, and their ratio. On a machine without a GPU the peak column says n/a.

Usage: python bench/gpu_smoke.py --model /models/Llama-3.1-8B          # a CUDA GPU, the model's own tokenizer
       python bench/gpu_smoke.py                                       # the lab's tiny model, CPU or GPU (~30 s)
       options: --seq-len 1024 --micro-batch 1 --batch-size 8 --local-steps 4 --records 64 --rank 16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import MutableMapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog
import torch
from transformers.utils import logging as hf_logging

from fedlora_common.plans import LoraSpec
from fedlora_common.secagg import identity_keypair
from fedlora_lab.datagen import DataSpec, generate_site, write_site
from fedlora_lab.model_factory import LabModelConfig, cached_model
from fedlora_lab.plan import capacity
from fedlora_lab.simulation.engine import Simulation
from fedlora_server.config import RunSettings
from fedlora_worker.config import WorkerSettings

SITES = (("clinical", "clinical"), ("legal", "legal"))
ROUNDS = 2
MIB = 2**20


def _model_path(model: str, cache: Path) -> Path:
    if model == "tiny":
        return cached_model(cache, LabModelConfig.tiny()).path
    return Path(model)


class _Trained:
    """A structlog processor keeping the workers' `trained` events and writing every event to a log file."""

    def __init__(self, log_file: Path) -> None:
        self.events: list[dict[str, Any]] = []
        self._file = log_file.open("a", encoding="utf-8")

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        if event.get("event") == "trained":
            self.events.append(dict(event))
        self._file.write(json.dumps(event, default=str) + "\n")
        self._file.flush()
        raise structlog.DropEvent


def _run_settings(args: argparse.Namespace, base: Path, state: Path, identities: dict[str, Any]) -> RunSettings:
    return RunSettings.model_validate(
        {
            "run_id": "gpu-smoke",
            "base_model": str(base),
            "mode": "qlora",
            "rounds": ROUNDS,
            "min_workers": len(SITES),
            "workers": [
                {
                    "id": site,
                    "token_sha256": hashlib.sha256(f"token-{site}".encode()).hexdigest(),
                    "identity_public": identities[site].public.hex(),
                }
                for site, _ in SITES
            ],
            "secure_aggregation": {"enabled": True},
            "state_dir": state,
            "lora": {"rank": args.rank, "alpha": 2 * args.rank},
            "training": {
                "local_steps": args.local_steps,
                "batch_size": args.batch_size,
                "micro_batch_size": args.micro_batch,
                "gradient_checkpointing": True,
                "packing": True,
                "lr_schedule": "cosine",
                "warmup_steps": 1,
                "learning_rate": 2e-4,
                "max_seq_len": args.seq_len,
                "precision": "auto",
            },
        }
    )


def _site_settings(
    base: Path, root: Path, records: int, device: str, identities: dict[str, Any]
) -> list[WorkerSettings]:
    peers = {site: keys.public.hex() for site, keys in identities.items()}
    sites = []
    for index, (site, domain) in enumerate(SITES):
        paths = write_site(root / site, generate_site(domain, DataSpec(n_train=records, n_eval=8, seed=index)))  # type: ignore[arg-type]
        key = root / f"{site}.key"
        key.write_text(identities[site].private.hex(), encoding="utf-8")
        sites.append(
            WorkerSettings.model_validate(
                {
                    "worker_id": site,
                    "token": f"token-{site}",
                    "base_model": str(base),
                    "data": {"train": [paths.train], "eval": [paths.eval]},
                    "device": device,
                    "progress": False,
                    "identity_key": key,
                    "peers": peers,
                }
            )
        )
    return sites


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="tiny", help="a model directory, or `tiny` (the default) for the lab's tiny model"
    )
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per window (1024; tiny: 128)")
    parser.add_argument("--micro-batch", type=int, default=2, help="windows per forward pass")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per optimizer step")
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--records", type=int, default=None, help="training records per site (256; tiny: 48)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "fedlora")
    args = parser.parse_args()
    tiny = args.model == "tiny"
    args.seq_len = args.seq_len or (128 if tiny else 1024)
    args.records = args.records or (48 if tiny else 256)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' and peft's deprecation notices
    if device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))

    base = _model_path(args.model, args.cache_dir)
    lora = LoraSpec(rank=args.rank, alpha=2 * args.rank)
    planned = capacity(str(base), mode="qlora", lora=lora, seq_len=args.seq_len, micro_batch=args.micro_batch, sites=2)
    identities = {site: identity_keypair() for site, _ in SITES}
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        root = Path(tmp)
        trained = _Trained(root / "smoke.log")
        structlog.configure(
            processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level, trained],
            cache_logger_on_first_use=False,
        )
        settings = _run_settings(args, base, root / "coordinator", identities)
        sites = _site_settings(base, root, args.records, device, identities)
        started = time.monotonic()
        outcome = Simulation(settings=settings, sites=sites, timeout=timedelta(hours=2)).run()
        seconds = time.monotonic() - started
        if outcome.failure or any(code for code in outcome.exit_codes.values()):
            sys.stderr.write(f"gpu_smoke: the run failed: {outcome.failure or outcome.exit_codes}\n")
            sys.stderr.write((root / "smoke.log").read_text(encoding="utf-8")[-4000:])
            return 1
        report = outcome.report
    _print(args, base, device, planned, trained.events, report, seconds)
    return 0


def _print(
    args: argparse.Namespace,
    base: Path,
    device: str,
    planned: Any,
    events: list[dict[str, Any]],
    report: dict[str, Any],
    seconds: float,
) -> None:
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none (CPU: float32, no GPU peak to measure)"
    estimate = planned.memory.peak_checkpointed
    print(f"gpu_smoke: {base} ({planned.architecture}, {planned.parameters:,} parameters), GPU: {gpu}")
    print(
        f"qlora rank {args.rank} on all-linear; {len(SITES)} sites x {ROUNDS} rounds, secure aggregation; "
        f"{args.local_steps} steps of {args.batch_size} windows = micro-batches of {args.micro_batch} x "
        f"{args.seq_len} tokens, packing, checkpointing, cosine lr (1 warmup step), precision auto"
    )
    print()
    header = f"{'site':<10} {'round':>5} {'tokens/s':>10} {'peak MiB':>10} {'planned MiB':>12} {'planned/peak':>13}"
    print(header)
    print("-" * len(header))
    for event in sorted(events, key=lambda e: (e.get("round", 0), e.get("worker_id", ""))):
        peak = int(event.get("gpu_peak_memory_bytes") or 0)
        print(
            f"{event.get('worker_id', '?'):<10} {event.get('round', 0):>5} {event.get('tokens_per_s', 0.0):>10,.1f} "
            f"{(f'{peak / MIB:,.1f}' if peak else 'n/a'):>10} {estimate / MIB:>12,.1f} "
            f"{(f'{estimate / peak:.3f}' if peak else 'n/a'):>13}"
        )
    print()
    losses = [f"{r['eval_loss']:.3f}" for r in report["rounds"] if r.get("eval_loss") is not None]
    print(
        f"run: {len(report['rounds'])} rounds committed in {seconds:.0f} s; held-out loss "
        f"{report.get('base_eval_loss') or float('nan'):.3f} (base) -> {' -> '.join(losses)}; "
        f"{report['rounds'][0]['upload_bytes'] / 1e6:,.2f} MB of masked updates uploaded per round (both sites)"
    )
    m = planned.memory
    parts = [
        ("weights", m.weights),
        ("adapter", m.adapter),
        ("gradients", m.gradients),
        ("AdamW", m.optimizer),
        ("activations (checkpointed)", m.activations_checkpointed),
        ("one block recomputed", m.recomputed),
        ("transients", m.transient),
    ]
    print("planner (fedlora-lab plan, bf16 compute on a GPU): " + ", ".join(f"{n} {v / MIB:,.1f}" for n, v in parts))
    print(f"  = {estimate / MIB:,.1f} MiB peak with checkpointing ({m.peak / MIB:,.1f} MiB without)")


if __name__ == "__main__":
    sys.exit(main())
