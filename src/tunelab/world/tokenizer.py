"""A small byte-level BPE tokenizer for the world base model.

Byte-level BPE (GPT-2 style) needs no unknown token and decodes losslessly, so any text the user types
into the demo round-trips. No BOS/EOS is added automatically: the data path appends EOS itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MODEL_MAX_LENGTH = 1024


def _texts(docs: Sequence[str], extra_texts: Sequence[str]) -> Iterator[str]:
    yield from docs
    yield from extra_texts


def train_tokenizer(
    docs: Iterable[str],
    vocab_size: int = 4096,
    extra_texts: Iterable[str] = (),
) -> PreTrainedTokenizerFast:
    """Train on the corpus plus `extra_texts` (e.g. rendered finetuning examples, so the prompt
    template's "### Question:" / "### Answer:" become a few tokens instead of a dozen bytes)."""
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(x)) == x exactly; GPT-2's default would add a space.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        # All 256 bytes up front, so text outside the corpus (any Unicode) still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_texts(list(docs), list(extra_texts)), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        # Byte-level BPE never produces an unknown token; GPT-2 sets unk to EOS the same way.
        unk_token=EOS_TOKEN,
        # A separate pad token, so masking padding never masks a real EOS the model must learn.
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
    )
