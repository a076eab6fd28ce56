"""The capacity planner behind `fedlora-lab plan` (`plan_command`): what one site and the coordinator
need per round, from the model's config alone.

The model is built on the meta device from its config (a model directory, a config.json, or one of
the published Llama shapes in `PUBLISHED`): no weights are read or allocated. From it:

* **Parameters**: the base's (each tensor once, tied embeddings included once) and the trainable
  ones (the LoRA adapter as peft builds it; every parameter for mode full; B only is trained and
  sent under FFA-LoRA).
* **Bytes on the wire** per site and round, counted exactly as `bench/comm.py` counts them (the
  functions below are the ones it uses): the serialized protobuf messages of a stream (header,
  then 1 MiB chunks) plus gRPC's 5-byte prefix per message. Down: the global version (the whole
  adapter). Up: the delta as float32 (plain) or masked as uint32 with one more coordinate, the
  weight (hetlora: one per block group, `fedlora_common.blocks`). Secure aggregation also moves
  the round's keys and shares, sized from a real exchange between `--sites` worker sessions.
* **GPU memory** per training process, in bytes:
  - weights: lora, float base in bf16 (2 bytes a parameter); qlora, NF4 blocks of 64 (0.5 byte a
    weight plus a float32 absmax per block: 0.5625) for every linear layer but the output head,
    bf16 for the rest; full, float32 (4). A site may load a (Q)LoRA base otherwise (`precision`):
    nf4, bfloat16, or float32 (4), whose block inputs then stay float32 (4hT each under
    checkpointing) and whose linear layers and head autocast keeps in bf16 copies for the backward
    (2 bytes a weight), as under full.
  - adapter 4 bytes a LoRA parameter (float32); gradients 4 and AdamW state 8 (two float32
    moments) a trainable parameter.
  - activations, what autograd keeps from the forward of one micro-batch of T = micro-batch x
    seq-len tokens under bf16 autocast, as Korthikanti et al. (2022), "Reducing Activation
    Recomputation in Large Transformer Models", Sec. 4.1, count them (sbh(34 + 5as/h) for a GPT
    block with 16-bit activations), recounted for transformers' Llama-style block (gated MLP,
    grouped-query attention, SDPA: no s x s scores are kept) and peft's LoRA: the coefficients
    are autograd's saved tensors, counted with saved-tensor hooks (tests/lab/test_plan.py counts
    them again), per layer
        (Q)LoRA:  T x [12h + 6i + 4kv + sum over adapted modules ((2 + d) in + 2r)]
        full:     T x (30h + 8i + 4kv)
    (h hidden, i MLP width, kv key/value width, r rank, `in` a module's input width, d the bytes
    a dropout mask keeps per element: 1 on CUDA, a bool; 4 on a CPU; 0 without dropout), plus
    (4V + 4h)T for the float32 log-probabilities of the loss (V vocabulary) and the final norm
    and head (full: (4V + 15h)T), and autocast's bf16 copies of float32 weights, kept for the
    backward: 2 bytes a LoRA parameter (full: a weight of every linear layer and the head). With
    activation checkpointing every block keeps only its input (2hT; full: 4hT), and in the
    backward one block's activations live again while it is recomputed.
  - transients: the loss's logits, their float32 copy and gradients (10VT beyond the 4VT kept), and
    on an NF4 base one dequantized weight (bf16) of the largest linear layer.
  The sum is the estimated peak; CUDA's own context and the allocator's fragmentation come on
  top (`bench/gpu_smoke.py` prints the ratio to torch.cuda.max_memory_allocated on a GPU). A
  process that spreads the base over G GPUs (device_map auto) holds about 1/G of it on each:
  accelerate places whole blocks, so one GPU may carry a block more.
* **Sites of unequal hardware** (`SiteSpec`): each site's peak per GPU at its own rank and base
  precision (the formulas above, on the run's model built at that rank), whether it fits the site's
  GPU, and for a site that states its GPU but not its rank the largest of 4, 8, 16, ... up to the
  run's rank that fits (`largest_fitting_rank`). Its bytes on the wire are the run's: a site of
  less rank (aggregation hetlora) sends and receives the run's rank-R layout, zero-padded.
* **Secure aggregation** at N sites: each worker masks its vector with N AES-256-CTR keystreams
  (its self mask and N - 1 pairwise) and the coordinator removes the N self masks (plus N - d
  pairwise ones for each of d sites that drop after masking), at the keystream rate measured with
  `bench/secagg_keystream.py` (mask_vector, adds included) or given with --keystream-mbps.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from google.protobuf.message import Message
from peft import get_peft_model, get_peft_model_state_dict
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from fedlora_common.blocks import block_groups
from fedlora_common.chunking import DEFAULT_CHUNK_BYTES, chunk_count
from fedlora_common.manifest import (
    MASKED_DTYPE,
    WIRE_DTYPE,
    Manifest,
    TensorSpec,
    adapted_modules,
    module_leaves,
    update_manifest,
)
from fedlora_common.messages import ModelVersion, UploadHeader, UploadKind
from fedlora_common.plans import Aggregation, BasePrecision, LoraSpec, Mode, RunSpec
from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_common.secagg import SecAggParams, identity_keypair, mask_vector, max_bits, round_tag
from fedlora_common.serde import (
    advertisement_to_proto,
    encrypted_share_to_proto,
    model_version_to_proto,
    revealed_share_to_proto,
    upload_header_to_proto,
)
from fedlora_worker.modeling import (
    LoadedModel,
    SiteModel,
    artifact_config_json,
    experts_to_adapt,
    linear_layers,
    lora_config,
)
from fedlora_worker.secagg_session import WorkerSession

__all__ = [
    "GIB",
    "GRPC_PREFIX_BYTES",
    "KEYSTREAM_MB_S",
    "MB",
    "PLANNED_PRECISION",
    "PUBLISHED",
    "Capacity",
    "ChunkWrapper",
    "SitePlan",
    "SiteSpec",
    "capacity",
    "download_chunk",
    "download_header",
    "framed",
    "largest_fitting_rank",
    "measure_keystream",
    "model_config",
    "rank_ladder",
    "stream_wire_bytes",
    "upload_chunk",
    "upload_header",
]

GRPC_PREFIX_BYTES = 5
"""gRPC's length prefix before every message of a stream (compressed flag and 4-byte length)."""

KEYSTREAM_MB_S = 2500.0
"""mask_vector's keystream rate, adds included, on the 2-core development box (bench/README.md, planner)."""

GIB = 2**30
MB = 1e6
PLANNED_PRECISION: dict[Mode, BasePrecision] = {"lora": "bfloat16", "qlora": "nf4", "full": "float32"}
"""How the planner loads the base of each mode unless a site says otherwise."""
SITE_IDS = "site-{:03d}"
"""Site ids in the key exchange that sizes the secure-aggregation messages: 8 characters each."""

# The published configurations (Hugging Face meta-llama/*/config.json), shapes only.
PUBLISHED: dict[str, LlamaConfig] = {
    "Llama-3.2-3B": LlamaConfig(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "Llama-3.1-8B": LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "Llama-3.1-70B": LlamaConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}


# ---- bytes on the wire (bench/comm.py counts with these too) -----------------------------------

ChunkWrapper = Callable[[pb.Chunk], Message]


def upload_chunk(chunk: pb.Chunk) -> Message:
    return pb.UploadMessage(chunk=chunk)


def download_chunk(chunk: pb.Chunk) -> Message:
    return pb.DownloadChunk(chunk=chunk)


def framed(message: Message) -> int:
    """Bytes one message of a stream takes on the wire: its serialization plus gRPC's prefix."""
    return message.ByteSize() + GRPC_PREFIX_BYTES


def stream_wire_bytes(head: Message, payload_bytes: int, chunk_bytes: int, wrap: ChunkWrapper) -> int:
    """Wire bytes of a header message followed by the payload in chunks, without building the payload.

    A chunk message's size depends only on its data length and on the varint width of its seq
    (proto3 omits seq 0), so one probe per (width, length) class sizes every chunk exactly.
    """
    count = chunk_count(payload_bytes, chunk_bytes)
    last_len = payload_bytes - (count - 1) * chunk_bytes

    def size(seq: int, length: int) -> int:
        return framed(wrap(pb.Chunk(seq=seq, data=bytes(length))))

    total = framed(head)
    start = 0
    for stop in (1, 2**7, 2**14, 2**21, 2**28, 2**32):  # seq 0 (omitted), then 1..5-byte varints (uint32)
        if start < count:
            total += (min(stop, count) - start) * size(start, chunk_bytes)
        start = stop
    return total - size(count - 1, chunk_bytes) + size(count - 1, last_len)


def upload_header(
    digest: bytes, payload_bytes: int, chunk_bytes: int, *, kind: UploadKind = UploadKind.DELTA, tag: int = 0
) -> pb.UploadMessage:
    """The header CoordinatorClient.upload sends before a round-1 delta (or masked update)."""
    header = UploadHeader(
        worker_id="clinical",
        run_id="fedlora-run",
        round=1,
        kind=kind,
        base_version=0,
        num_examples=1000,
        total_size=payload_bytes,
        chunk_count=chunk_count(payload_bytes, chunk_bytes),
        sha256=digest,
        dtype=MASKED_DTYPE if kind is UploadKind.MASKED else WIRE_DTYPE,
        train_loss=1.0,
        tag=tag,
    )
    return pb.UploadMessage(header=upload_header_to_proto(header))


def download_header(manifest: Manifest, config_json: str, digest: bytes, chunk_bytes: int) -> pb.DownloadChunk:
    """The header CoordinatorServicer.DownloadGlobal sends before version 1 of the global model."""
    version = ModelVersion(version=1, size_bytes=manifest.nbytes, sha256=digest, manifest=manifest)
    return pb.DownloadChunk(
        header=pb.DownloadHeader(
            model=model_version_to_proto(version),
            chunk_count=chunk_count(manifest.nbytes, chunk_bytes),
            artifact_config_json=config_json,
        )
    )


# ---- the model, on the meta device ------------------------------------------------------------


def model_config(model: str) -> tuple[str, PretrainedConfig]:
    """A name and config for --model: a published shape (`Llama-3.1-8B`, also as `meta-llama/...`), a model
    directory holding config.json, or a config.json file. ValueError in one line otherwise."""
    published = {name.lower(): name for name in PUBLISHED}
    key = model.removeprefix("meta-llama/").lower()
    if key in published:
        name = published[key]
        return name, PUBLISHED[name]
    path = Path(model)
    if path.is_dir() and (path / "config.json").is_file():
        return model, cast(PretrainedConfig, AutoConfig.from_pretrained(path))
    if path.is_file():
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
            kind = values.pop("model_type")
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ValueError(f"--model {model}: not a config.json with a model_type ({exc})") from None
        return model, AutoConfig.for_model(kind, **values)
    known = ", ".join(PUBLISHED)
    raise ValueError(f"--model {model}: neither a model directory with config.json, a config.json, nor one of {known}")


@dataclass(frozen=True)
class Shapes:
    """What the memory formulas need of a config (names as transformers' configs spell them)."""

    architecture: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_width: int
    vocab: int

    @classmethod
    def of(cls, config: PretrainedConfig) -> Shapes:
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        intermediate = next(
            (
                getattr(config, name)
                for name in ("intermediate_size", "ffn_dim", "n_inner")
                if getattr(config, name, None)
            ),
            4 * hidden,
        )
        return cls(
            architecture=(config.architectures or [type(config).__name__.replace("Config", "ForCausalLM")])[0],
            layers=int(config.num_hidden_layers),
            hidden=hidden,
            intermediate=int(intermediate),
            heads=heads,
            kv_width=int(kv_heads) * int(head_dim),
            vocab=int(config.vocab_size),
        )


@dataclass(frozen=True)
class MetaModel:
    """Counts and manifests of the base and its adapter, from a weightless model."""

    shapes: Shapes
    parameters: int
    linear_weights: int
    """Elements of the linear layers' weights but the output head's: what NF4 quantizes."""
    largest_linear: int
    global_manifest: Manifest
    """The global state that is downloaded: the adapter, or every parameter under mode full."""
    update_manifest: Manifest
    """What a site trains and uploads: the global state, or B alone under FFA."""
    config_json: str
    adapter_inputs: tuple[int, ...]
    """Input width of each module one block adapts (LoRA), for the activation formula."""


def meta_model(name: str, config: PretrainedConfig, mode: Mode, lora: LoraSpec, aggregation: Aggregation) -> MetaModel:
    """Build the model on the meta device, wrap it in the run's LoRA adapter (unless full), and count."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    unique = {id(p): p for p in model.parameters()}.values()
    modules = dict(model.named_modules())
    linear = [modules[n] for n in linear_layers(model)]
    weights = [cast(torch.Tensor, m.weight).numel() for m in linear]
    inputs: tuple[int, ...] = ()
    if mode == "full":
        manifest = Manifest(tuple(TensorSpec(n, tuple(p.shape)) for n, p in model.named_parameters()))
        config_json = model.config.to_json_string()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's and transformers' deprecation notices
            # the worker's own choice: all-linear's modules and a mixture's fused experts, refused as it refuses
            peft_model = get_peft_model(model, lora_config(lora, experts_to_adapt(model, lora, name)))
        adapter = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
        manifest = Manifest(tuple(TensorSpec(n, tuple(t.shape)) for n, t in adapter.items()))
        run = RunSpec(
            run_id="plan", mode=mode, aggregation=aggregation, base_model=name, lora=lora, total_rounds=1, seed=0
        )
        # artifact_config_json reads the adapter's config and the base's path, never the tokenizer.
        loaded = LoadedModel(peft_model, cast(Any, None), run, SiteModel(path=name), manifest)
        config_json = artifact_config_json(loaded)
        inputs = _adapted_inputs(manifest)
    return MetaModel(
        shapes=Shapes.of(config),
        parameters=sum(p.numel() for p in unique),
        linear_weights=sum(weights),
        largest_linear=max(weights, default=0),
        global_manifest=manifest,
        update_manifest=update_manifest(manifest, aggregation),
        config_json=config_json,
        adapter_inputs=inputs,
    )


def _adapted_inputs(manifest: Manifest) -> tuple[int, ...]:
    """The input widths of the modules the first block adapts (`...layers.0.`, `...h.0.`: up to its number)."""
    names = [spec for spec in manifest.tensors if ".lora_A." in spec.name]
    block = re.match(r"^(.*?\.\d+\.)", names[0].name) if names else None
    first = [spec for spec in names if block is not None and spec.name.startswith(block.group(1))]
    return tuple(int(spec.shape[1]) for spec in first)


# ---- memory ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    """Bytes on one training process's GPU(s)."""

    weights: int
    adapter: int
    gradients: int
    optimizer: int
    activations: int
    """What autograd keeps from one micro-batch's forward for its backward."""
    activations_checkpointed: int
    """The same with activation checkpointing: each block's input."""
    recomputed: int
    """With checkpointing, the activations of the block being recomputed in the backward."""
    transient: int
    peak: int
    peak_checkpointed: int


def memory(
    meta: MetaModel,
    mode: Mode,
    lora: LoraSpec,
    *,
    seq_len: int,
    micro_batch: int,
    dropout_mask_bytes: int = 1,
    precision: BasePrecision | None = None,
) -> Memory:
    """The estimate of the module docstring, for micro-batches of micro_batch x seq_len tokens.

    dropout_mask_bytes: what LoRA dropout keeps per input element; CUDA's fused dropout keeps a
    bool mask (1), the CPU's a float32 one (4). precision: how a (Q)LoRA site loads the base
    (default PLANNED_PRECISION[mode]; mode full is planned in float32 only).
    """
    s = meta.shapes
    tokens = seq_len * micro_batch
    trainable = meta.update_manifest.numel
    adapter = 0 if mode == "full" else 4 * meta.global_manifest.numel
    precision = precision or PLANNED_PRECISION[mode]
    if precision == "nf4":
        weights = math.ceil(meta.linear_weights * (0.5 + 4 / 64)) + 2 * (meta.parameters - meta.linear_weights)
    else:
        weights = (4 if precision == "float32" else 2) * meta.parameters
    # autocast's bf16 copies of float32 weights, kept for the backward: in the blocks (dropped with
    # them under checkpointing) and of the head
    if mode == "full":
        block = 30 * s.hidden + 8 * s.intermediate + 4 * s.kv_width
        kept_input, head = 4 * s.hidden, 15 * s.hidden
        block_copies, head_copy = 2 * meta.linear_weights, 2 * s.vocab * s.hidden
    else:
        mask = dropout_mask_bytes if lora.dropout > 0 else 0
        lora_terms = sum((2 + mask) * width + 2 * lora.rank for width in meta.adapter_inputs)
        block = 12 * s.hidden + 6 * s.intermediate + 4 * s.kv_width + lora_terms
        kept_input, head = 2 * s.hidden, 4 * s.hidden
        block_copies, head_copy = 2 * meta.global_manifest.numel, 0
        if precision == "float32":  # the frozen base's copies too, and float32 block inputs
            kept_input, head_copy = 4 * s.hidden, 2 * s.vocab * s.hidden
            block_copies += 2 * meta.linear_weights
    rest = (head + 4 * s.vocab) * tokens + head_copy  # final norm and head input; the loss's log-probabilities
    activations = s.layers * block * tokens + block_copies + rest
    checkpointed = s.layers * kept_input * tokens + rest
    recomputed = block * tokens + block_copies // s.layers
    transient = 10 * s.vocab * tokens + (2 * meta.largest_linear if precision == "nf4" else 0)
    fixed = weights + adapter + 4 * trainable + 8 * trainable
    return Memory(
        weights=weights,
        adapter=adapter,
        gradients=4 * trainable,
        optimizer=8 * trainable,
        activations=activations,
        activations_checkpointed=checkpointed,
        recomputed=recomputed,
        transient=transient,
        peak=fixed + activations + transient,
        peak_checkpointed=fixed + checkpointed + recomputed + transient,
    )


# ---- secure aggregation -------------------------------------------------------------------------


@dataclass(frozen=True)
class SecureAggregation:
    sites: int
    threshold: int
    keystreams_per_site: int
    masking_s: float
    """Each site's masking: its N keystreams over the masked vector."""
    unmasking_s: float
    """The coordinator's unmasking with no dropout: the N self masks."""
    unmasking_per_dropout_s: float
    """What each site that drops after masking adds: N - 1 pairwise masks (an upper bound)."""
    keys_up_bytes: int
    """Per site and round: its advertisement, sealed shares and revealed shares."""
    keys_down_bytes: int
    """Per site and round: the key roster and its inbox of shares, as the coordinator relays them."""
    keystream_mb_s: float


def secure_aggregation(sites: int, masked_bytes: int, keystream_mb_s: float) -> SecureAggregation:
    """Cost at `sites`: keystream seconds at the given rate, message bytes from a real exchange of that size."""
    up, down, threshold = _key_traffic(sites)
    seconds = masked_bytes / (keystream_mb_s * MB)
    return SecureAggregation(
        sites=sites,
        threshold=threshold,
        keystreams_per_site=sites,
        masking_s=sites * seconds,
        unmasking_s=sites * seconds,
        unmasking_per_dropout_s=(sites - 1) * seconds,
        keys_up_bytes=up,
        keys_down_bytes=down,
        keystream_mb_s=keystream_mb_s,
    )


def _key_traffic(sites: int) -> tuple[int, int, int]:
    """One site's key and share messages when `sites` take part and none drops: (up, down, threshold).

    Real worker sessions advertise, share and mask, so each message is built from the round's
    actual objects (as bench/secagg.py sizes them)."""
    ids = tuple(SITE_IDS.format(i) for i in range(sites))
    identities = {w: identity_keypair() for w in ids}
    public = {w: k.public for w, k in identities.items()}
    tag = round_tag(1, 1)
    params = SecAggParams(
        run_id="fedlora-run",
        tag=tag,
        participants=ids,
        threshold=SecAggParams.threshold_for(sites, 2 / 3),
        bits=max_bits(sites),
        clip_range=0.05,
        max_examples=65536,
    )
    sessions = {
        w: WorkerSession(worker_id=w, params=params, identity_private=identities[w].private, peer_identities=public)
        for w in ids
    }
    roster = [session.advertise() for session in sessions.values()]
    shares = {w: session.share_keys(roster) for w, session in sessions.items()}
    me = ids[0]
    inbox = [share for w in ids if w != me for share in shares[w] if share.recipient == me]
    sessions[me].mask_seeds(inbox, ids)
    revealed = sessions[me].reveal(ids, ())
    run_id = params.run_id
    up = (
        framed(pb.AdvertiseKeysRequest(worker_id=me, run_id=run_id, tag=tag, keys=advertisement_to_proto(roster[0])))
        + framed(
            pb.ShareKeysRequest(
                worker_id=me, run_id=run_id, tag=tag, shares=[encrypted_share_to_proto(s) for s in shares[me]]
            )
        )
        + framed(
            pb.RevealSharesRequest(
                worker_id=me, run_id=run_id, tag=tag, shares=[revealed_share_to_proto(r) for r in revealed]
            )
        )
    )
    down = framed(pb.SecAggPlan(roster=[advertisement_to_proto(a) for a in roster])) + framed(
        pb.SecAggPlan(inbox=[encrypted_share_to_proto(s) for s in inbox])
    )
    return up, down, params.threshold


def measure_keystream(megabytes: int = 32, repeats: int = 3) -> float:
    """mask_vector's rate here, in MB of keystream per second (self mask and 4 pairwise, adds included)."""
    values = np.zeros(megabytes * 2**20 // 4, dtype=np.uint32)
    pairwise = [(os.urandom(32), 1 if i % 2 else -1) for i in range(4)]
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        mask_vector(values, self_seed=os.urandom(32), pairwise=pairwise)
        best = min(best, time.perf_counter() - started)
    return 5 * values.nbytes / best / MB


# ---- sites of unequal hardware --------------------------------------------------------------------


@dataclass(frozen=True)
class SiteSpec:
    """One site as `--site` states it; rank None asks for the largest rank that fits gpu_bytes, the memory of
    each of its `gpus` cards (a training process a card: each holds a whole replica)."""

    name: str
    rank: int | None
    precision: BasePrecision
    gpu_bytes: int | None = None
    gpus: int = 1


@dataclass(frozen=True)
class SitePlan:
    """One site's row: peak_bytes per GPU at its rank and precision (with activation checkpointing when the
    run trains with it); wire bytes the run's, per round."""

    name: str
    rank: int
    auto_rank: bool
    precision: BasePrecision
    peak_bytes: int
    checkpointing: bool
    gpu_bytes: int | None
    gpus: int
    fits: bool | None
    """peak_bytes <= gpu_bytes; None without a stated GPU."""
    down_bytes: int
    up_plain_bytes: int
    up_masked_bytes: int


def rank_ladder(run_rank: int) -> tuple[int, ...]:
    """The ranks a site may be offered, 4, 8, 16, ... up to the run's, largest first (the run's alone below 4)."""
    ladder = [4]
    while ladder[-1] * 2 <= run_rank:
        ladder.append(ladder[-1] * 2)
    return tuple(reversed([r for r in ladder if r <= run_rank])) or (run_rank,)


def largest_fitting_rank(run_rank: int, gpu_bytes: int, peak_at: Callable[[int], int]) -> int | None:
    """The largest rank of rank_ladder whose peak_at(rank) fits gpu_bytes; None if not even the least does.

    The peak grows with the rank, so the ladder is walked down and stops at the first that fits.
    """
    return next((rank for rank in rank_ladder(run_rank) if peak_at(rank) <= gpu_bytes), None)


def _site_rank(
    spec: SiteSpec, peak_at: Callable[[int, BasePrecision], int], *, run_rank: int, aggregation: Aggregation
) -> int:
    """The rank a site trains: as given, or under auto the largest that fits its GPU (the ladder's least, not
    fitting, when none does; without hetlora the run's, the only one allowed). ValueError in one line for a
    rank above the run's, or below it without hetlora (the worker refuses such a site at join)."""
    if spec.rank is not None:
        rank = spec.rank
    elif spec.gpu_bytes is None:
        raise ValueError(f"--site {spec.name}: rank=auto needs gpu= to fit the rank to")
    elif aggregation != "hetlora":
        rank = run_rank
    else:
        fitting = largest_fitting_rank(run_rank, spec.gpu_bytes, lambda r: peak_at(r, spec.precision))
        rank = fitting or rank_ladder(run_rank)[-1]
    if rank > run_rank:
        raise ValueError(f"--site {spec.name}: rank {rank} exceeds the run's --rank {run_rank}")
    if rank < run_rank and aggregation != "hetlora":
        raise ValueError(
            f"--site {spec.name}: rank {rank} is below the run's {run_rank}, which only --aggregation hetlora "
            "allows (under fedavg and ffa every site trains the run's rank)"
        )
    return rank


def _site_plans(
    specs: Sequence[SiteSpec],
    peak_at: Callable[[int, BasePrecision], int],
    *,
    run_rank: int,
    aggregation: Aggregation,
    checkpointing: bool,
    wire: tuple[int, int, int],
) -> tuple[SitePlan, ...]:
    """Each site's row, in the order given; peak_at(rank, precision) is a process's peak per GPU, wire the
    run's (down, up plain, up masked) bytes."""
    down, up_plain, up_masked = wire
    rows = []
    for spec in specs:
        rank = _site_rank(spec, peak_at, run_rank=run_rank, aggregation=aggregation)
        peak = peak_at(rank, spec.precision)
        rows.append(
            SitePlan(
                name=spec.name,
                rank=rank,
                auto_rank=spec.rank is None,
                precision=spec.precision,
                peak_bytes=peak,
                checkpointing=checkpointing,
                gpu_bytes=spec.gpu_bytes,
                gpus=spec.gpus,
                fits=None if spec.gpu_bytes is None else peak <= spec.gpu_bytes,
                down_bytes=down,
                up_plain_bytes=up_plain,
                up_masked_bytes=up_masked,
            )
        )
    return tuple(rows)


# ---- the plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capacity:
    """Per site and per round; JSON as `--json` prints it."""

    model: str
    architecture: str
    mode: Mode
    aggregation: Aggregation
    rank: int
    targets: tuple[str, ...]
    adapted: tuple[str, ...]
    """What the targets resolve to on this model, by last name (all-linear: q_proj, ..., experts)."""
    adapted_per_block: int
    seq_len: int
    micro_batch: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    parameters: int
    trainable: int
    trainable_fraction: float
    down_bytes: int
    up_plain_bytes: int
    up_masked_bytes: int
    memory: Memory
    gpus_per_process: int
    """GPUs one training process spreads the base over (device_map auto); 1: one GPU a process."""
    secure_aggregation: SecureAggregation
    sites: tuple[SitePlan, ...] = ()
    """One row per --site, in the order given."""

    def to_json(self) -> dict[str, Any]:
        """asdict, with `sites` only when sites were planned (the JSON of a plan without them is unchanged)."""
        data = asdict(self)
        if not self.sites:
            del data["sites"]
        return data


def capacity(
    model: str,
    *,
    mode: Mode = "lora",
    lora: LoraSpec | None = None,
    aggregation: Aggregation = "fedavg",
    seq_len: int = 2048,
    micro_batch: int = 1,
    sites: int = 3,
    gpus_per_process: int = 1,
    keystream_mb_s: float = KEYSTREAM_MB_S,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    site_specs: Sequence[SiteSpec] = (),
    gradient_checkpointing: bool = False,
) -> Capacity:
    """The plan for `model` (see model_config) as fedlora-lab plan prints it.

    site_specs adds a row per site (see SitePlan), whose peak counts activation checkpointing when
    the run trains with it (gradient_checkpointing, for the whole run).
    """
    lora = lora or LoraSpec()
    if site_specs and mode == "full":
        raise ValueError("--site: a site's rank and base precision are LoRA's; mode full trains every weight")
    name, config = model_config(model)
    meta = meta_model(name, config, mode, lora, aggregation)
    metas = {lora.rank: meta}

    def peak_at(rank: int, precision: BasePrecision) -> int:
        at_rank = lora.model_copy(update={"rank": rank})
        if rank not in metas:
            metas[rank] = meta_model(name, config, mode, at_rank, aggregation)
        m = memory(metas[rank], mode, at_rank, seq_len=seq_len, micro_batch=micro_batch, precision=precision)
        return math.ceil((m.peak_checkpointed if gradient_checkpointing else m.peak) / gpus_per_process)

    digest = bytes(32)  # a SHA-256 is 32 bytes whatever its value
    sent = meta.update_manifest
    down = stream_wire_bytes(
        download_header(meta.global_manifest, meta.config_json, digest, chunk_bytes),
        meta.global_manifest.nbytes,
        chunk_bytes,
        download_chunk,
    )
    up_plain = stream_wire_bytes(
        upload_header(digest, sent.nbytes, chunk_bytes), sent.nbytes, chunk_bytes, upload_chunk
    )
    weight_count = block_groups(sent, rank=lora.rank, heterogeneous=aggregation == "hetlora").count
    masked = (sent.numel + weight_count) * 4  # the update, then its weight (hetlora: one per block group)
    tag = round_tag(1, 1)
    up_masked = stream_wire_bytes(
        upload_header(digest, masked, chunk_bytes, kind=UploadKind.MASKED, tag=tag), masked, chunk_bytes, upload_chunk
    )
    return Capacity(
        model=name,
        architecture=meta.shapes.architecture,
        mode=mode,
        aggregation=aggregation,
        rank=lora.rank,
        targets=lora.target_modules,
        adapted=module_leaves(adapted_modules(t.name for t in meta.global_manifest.tensors)),
        adapted_per_block=len(meta.adapter_inputs),
        seq_len=seq_len,
        micro_batch=micro_batch,
        layers=meta.shapes.layers,
        hidden=meta.shapes.hidden,
        intermediate=meta.shapes.intermediate,
        vocab=meta.shapes.vocab,
        parameters=meta.parameters,
        trainable=sent.numel,
        trainable_fraction=sent.numel / meta.parameters,
        down_bytes=down,
        up_plain_bytes=up_plain,
        up_masked_bytes=up_masked,
        memory=memory(meta, mode, lora, seq_len=seq_len, micro_batch=micro_batch),
        gpus_per_process=gpus_per_process,
        secure_aggregation=secure_aggregation(sites, masked, keystream_mb_s),
        sites=_site_plans(
            site_specs,
            peak_at,
            run_rank=lora.rank,
            aggregation=aggregation,
            checkpointing=gradient_checkpointing,
            wire=(down, up_plain, up_masked),
        ),
    )
