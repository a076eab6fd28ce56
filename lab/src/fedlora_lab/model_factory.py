"""Build the lab's small Llama base model from scratch, so demos and tests need no hub download.

The model is pre-trained for a few minutes on ``pretraining_corpus``: long enough to speak the
domains' language (held-out loss far below uniform), short and narrow enough that federated
fine-tuning on site data still has templates to learn (see ``datagen`` for what is held out).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, get_args

import structlog
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fedlora_lab.datagen import DOMAINS, DataSpec, Domain, generate_site, pretraining_corpus
from fedlora_lab.tokenizer import train_tokenizer

__all__ = [
    "LAB_MODEL_FILE",
    "LAB_SIZES",
    "LabModelConfig",
    "LabSize",
    "MadeModel",
    "ProgressFn",
    "cached_model",
    "make_model",
]

ProgressFn = Callable[[int, int, float], None]
"""Called after every pre-training step with (step, total_steps, loss)."""

LabSize = Literal["default", "small", "tiny"]
LAB_SIZES: Final[tuple[LabSize, ...]] = get_args(LabSize)

LAB_MODEL_FILE: Final = "lab_model.json"
# Bump when the corpus, the tokenizer or the training loop changes, so caches are rebuilt.
_VERSION: Final = "lab-model/1"
_WARMUP_FRACTION: Final = 0.05
_FINAL_LR_FRACTION: Final = 0.1
_LOSS_WINDOW: Final = 10
_EVAL_BATCH: Final = 8


@dataclass(frozen=True)
class LabModelConfig:
    """Shape and pre-training budget of the lab base model; every field enters the cache key.

    The defaults train on 1.02M tokens (250 steps of 16 x 256), about 8 minutes on two quiet cores
    (~2,100 tokens/s), and reach 2.71 nats on held-out site records (uniform: 8.32). Half the
    batch halves the time and costs 0.3-0.6 nats.
    """

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    max_seq_len: int = 256
    pretrain_docs: int = 3000
    pretrain_steps: int = 250
    batch_size: int = 16
    learning_rate: float = 3e-3
    eval_docs: int = 40
    seed: int = 0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "learning_rate":
                ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1
                if not ok:
                    raise ValueError(f"learning_rate: must be a number in (0, 1), got {value!r}")
                continue
            low = 0 if field.name == "seed" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{field.name}: must be an integer >= {low}, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads: must divide hidden_size {self.hidden_size}, got {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: must divide num_heads {self.num_heads}, got {self.num_kv_heads}")

    @classmethod
    def named(cls, size: LabSize) -> LabModelConfig:
        """The lab's model sizes by name: default, small (a quarter of default's compute a token), tiny."""
        if size == "small":
            return cls.small()
        return cls.tiny() if size == "tiny" else cls()

    @classmethod
    def small(cls) -> LabModelConfig:
        """Half the width of the default: ~3x the tokens a second, for experiments that need many epochs."""
        return cls(hidden_size=128, intermediate_size=344)

    @classmethod
    def tiny(cls) -> LabModelConfig:
        """A model that builds in seconds, for tests: small, barely trained, still below uniform loss."""
        return cls(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=172,
            num_layers=2,
            num_heads=2,
            num_kv_heads=2,
            max_seq_len=128,
            pretrain_docs=150,
            pretrain_steps=40,
            batch_size=8,
            learning_rate=5e-3,
            eval_docs=4,
        )

    def fingerprint(self) -> str:
        """A stable cache key: the fields plus the build version."""
        payload = json.dumps({"version": _VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class MadeModel:
    """A built (or reused) lab model and how good it is, in nats per token."""

    path: Path
    pretrain_loss: float
    heldout_loss: float
    heldout_by_domain: Mapping[Domain, float]
    uniform_loss: float
    seconds: float
    reused: bool = False


def _pack(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> torch.Tensor:
    """One long token stream: each document as BOS ... EOS, back to back."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for row in tokenizer(list(texts))["input_ids"]:
        ids.extend(row)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak rate."""
    warmup = max(1, round(_WARMUP_FRACTION * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return _FINAL_LR_FRACTION + (1 - _FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def _pretrain(
    model: LlamaForCausalLM, stream: torch.Tensor, config: LabModelConfig, progress: ProgressFn | None
) -> float:
    """Train on random windows of the stream; return the mean loss of the last steps."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config.pretrain_steps))
    window = min(config.max_seq_len, len(stream))
    offsets = torch.arange(window)
    losses: list[float] = []
    model.train()
    for step in range(config.pretrain_steps):
        starts = torch.randint(0, len(stream) - window + 1, (config.batch_size,), generator=generator)
        batch = stream[starts[:, None] + offsets]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, config.pretrain_steps, losses[-1])
    model.eval()  # type: ignore[no-untyped-call]
    tail = losses[-_LOSS_WINDOW:]
    return sum(tail) / len(tail)


@torch.no_grad()
def _stream_loss(model: LlamaForCausalLM, stream: torch.Tensor, window: int) -> float:
    """Mean next-token loss over a stream cut into consecutive windows, weighted by tokens."""
    blocks = [block for block in torch.split(stream, window) if len(block) > 1]
    total, count = 0.0, 0
    for i in range(0, len(blocks), _EVAL_BATCH):
        labels = torch.nn.utils.rnn.pad_sequence(blocks[i : i + _EVAL_BATCH], batch_first=True, padding_value=-100)
        logits = model(input_ids=labels.clamp(min=0)).logits[:, :-1]
        targets = labels[:, 1:]
        total += torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum").item()
        count += int((targets != -100).sum())
    return total / count


def _heldout_losses(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, config: LabModelConfig
) -> dict[Domain, float]:
    """Loss on each domain's evaluation records, as a site would generate them."""
    spec = DataSpec(n_train=1, n_eval=config.eval_docs, n_canaries=0, n_controls=0, seed=config.seed)
    return {
        domain: _stream_loss(
            model, _pack(tokenizer, [r["text"] for r in generate_site(domain, spec).eval]), config.max_seq_len
        )
        for domain in DOMAINS
    }


def make_model(out_dir: Path, config: LabModelConfig, *, progress: ProgressFn | None = None) -> MadeModel:
    """Train the tokenizer and the model, and save both into ``out_dir`` (which must not hold files).

    Everything is written into a temporary sibling directory renamed into place at the end, so a
    crash never leaves a half-written model at ``out_dir``.
    """
    log = structlog.get_logger(__name__).bind(fingerprint=config.fingerprint())
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"out_dir: {out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(config.seed)

    corpus = pretraining_corpus(config.pretrain_docs, seed=config.seed)
    tokenizer = train_tokenizer(corpus, vocab_size=config.vocab_size)
    stream = _pack(tokenizer, corpus)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads,
            max_position_embeddings=config.max_seq_len,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    log.info("lab_model_pretrain_start", corpus_tokens=len(stream), parameters=model.num_parameters())
    pretrain_loss = _pretrain(model, stream, config, progress)
    by_domain = _heldout_losses(model, tokenizer, config)
    seconds = time.perf_counter() - started
    made = MadeModel(
        path=out_dir,
        pretrain_loss=pretrain_loss,
        heldout_loss=sum(by_domain.values()) / len(by_domain),
        heldout_by_domain=by_domain,
        uniform_loss=math.log(len(tokenizer)),
        seconds=seconds,
    )
    record = {
        "version": _VERSION,
        "fingerprint": config.fingerprint(),
        "config": dataclasses.asdict(config),
        "pretrain_loss": made.pretrain_loss,
        "heldout_loss": made.heldout_loss,
        "heldout_by_domain": dict(by_domain),
        "uniform_loss": made.uniform_loss,
        "seconds": seconds,
        "corpus_tokens": len(stream),
        "trained_tokens": config.pretrain_steps * config.batch_size * min(config.max_seq_len, len(stream)),
        "parameters": model.num_parameters(),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tokenizer.model_max_length = config.max_seq_len
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / LAB_MODEL_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "lab_model_built",
        path=str(out_dir),
        seconds=round(seconds, 1),
        pretrain_loss=round(pretrain_loss, 3),
        heldout_loss=round(made.heldout_loss, 3),
        uniform_loss=round(made.uniform_loss, 3),
    )
    return made


def _load_made(path: Path, config: LabModelConfig) -> MadeModel | None:
    """The model recorded at ``path`` if it is complete and built from ``config``, else None."""
    try:
        record = json.loads((path / LAB_MODEL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    if record.get("fingerprint") != config.fingerprint() or not all((path / n).is_file() for n in needed):
        return None
    return MadeModel(
        path=path,
        pretrain_loss=float(record["pretrain_loss"]),
        heldout_loss=float(record["heldout_loss"]),
        heldout_by_domain={d: float(record["heldout_by_domain"][d]) for d in DOMAINS},
        uniform_loss=float(record["uniform_loss"]),
        seconds=float(record["seconds"]),
        reused=True,
    )


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an advisory lock so that concurrent processes build a given model once."""
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_model(cache_dir: Path, config: LabModelConfig, *, progress: ProgressFn | None = None) -> MadeModel:
    """Reuse ``cache_dir/<fingerprint>`` if it holds a complete model, else build it there.

    A lock file per fingerprint serialises builders; a waiting process finds the finished model.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = config.fingerprint()
    target = cache_dir / key
    with _exclusive(cache_dir / f"{key}.lock"):
        made = _load_made(target, config)
        if made is not None:
            structlog.get_logger(__name__).info("lab_model_reused", path=str(target), fingerprint=key)
            return made
        # Left by a killed build or a damaged cache; we hold the lock, so nobody else is using them.
        for stale in [target, *cache_dir.glob(f".{key}.tmp-*")]:
            if stale.exists():
                shutil.rmtree(stale)
        return make_model(target, config, progress=progress)
