"""A byte-level BPE tokenizer trained locally, so the lab needs no hub download.

Byte-level BPE encodes any text without unknown tokens; the special tokens follow the Llama
convention (a beginning-of-sequence token is added to every encoding, the end-of-sequence token is
appended by whoever packs documents), so the saved directory loads with ``AutoTokenizer``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["BOS", "EOS", "PAD", "UNK", "train_tokenizer"]

BOS: Final = "<s>"
EOS: Final = "</s>"
PAD: Final = "<pad>"
UNK: Final = "<unk>"
_SPECIALS: Final = (PAD, BOS, EOS, UNK)
_MIN_VOCAB: Final = 256 + len(_SPECIALS)


def train_tokenizer(texts: Iterable[str], *, vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with ``vocab_size`` entries at most (fewer if the texts run out of merges)."""
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size: must be >= {_MIN_VOCAB} (256 bytes + special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
