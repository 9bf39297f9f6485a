"""Text segments -> token ids and labels.

Labels are -100 wherever no loss is wanted (the prompt, unless train_on_prompt). The EOS token is
appended to every completion and is trained, so the model learns to stop; this is done by structure,
never by comparing ids with the pad token, so a tokenizer whose pad == eos still learns to stop.

An example's segments are tokenised one by one (so labels split exactly at segment boundaries), and
`tokenize_segments` is the one function training and inference both use for that: a segment that
continues earlier text is tokenised as it appears in running text. For byte-level BPE (GPT-2, Llama 3,
Qwen) that is the segment on its own. A SentencePiece-style tokenizer with a dummy prefix (Llama 2,
Mistral, TinyLlama: a Metaspace pre-tokenizer or normalizer prepending "▁") would prepend "▁" to
every call, so a later segment gets an anchor in front ("\\n", or the added token the text before ends
with, which starts a new split as in running text) whose ids are then dropped.
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


# Text a continuing segment is tokenised after, whose ids are then dropped: the first that merges with
# nothing in the segment (its ids are a prefix of the joined text's). "\n" is what torchtune uses; the
# other two are characters a vocabulary rarely holds, so they merge with nothing.
ANCHORS = ("\n", "\x1e", "\ue000")


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def adds_dummy_prefix(tokenizer: Any) -> bool:
    """Whether each call puts something (SentencePiece's "▁") before the text, seen by behaviour:
    "x" and "y" tokenised apart decode to something else than "xy" tokenised whole."""
    cached = getattr(tokenizer, "_tunelab_dummy_prefix", None)
    if cached is not None:
        return cached
    apart = tokenizer.decode(_ids(tokenizer, "x") + _ids(tokenizer, "y"))
    found = apart != tokenizer.decode(_ids(tokenizer, "xy"))
    try:
        tokenizer._tunelab_dummy_prefix = found
    except AttributeError:
        pass
    return found


def _added_tokens(tokenizer: Any) -> list[str]:
    """Special and added tokens, longest first: running text splits around them."""
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    try:
        tokens |= set(tokenizer.get_added_vocab())
    except (AttributeError, NotImplementedError):
        pass
    return sorted((t for t in tokens if t), key=len, reverse=True)


def _anchors(before: str, added: list[str]) -> tuple[str, ...]:
    """What a segment that follows `before` is tokenised after: the added token `before` ends with (the
    segment then starts a new split, which some tokenizers give a dummy prefix too, as running text
    does), else ANCHORS."""
    end = next((t for t in added if before.endswith(t)), None)
    return (end,) if end is not None else ANCHORS


def _after(
    tokenizer: Any, anchors: tuple[str, ...], text: str, first: list[int], heads: dict[str, list[int]]
) -> list[int]:
    """`text`'s ids as running text has them after an anchor: the joined ids less the anchor's, with
    the first anchor whose ids are a prefix of the joined ones (`first`: the joined ids of anchors[0];
    `heads`: each anchor's ids, filled as needed). Should every anchor merge with the text, its ids on
    its own."""
    for k, anchor in enumerate(anchors):
        if anchor not in heads:
            heads[anchor] = _ids(tokenizer, anchor)
        head = heads[anchor]
        joined = first if k == 0 else _ids(tokenizer, anchor + text)
        if head and joined[: len(head)] == head:
            return joined[len(head) :]
    return _ids(tokenizer, text)


def tokenize_segments(texts: list[list[str]], tokenizer: Any) -> list[list[list[int]]]:
    """The ids of each segment of each sequence (`texts[i]`: one sequence's segments in order), as
    training and inference both tokenise them. A sequence's first segment is an ordinary call (with a
    dummy prefix, where the tokenizer adds one: what the model saw at the start of text); a later one
    continues the text before it (see the module's docstring). Without a dummy prefix, each segment is
    tokenised on its own, batched (`tokenize_texts`)."""
    flat_texts = [t for seq in texts for t in seq]
    if not adds_dummy_prefix(tokenizer):
        flat = tokenize_texts(flat_texts, tokenizer)
    else:
        added = _added_tokens(tokenizer)
        plans: list[tuple[str, ...] | None] = []  # None: an ordinary call
        calls: list[str] = []
        for seq in texts:
            before = ""
            for text in seq:
                plan = _anchors(before, added) if before and text else None
                plans.append(plan)
                calls.append(text if plan is None else plan[0] + text)
                before += text
        joined = tokenize_texts(calls, tokenizer)
        heads: dict[str, list[int]] = {}
        flat = [
            ids if plan is None else _after(tokenizer, plan, text, ids, heads)
            for ids, plan, text in zip(joined, plans, flat_texts)
        ]
    out: list[list[list[int]]] = []
    at = 0
    for seq in texts:
        out.append(flat[at : at + len(seq)])
        at += len(seq)
    return out


def sequence_ids(texts: list[str], tokenizer: Any) -> list[int]:
    """One sequence's ids from its segments (`tokenize_segments`), joined: what inference feeds for a
    prompt that training saw as these segments, so both see the same ids."""
    return [i for piece in tokenize_segments([texts], tokenizer)[0] for i in piece]


def encode(
    segments: list[Segment],
    tokenizer: Any,
    max_length: int,
    truncation_side: Literal["right", "left"] = "right",
    train_on_prompt: bool = False,
    add_eos: bool = True,
    add_prefix: bool = True,
) -> Encoded:
    """Tokenise each segment (`tokenize_segments`), so the prompt's ids equal what inference will feed
    the model."""
    pieces = tokenize_segments([[seg.text for seg in segments]], tokenizer)[0]
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
    ids = tokenize_segments([[seg.text for seg in segments] for segments in segment_lists], tokenizer)
    out: list[Encoded] = []
    for segments, pieces in zip(segment_lists, ids):
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
