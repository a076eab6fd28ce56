"""Bytes per worker per round on the wire: LoRA adapters vs full fine-tuning.

Up is one worker's delta (UploadUpdate: header, then chunks); down is the global model
(DownloadGlobal: header, then chunks). Wire bytes are the serialized protobuf messages of a
stream, built exactly as CoordinatorClient.upload and CoordinatorServicer.DownloadGlobal build
them, plus gRPC's 5-byte length prefix per message. HTTP/2 framing (9 bytes per DATA frame of at
most 16 KiB, about 0.06%) and TCP/IP headers are below this layer and not counted.

The small Llama is measured: loaded through fedlora_worker.modeling.load_model, its real state
is chunked into real messages and each one is sized. The published Llama shapes are computed by
the capacity planner (fedlora_lab.plan, `fedlora-lab plan`): built on the meta device (no
weights), their manifests are exact and the message sizes come from the same framing functions
this script checks against the built messages, with chunk counts derived instead of 70B floats
allocated. tests/lab/test_plan.py checks that the planner's bytes equal this script's measured ones.

Usage: python bench/comm.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from google.protobuf.message import Message
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from fedlora_common.chunking import DEFAULT_CHUNK_BYTES, iter_chunks, sha256
from fedlora_common.manifest import flatten
from fedlora_common.plans import LoraSpec, Mode, RunSpec
from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_lab.plan import (
    PUBLISHED,
    ChunkWrapper,
    capacity,
    download_chunk,
    download_header,
    framed,
    stream_wire_bytes,
    upload_chunk,
    upload_header,
)
from fedlora_worker.modeling import SiteModel, artifact_config_json, global_state, load_model

LORA = LoraSpec(rank=16, alpha=32)
MB = 1e6
PAPER_RATIO_3B = 130

SMALL_LLAMA = LlamaConfig(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    tie_word_embeddings=True,
)


def chunk_messages(payload: memoryview, chunk_bytes: int, wrap: ChunkWrapper) -> Iterator[Message]:
    for seq, piece in enumerate(iter_chunks(payload, chunk_bytes)):
        yield wrap(pb.Chunk(seq=seq, data=piece.tobytes()))


# ---- models ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    model: str
    mode: Mode
    source: str
    params: int
    raw_bytes: int
    up_bytes: int
    down_bytes: int


def _tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with vocab_size ids: load_model needs one; its contents are irrelevant here."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _run(base_model: str, mode: Mode) -> RunSpec:
    return RunSpec(
        run_id="bench", mode=mode, aggregation="fedavg", base_model=base_model, lora=LORA, total_rounds=1, seed=0
    )


def measured_row(base_dir: Path, mode: Mode, chunk_bytes: int) -> Row:
    """Load the small Llama for `mode` and size the real messages of its real state."""
    loaded = load_model(_run(str(base_dir), mode), SiteModel(path=str(base_dir)))
    vector = flatten(loaded.manifest, global_state(loaded))
    payload = vector.data.cast("B")
    digest = sha256(payload)
    up_head = upload_header(digest, len(payload), chunk_bytes)
    down_head = download_header(loaded.manifest, artifact_config_json(loaded), digest, chunk_bytes)
    up = framed(up_head) + sum(framed(m) for m in chunk_messages(payload, chunk_bytes, upload_chunk))
    down = framed(down_head) + sum(framed(m) for m in chunk_messages(payload, chunk_bytes, download_chunk))
    if (up, down) != (
        stream_wire_bytes(up_head, len(payload), chunk_bytes, upload_chunk),
        stream_wire_bytes(down_head, len(payload), chunk_bytes, download_chunk),
    ):
        raise AssertionError("the analytic framing disagrees with the built messages")
    return Row("small Llama", mode, "measured", loaded.manifest.numel, loaded.manifest.nbytes, up, down)


def computed_rows(name: str, chunk_bytes: int) -> list[Row]:
    """Both modes of a published shape, as the capacity planner counts them from a weightless (meta) model."""
    rows = []
    for mode in ("lora", "full"):
        plan = capacity(name, mode=mode, lora=LORA, chunk_bytes=chunk_bytes)
        rows.append(
            Row(name, mode, "computed", plan.trainable, 4 * plan.trainable, plan.up_plain_bytes, plan.down_bytes)
        )
    return rows


# ---- report ---------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    lora_up = {r.model: r.up_bytes for r in rows if r.mode == "lora"}
    lora_params = {r.model: r.params for r in rows if r.mode == "lora"}
    header = (
        f"{'model':<14} {'mode':<5} {'source':<9} {'params':>15} {'raw MB':>12} {'up MB':>12} "
        f"{'down MB':>12} {'up/raw':>8} {'down/raw':>8} {'full/LoRA':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = f"{r.up_bytes / lora_up[r.model]:.1f}x" if r.mode == "full" else ""
        print(
            f"{r.model:<14} {r.mode:<5} {r.source:<9} {r.params:>15,} {r.raw_bytes / MB:>12,.2f} "
            f"{r.up_bytes / MB:>12,.2f} {r.down_bytes / MB:>12,.2f} {r.up_bytes / r.raw_bytes:>8.5f} "
            f"{r.down_bytes / r.raw_bytes:>8.5f} {ratio:>10}"
        )
    print()
    print("MB = 1e6 bytes; raw = float32 tensor bytes of the manifest; up = one worker's delta upload,")
    print("down = one global download, both per worker per round; full/LoRA = ratio of up wire bytes.")
    print(f"LoRA: rank {LORA.rank}, alpha {LORA.alpha:g}, {', '.join(LORA.target_modules)}; chunks of 1 MiB.")
    if "Llama-3.2-3B" in lora_params:
        full_3b = next(r.params for r in rows if r.model == "Llama-3.2-3B" and r.mode == "full")
        params_ratio = full_3b / lora_params["Llama-3.2-3B"]
        print(f"Llama-3.2-3B: full/LoRA = {params_ratio:.1f}x in parameters, hence in bytes whenever both travel")
        print(f"in one dtype (fp32 and fp32 here, or bf16 and bf16): the paper's ~{PAPER_RATIO_3B}x is this ratio.")
        print(f"Full weights in bf16 against fp32 adapters would give {params_ratio / 2:.1f}x instead.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip Llama-3.1-70B (its meta model takes ~30 s)")
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices

    tokenizer = _tiny_tokenizer(SMALL_LLAMA.vocab_size)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-comm-") as tmp:
        base_dir = Path(tmp)
        tokenizer.save_pretrained(base_dir)
        torch.manual_seed(0)
        LlamaForCausalLM(SMALL_LLAMA).save_pretrained(base_dir)
        rows += [measured_row(base_dir, mode, args.chunk_bytes) for mode in ("lora", "full")]
    for name in PUBLISHED:
        if args.quick and name == "Llama-3.1-70B":
            continue
        rows += computed_rows(name, args.chunk_bytes)
    print_table(rows)


if __name__ == "__main__":
    main()
