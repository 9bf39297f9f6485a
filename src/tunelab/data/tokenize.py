"""Text segments -> token ids and labels.

Labels are -100 wherever no loss is wanted (the prompt, unless train_on_prompt). The EOS token is
appended to every completion and is trained, so the model learns to stop; this is done by structure,
never by comparing ids with the pad token, so a tokenizer whose pad == eos still learns to stop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from tunelab.data.templates import Segment

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # unshifted: labels[i] is the target *at* position i (shifted later, per example)
    truncated: bool = False
    completion_tokens_lost: int = 0  # trained tokens (targets, as n_trainable counts them) cut by truncation


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before text on its own (e.g. Llama's BOS); [] for most others."""
    cached = getattr(tokenizer, "_tunelab_prefix", None)
    if cached is not None:
        return cached
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(without)
    prefix = with_special[:n] if n > 0 and with_special[n:] == without else []
    try:
        tokenizer._tunelab_prefix = prefix
    except AttributeError:
        pass
    return prefix


def encode(
    segments: list[Segment],
    tokenizer: Any,
    max_length: int,
    truncation_side: Literal["right", "left"] = "right",
    train_on_prompt: bool = False,
    add_eos: bool = True,
    add_prefix: bool = True,
) -> Encoded:
    """Tokenise each segment on its own, so the prompt's ids equal what inference will feed the model."""
    pieces = [tokenizer(seg.text, add_special_tokens=False)["input_ids"] for seg in segments]
    return assemble(
        pieces, segments, tokenizer, max_length, truncation_side, train_on_prompt, add_eos, add_prefix
    )


def assemble(
    pieces: list[list[int]],
    segments: list[Segment],
    tokenizer: Any,
    max_length: int,
    truncation_side: Literal["right", "left"] = "right",
    train_on_prompt: bool = False,
    add_eos: bool = True,
    add_prefix: bool = True,
) -> Encoded:
    """`encode` once each segment's ids (`pieces`) are known: prefix, labels, EOS, truncation."""
    ids: list[int] = list(special_prefix(tokenizer)) if add_prefix else []
    labels: list[int] = [IGNORE] * len(ids)
    for seg, piece in zip(segments, pieces):
        ids.extend(piece)
        labels.extend(piece if (seg.train or train_on_prompt) else [IGNORE] * len(piece))
    if add_eos and tokenizer.eos_token_id is not None and segments and segments[-1].train:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    enc = Encoded(ids, labels)
    if len(ids) > max_length:
        keep = slice(0, max_length) if truncation_side == "right" else slice(len(ids) - max_length, None)
        kept_labels = labels[keep]
        # Trained tokens as n_trainable counts them: an example's first token is never a target, so a
        # left cut into the answer loses the first kept token's target too.
        # count() rather than a generator: same numbers, several times faster on long examples.
        before, after = labels[1:], kept_labels[1:]
        lost = (len(before) - before.count(IGNORE)) - (len(after) - after.count(IGNORE))
        enc = Encoded(ids[keep], kept_labels, truncated=True, completion_tokens_lost=lost)
    return enc


def _rust_batch_encoder(tokenizer: Any) -> Callable[[list[str]], list[list[int]]] | None:
    """The Rust tokenizer's batch call without offsets, when `tokenizer(...)` adds nothing on top of it
    (some transformers subclasses pre-process text in Python); None otherwise. Measured 2.1x faster
    than the transformers call on 20k short answers. Must run after one ordinary call, which sets the
    Rust side's truncation and special-token options the way `tokenizer(...)` wants them."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    cls = type(tokenizer)
    if (
        not isinstance(tokenizer, TokenizersBackend)
        or cls._encode_plus is not TokenizersBackend._encode_plus
        or cls.__call__ is not PreTrainedTokenizerBase.__call__
        or not hasattr(backend, "encode_batch_fast")
    ):
        return None
    return lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def tokenize_texts(texts: list[str], tokenizer: Any, batch_size: int = 1024) -> list[list[int]]:
    """`tokenizer(text, add_special_tokens=False)["input_ids"]` for many texts, in batched calls: a
    fast tokenizer's batch call skips most of the per-call Python overhead that dominates short texts."""
    out: list[list[int]] = []
    fast = None
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        if fast is not None:
            out.extend(fast(batch))
            continue
        ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        if start == 0 and len(texts) > batch_size:
            fast = _rust_batch_encoder(tokenizer)
            if fast is not None and fast(batch) != ids:  # a guard: never trade exactness for speed
                fast = None
        out.extend(ids)
    return out


def encode_many(
    segment_lists: list[list[Segment]],
    tokenizer: Any,
    max_length: int,
    truncation_side: Literal["right", "left"] = "right",
    train_on_prompt: bool = False,
    add_eos: bool = True,
    add_prefix: bool = True,
) -> list[Encoded]:
    """`encode` for many examples, tokenised in batches; the results are identical to `encode`'s."""
    flat = tokenize_texts([seg.text for segments in segment_lists for seg in segments], tokenizer)
    out: list[Encoded] = []
    at = 0
    for segments in segment_lists:
        pieces = flat[at : at + len(segments)]
        at += len(segments)
        out.append(
            assemble(
                pieces, segments, tokenizer, max_length, truncation_side, train_on_prompt, add_eos, add_prefix
            )
        )
    return out


def n_trainable(enc: Encoded) -> int:
    """Tokens that carry loss once shifted: the first position predicts nothing."""
    shifted = enc.labels[1:]
    return len(shifted) - shifted.count(IGNORE)
