"""Shared fixtures: a tiny BPE tokenizer and tiny random-weight Llama / GPT-NeoX / Qwen2 models, built
in-process (no network), plus small Q/A files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "### Question:\nWhat is the capital of France?\n\n### Answer:\nThe capital of France is Paris.",
    "### Question:\nWhat is the capital of Peru?\n\n### Answer:\nThe capital of Peru is Lima.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "the quick brown fox jumps over the lazy dog 0123456789",
    "Japan Tokyo Kenya Nairobi Chile Santiago Egypt Cairo India New Delhi Spain Madrid",
]
COUNTRIES = [
    ("France", "Paris"), ("Peru", "Lima"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Chile", "Santiago"),
    ("Egypt", "Cairo"), ("India", "New Delhi"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Canada", "Ottawa"),
    ("Ghana", "Accra"), ("Nepal", "Kathmandu"),
]  # fmt: skip


def build_tokenizer(out: Path, chat_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
    fast.save_pretrained(out)
    return fast


LLAMA2_CHAT = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)
ZEPHYR_CHAT = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def build_sp_tokenizer(style: str = "legacy", chat_template: str | None = LLAMA2_CHAT):
    """A small SentencePiece-style tokenizer (BPE with byte fallback, "▁" for spaces, a dummy prefix
    before each call's text, BOS added, EOS "</s>"), as Llama 2 / Mistral / TinyLlama ship them.
    style: "legacy" (Llama 2's tokenizer.json: a Prepend("▁") normalizer, prefix on every split of the
    text, a leading space or not), "always" / "first" (a Metaspace pre-tokenizer with that
    prepend_scheme: "first" puts it only before the text's first split, not after a special token)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=450, special_tokens=specials, show_progress=False)
    lines = CORPUS + [f"What is the capital of {c}? The capital of {c} is {a}." for c, a in COUNTRIES]
    tok.train_from_iterator(lines * 5, trainer)
    # The 256 byte tokens as ordinary vocabulary (as SentencePiece has them), for characters it lacks.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    if style == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=style)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = chat_template
    return fast


def build_model(kind: str, tokenizer, out: Path, seed: int = 0, width: int = 32) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shapes = {
        "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
        "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=512, use_parallel_residual=True),
        "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
    }[kind]  # fmt: skip
    shapes.update(hidden_size=width, intermediate_size=2 * width)
    config = AutoConfig.for_model(
        kind,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **shapes,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {k: build_model(k, tokenizer, root / k) for k in ("llama", "gpt_neox", "qwen2")}


@pytest.fixture(scope="session")
def llama_dir(tiny_models) -> Path:
    return tiny_models["llama"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_rows() -> list[dict]:
    """36 distinct question/answer rows: 12 countries x 3 wordings."""
    wordings = (
        "What is the capital of {c}?",
        "Which city is the capital of {c}?",
        "Name the capital of {c}.",
    )
    return [
        {"question": w.format(c=c), "answer": f"The capital of {c} is {cap}."}
        for w in wordings
        for c, cap in COUNTRIES
    ]


def addition_rows() -> list[dict]:
    """48 distinct question/answer rows: "What is a plus b?" for a in 1..8, b in 1..6."""
    return [
        {"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}."}
        for a in range(1, 9)
        for b in range(1, 7)
    ]


@pytest.fixture
def qa_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", qa_rows())
