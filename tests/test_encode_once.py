"""A run tokenises each text once: the data check's encoded examples are what training receives, the
same ones the run encodes itself with the check off."""

from collections import Counter

import pytest

from conftest import build_sp_tokenizer, qa_rows, write_jsonl
from tunelab import runner
from tunelab.config import load_config
from tunelab.data import check, encodings, templates
from tunelab.data.tokenize import ANCHORS, adds_dummy_prefix, special_prefix


def _world_tokenizer():
    from tunelab.models import load_tokenizer, world_base_path

    return load_tokenizer(str(world_base_path()))


def _counting(tokenizer) -> Counter:
    """Count every text the tokenizer is called on (a batch call counts each of its texts). A class of
    its own: `tokenize_texts` then never takes the Rust batch path, so every call is seen here."""
    special_prefix(tokenizer), adds_dummy_prefix(tokenizer)  # the probes, cached: not data
    seen: Counter = Counter()
    base = type(tokenizer)

    def call(self, text, *args, **kwargs):
        seen.update([text] if isinstance(text, str) else text)
        return base.__call__(self, text, *args, **kwargs)

    tokenizer.__class__ = type("Counting" + base.__name__, (base,), {"__call__": call})
    return seen


def _data(tmp_path, kind: str):
    rows = [{**r, "answer": f"{r['answer']} ({i})"} for i, r in enumerate(qa_rows())]  # all distinct
    if kind == "chat":
        rows = [
            {
                "messages": [
                    {"role": "user", "content": r["question"]},
                    {"role": "assistant", "content": r["answer"]},
                ]
            }
            for r in rows
        ]
    elif kind == "pretrain":  # documents of many lengths, several chunks long
        rows = [{"text": f"{r['question']} {r['answer']} " * (1 + i % 7)} for i, r in enumerate(rows)]
    return write_jsonl(tmp_path / f"{kind}.jsonl", rows)


def _prepare(tmp_path, kind: str, tokenizer, mode: str, **data):
    values = {
        "task": "pretrain" if kind == "pretrain" else "sft",
        "data": {"path": str(_data(tmp_path, kind)), "check": mode, "eval_ratio": 0.2, **data},
    }
    if kind == "pretrain":
        values["data"]["chunk_length"] = 16
    else:
        values["data"].setdefault("max_length", 24)  # short enough that some examples are cut
    seen = _counting(tokenizer)
    train_ex, eval_ex, _, _ = runner._prepare_data(load_config(None, values=values), tokenizer)
    return train_ex, eval_ex, Counter(seen)


TOKENIZERS = {
    "bytelevel": None,  # the conftest fixture
    "dummy_prefix_bos": lambda: build_sp_tokenizer("legacy"),
    "world": _world_tokenizer,
}


@pytest.mark.parametrize(
    "kind,tok,data",
    [
        ("qa", "bytelevel", {}),
        ("qa", "bytelevel", {"truncation_side": "left", "train_on_prompt": True}),
        ("chat", "bytelevel", {}),
        ("pretrain", "bytelevel", {}),
        ("qa", "dummy_prefix_bos", {}),
        ("chat", "dummy_prefix_bos", {"max_length": 40}),
        ("pretrain", "dummy_prefix_bos", {}),
        ("qa", "world", {}),
        ("pretrain", "world", {}),
    ],
)
def test_training_gets_the_same_examples_with_each_text_tokenised_once(tmp_path, tokenizer, kind, tok, data):
    tokenizer = tokenizer if TOKENIZERS[tok] is None else TOKENIZERS[tok]()
    off_train, off_eval, off_calls = _prepare(tmp_path, kind, tokenizer, "off", **data)
    on_train, on_eval, on_calls = _prepare(tmp_path, kind, tokenizer, "warn", **data)
    assert off_train and off_eval
    assert (on_train, on_eval) == (off_train, off_eval)
    if kind != "pretrain":
        assert any(e.truncated for e in off_train)  # the settings matter, and were applied alike
    # The check adds no tokenizer call: each text the run needs is tokenised once.
    assert on_calls == off_calls
    assert {text for text, n in off_calls.items() if n > 1} <= set(ANCHORS)
    assert len(off_calls) >= 36  # every row's text went through this tokenizer


def test_examples_built_under_other_settings_are_not_reused(tokenizer):
    qa = templates.resolve("qa", "qa")
    s = check.Settings(max_length=24)
    built = encodings.Encodings(check.recipe(qa, tokenizer, s), ["train"], ["eval"])
    assert encodings.reuse(built, check.recipe(qa, tokenizer, s)) == (["train"], ["eval"])
    assert encodings.reuse(None, check.recipe(qa, tokenizer, s)) is None
    others = [
        check.recipe(templates.resolve("raw", "qa"), tokenizer, s),
        check.recipe(qa, build_sp_tokenizer("legacy"), s),
        check.recipe(qa, tokenizer, check.Settings(max_length=25)),
        check.recipe(qa, tokenizer, check.Settings(max_length=24, truncation_side="left")),
        check.recipe(qa, tokenizer, check.Settings(max_length=24, train_on_prompt=True)),
        check.recipe(qa, tokenizer, check.Settings(max_length=24, chunk_length=16)),
    ]
    assert all(encodings.reuse(built, other) is None for other in others)
