"""SentencePiece-style tokenizers (Llama 2, Mistral, TinyLlama) put a dummy prefix "▁" before every
call's text. Training tokenises an example segment by segment, so each later segment (the answer after
"### Answer:\\n", each later turn of a chat) used to gain a "▁" running text never has, and the prompt
ids training built differed from those inference fed. Here: the ids training builds are the running
text's, inference feeds the ids training saw for the same row, and byte-level tokenizers keep theirs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import COUNTRIES, LLAMA2_CHAT, ZEPHYR_CHAT, build_sp_tokenizer
from tunelab.data import templates
from tunelab.data.dataset import encode_records
from tunelab.data.schema import Record
from tunelab.data.templates import Segment
from tunelab.data.tokenize import IGNORE, encode, encode_many
from tunelab.generate import Generator, RenderedPrompt

STYLES = ["legacy", "always", "first"]
QA = {"question": "What is the capital of France?", "answer": "Paris"}
ALPACA = {"instruction": "Name the capital.", "input": "France", "output": "The capital is Paris."}
CHAT = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "What is the capital of Peru?"},
    {"role": "assistant", "content": "Lima"},
]
CHATS = {"llama2": LLAMA2_CHAT, "zephyr": ZEPHYR_CHAT}
TOKENIZERS = [build_sp_tokenizer(style) for style in STYLES]


@pytest.fixture(scope="module", params=STYLES)
def sp(request):
    return build_sp_tokenizer(request.param)


def sp_with(style: str, chat: str):
    return build_sp_tokenizer(style, CHATS[chat])


def ids(tok, text: str, special: bool = False) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


def generator(tok, template) -> Generator:
    return Generator(SimpleNamespace(config=SimpleNamespace()), tok, template)  # no model: ids only


def last_answer_start(labels: list[int]) -> int:
    """Where the last trained run of labels begins: the prompt ids inference feeds end there."""
    end = max(i for i, label in enumerate(labels) if label != IGNORE)
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return start


@pytest.mark.parametrize(("name", "row"), [("qa", QA), ("alpaca", ALPACA)])
def test_a_template_example_trains_on_the_running_text(sp, name, row):
    template = templates.resolve(name, name)
    [enc] = encode_records([Record("t.jsonl", 1, row)], template, sp, 512)
    prompt, answer = templates.render(Record("t.jsonl", 1, row), template)
    # BOS, the text as it runs (no "▁" between prompt and answer), EOS.
    assert enc.input_ids[0] == sp.bos_token_id and enc.input_ids[-1] == sp.eos_token_id
    assert sp.decode(enc.input_ids[1:-1]) == prompt.text + answer.text
    start = last_answer_start(enc.labels)
    # The answer is the running text's continuation ("Par" "is" after "Answer:\n", not "▁Paris"):
    # what the model must generate after the prompt inference feeds.
    assert not sp.convert_ids_to_tokens(enc.input_ids[start]).startswith("▁")
    assert enc.input_ids[:start] == ids(sp, prompt.text, special=True)
    assert enc.input_ids[:start] == generator(sp, template).prompt_ids([row], 8)[0]
    if name == "qa":  # no merge across "Answer:\n" | "Paris" here: exactly the running text's ids
        assert enc.input_ids == ids(sp, prompt.text + answer.text, special=True) + [sp.eos_token_id]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("chat", ["llama2", "zephyr"])
def test_a_multi_turn_chat_trains_on_the_running_texts_ids_and_inference_feeds_its_prompt(style, chat):
    from tunelab.serve.models import chat_ids

    tok = sp_with(style, chat)
    template = templates.resolve("chat", "messages")
    [enc] = encode_records([Record("t.jsonl", 1, {"messages": CHAT})], template, tok, 512)
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert enc.input_ids == ids(tok, text)  # the template writes its own BOS
    start = last_answer_start(enc.labels)
    gen = generator(tok, template)
    assert gen.prompt_ids([{"messages": CHAT}], 8)[0] == enc.input_ids[:start]
    assert chat_ids(gen, CHAT[:-1]) == enc.input_ids[:start]  # the server and `tunelab chat`


@pytest.mark.parametrize("name", ["qa", "alpaca"])
def test_the_server_feeds_a_template_runs_training_prompt(sp, name):
    from tunelab.serve.models import completion_ids

    template = templates.resolve(name, name)
    row = {"qa": QA, "alpaca": {**ALPACA, "input": ""}}[name]
    [enc] = encode_records([Record("t.jsonl", 1, row)], template, sp, 512)
    question = row["question" if name == "qa" else "instruction"]
    assert completion_ids(generator(sp, template), question) == enc.input_ids[: last_answer_start(enc.labels)]


def test_few_shot_evaluation_feeds_the_prompt_its_loss_scores(sp):
    from tunelab.evaluate.predict import Example, segments

    def example(q: str, a: str) -> Example:
        row = {"question": q, "answer": a}
        return Example(q, a, Record("t.jsonl", 1, row), "qa", row)

    template = templates.resolve("qa", "qa")
    segs = segments(
        example("Capital of Peru?", "Lima"), template, sp, [example("Capital of Chile?", "Santiago")]
    )
    enc = encode(segs, sp, 512)
    prompt = generator(sp, template).prompt_ids([RenderedPrompt([s.text for s in segs[:-1]])], 8, raw=True)[0]
    assert prompt == enc.input_ids[: last_answer_start(enc.labels)]
    assert sp.decode(enc.input_ids[1:]) == "".join(s.text for s in segs) + "</s>"


def test_dummy_prefix_is_seen_by_behaviour(sp, tokenizer):
    from tunelab.data.tokenize import adds_dummy_prefix

    assert adds_dummy_prefix(sp)
    assert not adds_dummy_prefix(tokenizer)  # byte-level BPE: segments keep their own ids


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            ["\n", "\n\n", " ", "Paris", " Lima.", "### Answer:\n", "</s>", "<s>[INST]", "é東", "\x1e"]
        ),
        min_size=1,
        max_size=5,
    )
)
def test_segments_decode_to_their_running_text(texts):
    """Whatever the segments start with (text an anchor merges with, a special token, a space), their
    ids decode to the joined text: no spurious "▁" between them."""
    from tunelab.data.tokenize import sequence_ids

    for tok in TOKENIZERS:
        assert tok.decode(sequence_ids(texts, tok)) == tok.decode(ids(tok, "".join(texts)))


def test_batched_encoding_equals_encode_past_the_fast_batch(sp):
    """More texts than one batch, so `tokenize_texts` takes the Rust batch encoder."""
    rows = [
        [Segment(f"### Question:\nq{i}?\n\n### Answer:\n", False), Segment(f"a{i}", True)] for i in range(700)
    ]
    rows.append(
        [Segment("x", False), Segment("\n\nParis", True), Segment("</s>", False), Segment("\n", True)]
    )
    assert encode_many(rows, sp, 64) == [encode(r, sp, 64) for r in rows]


def test_data_check_counts_the_ids_training_builds(sp):
    from tunelab.data.check import Settings, _encode_split

    template = templates.resolve("qa", "qa")
    records = [
        Record("t.jsonl", i, {"question": f"Capital number {i}?", "answer": "Paris " * i})
        for i in range(1, 9)
    ]
    stats, encoded = _encode_split(records, template, sp, Settings(max_length=24))
    assert encoded == encode_records(records, template, sp, 24)
    whole = encode_records(records, template, sp, 10_000)
    assert stats.total_tokens.max == max(len(e.input_ids) for e in whole)
    assert stats.tokens == sum(len(e.input_ids) for e in encoded)
    assert stats.truncated == sum(len(e.input_ids) > 24 for e in whole)


EXPORT_TEMPLATES = {
    "qa": (templates.resolve("qa", "qa"), QA),
    "alpaca": (templates.resolve("alpaca", "alpaca"), {**ALPACA, "input": ""}),
    "raw": (
        templates.resolve("raw", "prompt_completion"),
        {"prompt": "Capital of Peru?", "completion": " Lima"},
    ),
    "raw-space": (templates.resolve("raw", "prompt_completion"), {"prompt": " Peru:", "completion": " Lima"}),
}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", EXPORT_TEMPLATES)
def test_the_exported_chat_template_gives_the_ids_training_fed(style, name):
    """`tunelab export` writes the run's prompt format as the chat template, BOS included. A Metaspace
    prepend_scheme="first" tokenizer gives text after a special token no dummy prefix, so HF's
    `apply_chat_template(tokenize=True)` fed `<s> ###` where training fed `<s> ▁###`."""
    from tunelab.export import chat_template

    template, row = EXPORT_TEMPLATES[name]
    tok = build_sp_tokenizer(style)
    tok.chat_template = chat_template(template, tok)
    [enc] = encode_records([Record("t.jsonl", 1, row)], template, tok, 512)
    start = last_answer_start(enc.labels)
    user = row.get("question", row.get("instruction", row.get("prompt")))
    answer = row.get("answer", row.get("output", row.get("completion")))
    messages = [{"role": "user", "content": user}]

    def hf_ids(msgs, **kw):
        return list(tok.apply_chat_template(msgs, tokenize=True, return_dict=False, **kw))

    assert hf_ids(messages, add_generation_prompt=True) == enc.input_ids[:start]
    assert generator(tok, template).prompt_ids([row], 8)[0] == enc.input_ids[:start]
    # A full turn is the training example's text, EOS included, and its ids where running text makes
    # no merge across the prompt's end (training does not make it: alpaca's "\nThe"); a later
    # question is prompted as a first one.
    turn = hf_ids([*messages, {"role": "assistant", "content": answer}])
    assert tok.decode(turn) == tok.decode(enc.input_ids)
    if name != "alpaca":
        assert turn == enc.input_ids
    history = [*messages, {"role": "assistant", "content": answer}, *messages]
    assert hf_ids(history, add_generation_prompt=True) == enc.input_ids[:start]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize(
    ("name", "row"),
    [
        ("raw", {"prompt": "Capital of Peru:", "completion": " Lima"}),
        ("chat", {"messages": CHAT}),
        ("qa", QA),
    ],
)
def test_data_check_shows_the_text_of_the_ids_trained(style, name, row):
    """`tunelab data check` shows examples in runs trained or not. Each run decoded on its own lost
    its leading space (a SentencePiece decoder strips the dummy prefix at the start of text): a raw
    completion " Lima" showed as "Capital of Peru:[[Lima</s>]]", a chat's " Hello" after "[/INST]"
    as "[/INST][[Hello </s>]]". Now the runs join to the trained ids decoded whole."""
    from tunelab.data.check import _example

    tok = build_sp_tokenizer(style)
    template = templates.resolve(name, {"raw": "prompt_completion", "chat": "messages", "qa": "qa"}[name])
    record = Record("t.jsonl", 1, row)
    [enc] = encode_records([record], template, tok, 512)
    shown = _example(record, enc, tok).segments
    assert "".join(text for text, _ in shown) == tok.decode(enc.input_ids)
    trained = [text for text, train in shown if train]
    assert trained[-1] == {"raw": " Lima</s>", "chat": " Lima </s>", "qa": "Paris</s>"}[name]


QA_ROWS = [
    {"question": f"What is the capital of {c}?", "answer": f"The capital of {c} is {a}."}
    for c, a in COUNTRIES[:6]
]
CHAT_ROWS = [
    {
        "messages": [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": f"What is the capital of {c}?"},
            {"role": "assistant", "content": a},
        ]
    }
    for c, a in COUNTRIES[:6]
]


@pytest.mark.parametrize(("style", "chat"), [("legacy", "llama2"), ("first", "zephyr")])
def test_train_generate_and_export_feed_a_sentencepiece_model_the_prompt_ids_training_built(
    tmp_path, monkeypatch, style, chat
):
    """End to end on a tiny random Llama for a dummy-prefix tokenizer: a qa run and a multi-turn chat
    run train and save final/ with the tokenizer; for every row, the prompt ids `Generator.prompt_ids`
    feeds (loaded from the run) are the ids training built for the row's prompt part, and so are those
    of the exported model's tokenizer + chat template."""
    from transformers import AutoTokenizer

    import tunelab
    from conftest import build_model, write_jsonl
    from tunelab import runner
    from tunelab.export import merge

    tok = sp_with(style, chat)
    base = build_model("llama", tok, tmp_path / "base")
    built = []

    def spy(model, tokenizer, train_ex, *args, **kwargs):
        built.append(train_ex)
        return train(model, tokenizer, train_ex, *args, **kwargs)

    train = runner.train
    monkeypatch.setattr(runner, "train", spy)
    for name, rows in (("qa", QA_ROWS), ("chat", CHAT_ROWS)):
        data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        settings = dict(max_steps=2, batch_size=3, lr=1e-2, seed=0, eval_ratio=0.0)
        run = tunelab.api.train(
            model=str(base), data=str(data), out=str(tmp_path / name), quiet=True, **settings
        )
        final = run.path / "final"
        assert (final / "tokenizer.json").is_file() and run.config.data.template == name
        trained = sorted(enc.input_ids[: last_answer_start(enc.labels)] for enc in built.pop())
        assert len(trained) == len(rows)

        gen = run.generator
        assert sorted(gen.prompt_ids(rows, 8)) == trained
        assert all(isinstance(text, str) for text in gen.generate(rows[:2], max_new_tokens=4))

        out = merge(str(run.path), tmp_path / f"{name}-export")
        exported = AutoTokenizer.from_pretrained(out)
        conversations = (
            [[{"role": "user", "content": row["question"]}] for row in rows]
            if name == "qa"
            else [row["messages"][:-1] for row in rows]
        )
        fed = [
            list(
                exported.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
            )
            for c in conversations
        ]
        assert sorted(fed) == trained
