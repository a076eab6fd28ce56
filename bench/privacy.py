"""Local training throughput with the privacy options: plain LoRA vs Goldfish loss vs DP-SGD.

One LoRA model on the demo lab base model trains on one lab site's records; before every run
the adapter is reset to its initial state, so each run does the same work from the same point.
The three configurations alternate (plain, Goldfish, DP, plain, ...) so that drift in the
machine's load hits all of them alike; the table gives median tokens per second (non-padding
tokens the model processed over the wall time of train_locally) and each median over plain's.

DP-SGD draws Poisson batches of batch_size records in expectation, so its batches vary in size;
tokens per second stays comparable because it counts what was processed.

Usage: python bench/privacy.py [--quick] [--model-size tiny]
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from pathlib import Path

import datasets
import torch
from transformers.utils import logging as hf_logging

from fedlora_common.plans import GoldfishPlan, LoraSpec, RecordDPPlan, RunSpec, TrainingPlan
from fedlora_lab.datagen import DataSpec, generate_site
from fedlora_lab.model_factory import LabModelConfig, cached_model
from fedlora_worker.data import tokenize
from fedlora_worker.modeling import SiteModel, global_state, load_model, set_global_state
from fedlora_worker.training import train_locally

GOLDFISH = GoldfishPlan(k=4, h=13)
DP = RecordDPPlan(noise_multiplier=1.0, max_grad_norm=1.0)
GOLDFISH_TARGET = 0.95  # Goldfish / plain tokens per second
LORA = LoraSpec(rank=16, alpha=32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repeats of 4 steps instead of 5 of 8")
    parser.add_argument("--model-size", choices=["demo", "tiny"], default="demo", help="tiny builds in seconds")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "fedlora")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the box is shared)")
    args = parser.parse_args()
    repeats, steps = (3, 4) if args.quick else (5, 8)
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    warnings.filterwarnings("ignore", category=UserWarning)  # torch: full backward hooks on the first layers
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)

    lab = LabModelConfig() if args.model_size == "demo" else LabModelConfig.tiny()
    made = cached_model(args.cache_dir, lab)
    run = RunSpec(
        run_id="bench", mode="lora", aggregation="fedavg", base_model=str(made.path), lora=LORA, total_rounds=1, seed=0
    )
    loaded = load_model(run, SiteModel(path=str(made.path)))
    records = datasets.Dataset.from_list(list(generate_site("clinical", DataSpec()).train))
    data = tokenize(records, loaded.tokenizer, max_seq_len=args.max_seq_len)
    initial = global_state(loaded)
    plain = TrainingPlan(local_steps=steps, batch_size=args.batch_size, learning_rate=1e-3, grad_clip_norm=1.0, seed=0)
    configs = {
        "LoRA": plain,
        "LoRA + Goldfish": plain.model_copy(update={"goldfish": GOLDFISH}),
        "LoRA + DP-SGD": plain.model_copy(update={"record_dp": DP}),
    }
    rates: dict[str, list[float]] = {name: [] for name in configs}
    train_locally(loaded.model, data, plain.model_copy(update={"local_steps": 2}), pad_id=loaded.pad_id)  # warm-up
    for _ in range(repeats):
        for name, config in configs.items():
            set_global_state(loaded, initial)
            rates[name].append(train_locally(loaded.model, data, config, pad_id=loaded.pad_id).tokens_per_second)

    base = statistics.median(rates["LoRA"])
    header = f"{'configuration':<17} {'median tok/s':>12} {'min':>8} {'max':>8} {'vs LoRA':>8}"
    print(header)
    print("-" * len(header))
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:<17} {median:>12,.0f} {min(values):>8,.0f} {max(values):>8,.0f} {median / base:>8.3f}")
    print()
    print(
        f"model: lab {args.model_size} ({lab.num_layers} layers, hidden {lab.hidden_size}, vocab {lab.vocab_size}), "
        f"LoRA rank {LORA.rank} on {len(LORA.target_modules)} projections; {torch.get_num_threads()} thread(s)"
    )
    print(
        f"data: {len(records)} clinical site records -> {len(data.input_ids)} windows of <= {args.max_seq_len} "
        f"tokens; {repeats} alternating repeats of {steps} steps, batch {args.batch_size}"
    )
    print(f"Goldfish: k={GOLDFISH.k}, h={GOLDFISH.h} (target >= {GOLDFISH_TARGET} x LoRA)")
    print(
        f"DP-SGD: noise multiplier {DP.noise_multiplier}, clip {DP.max_grad_norm}, Poisson rate "
        f"{args.batch_size / len(records):.4f}, per-sample gradients through Opacus hooks"
    )


if __name__ == "__main__":
    main()
