"""Templates, tokenisation and masks, checked token by token."""

import json

import pytest

from conftest import write_jsonl
from tunelab.data import templates
from tunelab.data.dataset import encode_records, load_records, pack_documents
from tunelab.data.formats import Row, read_rows
from tunelab.data.schema import Record, detect_schema, to_record
from tunelab.data.tokenize import IGNORE, encode, n_trainable
from tunelab.errors import ConfigError, DataError


def rec(**values):
    return Record("mem", 1, values)


def test_qa_template_renders_course_format():
    t = templates.resolve("auto", "qa")
    segs = templates.render(rec(question="What is the capital of Peru?", answer="Lima."), t)
    assert segs == [
        templates.Segment("### Question:\nWhat is the capital of Peru?\n\n### Answer:\n", False),
        templates.Segment("Lima.", True),
    ]


def test_alpaca_with_and_without_input():
    t = templates.resolve("auto", "alpaca")
    with_input = templates.render(rec(instruction="Translate", input="hola", output="hello"), t)
    assert "### Input:\nhola\n\n### Response:\n" in with_input[0].text
    without = templates.render(rec(instruction="Say hi", output="hi"), t)
    assert "### Input" not in without[0].text and without[0].text.endswith("### Response:\n")
    assert without[1] == templates.Segment("hi", True)


def test_custom_template_and_missing_field():
    t = templates.resolve("custom", "qa", "Q: {question}\nA: ", "{answer}")
    assert templates.render(rec(question="x", answer="y"), t)[0].text == "Q: x\nA: "
    bad = templates.resolve("custom", "qa", "Q: {query}\nA: ", "{answer}")
    with pytest.raises(ConfigError, match=r"names \{query\}, a field these rows do not have"):
        templates.render(rec(question="x", answer="y"), bad)


def test_template_schema_mismatch():
    with pytest.raises(ConfigError):
        templates.resolve("qa", "messages")


def test_mask_token_by_token(tokenizer):
    t = templates.resolve("qa", "qa")
    segs = templates.render(rec(question="capital of Peru?", answer="Lima."), t)
    enc = encode(segs, tokenizer, max_length=512)
    prompt_ids = tokenizer(segs[0].text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(segs[1].text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert enc.input_ids == prompt_ids + answer_ids + [eos]
    assert enc.labels == [IGNORE] * len(prompt_ids) + answer_ids + [eos]
    on_prompt = encode(segs, tokenizer, max_length=512, train_on_prompt=True)
    assert on_prompt.labels == on_prompt.input_ids


def test_eos_trained_even_when_pad_is_eos(tokenizer):
    assert tokenizer.pad_token_id in (None, tokenizer.eos_token_id)  # the tricky case
    enc = encode([templates.Segment("q", False), templates.Segment("a", True)], tokenizer, 64)
    assert enc.labels[-1] == tokenizer.eos_token_id == enc.input_ids[-1]


def test_truncation_sides(tokenizer):
    segs = [templates.Segment("word " * 20, False), templates.Segment("answer here", True)]
    full = encode(segs, tokenizer, 10_000)
    right = encode(segs, tokenizer, 8, "right")
    left = encode(segs, tokenizer, 8, "left")
    assert right.input_ids == full.input_ids[:8] and right.truncated
    assert right.completion_tokens_lost == sum(lab != IGNORE for lab in full.labels)
    assert left.input_ids == full.input_ids[-8:]
    # The whole answer and EOS are kept, but the answer's first token now starts the example, where
    # nothing precedes it: it is no longer a target, one trained token lost.
    assert left.completion_tokens_lost == n_trainable(full) - n_trainable(left) == 1


def test_chat_template_trains_every_assistant_turn(tokenizer):
    t = templates.resolve("auto", "messages")
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "capital of Peru?"},
        {"role": "assistant", "content": "Lima"},
    ]
    segs = templates.render(rec(messages=messages), t, tokenizer)
    trained = [s.text for s in segs if s.train]
    # Each turn up to its end token; the newline the template writes after it is markup, untrained.
    assert trained == ["hello<|im_end|>", "Lima<|im_end|>"]
    assert "".join(s.text for s in segs) == tokenizer.apply_chat_template(messages, tokenize=False)
    [encoded] = encode_records([rec(messages=messages)], t, tokenizer, 256)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert encoded.input_ids[-len(newline) :] == newline and set(encoded.labels[-len(newline) :]) == {IGNORE}
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert encoded.labels[-len(newline) - 1] == end  # the end token itself is trained


def test_schema_detection_and_mapping():
    rows = [Row("f", 1, {"q": "a?", "a": "b"})]
    with pytest.raises(DataError, match="cannot tell the schema"):
        detect_schema(rows, {})
    assert detect_schema(rows, {"question": "q", "answer": "a"}) == "qa"
    assert to_record(rows[0], "qa", {"question": "q", "answer": "a"}).values == {
        "question": "a?",
        "answer": "b",
    }
    for keys, name in [
        ({"instruction", "output"}, "alpaca"),
        ({"prompt", "completion"}, "prompt_completion"),
        ({"input", "output"}, "input_output"),
        ({"messages"}, "messages"),
        ({"text"}, "text"),
    ]:
        assert detect_schema([Row("f", 1, dict.fromkeys(keys, "x"))], {}) == name


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({"question": "q"}, "answer", "missing field"),
        ({"question": "q", "answer": "  "}, "answer", "empty completion"),
        ({"question": ["q"], "answer": "a"}, "question", "expected text"),
    ],
)
def test_bad_rows_name_file_line_field(tmp_path, row, field, reason):
    f = write_jsonl(tmp_path / "d.jsonl", [{"question": "ok", "answer": "ok"}] * 36 + [row])
    with pytest.raises(DataError) as e:
        load_records(str(f))
    assert (e.value.line, e.value.field) == (37, field) and reason in e.value.reason
    assert str(f) in str(e.value)


def test_bad_json_line_37(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"question": "q", "answer": "a"}\n' * 36 + '{"question": "q", "answer": \n')
    with pytest.raises(DataError) as e:
        read_rows(f)
    assert e.value.line == 37 and "not valid JSON" in e.value.reason


def test_seeded_split(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(50)]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    a = load_records(str(f), eval_ratio=0.1, split_seed=1)
    b = load_records(str(f), eval_ratio=0.1, split_seed=1)
    c = load_records(str(f), eval_ratio=0.1, split_seed=2)
    assert len(a.train) == 45 and len(a.eval) == 5
    assert [r.line for r in a.eval] == [r.line for r in b.eval] != [r.line for r in c.eval]
    assert {r.line for r in a.train}.isdisjoint({r.line for r in a.eval})
    separate = load_records(str(f), eval_path=str(f))
    assert len(separate.train) == 50 == len(separate.eval)


def test_encode_records_and_pretrain_chunks(tokenizer):
    t = templates.resolve("qa", "qa")
    out = encode_records([rec(question="a", answer="b")], t, tokenizer, 64)
    assert out[0].input_ids[-1] == tokenizer.eos_token_id
    chunks = pack_documents(["one two three", "four five"], tokenizer, 4)
    stream = chunks[0].input_ids + [i for c in chunks[1:] for i in c.input_ids[1:]]  # overlap by one
    expected = tokenizer("one two three")["input_ids"] + [tokenizer.eos_token_id]
    expected += tokenizer("four five")["input_ids"] + [tokenizer.eos_token_id]
    assert stream == expected[: len(stream)] and all(c.labels == c.input_ids for c in chunks)
    assert all(len(c.input_ids) <= 4 for c in chunks)


def test_pretraining_frames_each_document_as_the_tokenizer_does():
    """A tokenizer that puts BOS before text (Llama's) gets it before every document, as generation
    and finetuning put it before every prompt; then the text, then EOS."""

    class WithBos:
        eos_token_id, bos = 2, 1

        def __call__(self, text, add_special_tokens=True, verbose=True):  # as an HF tokenizer's
            ids = [100 + ord(c) for c in text]
            return {"input_ids": [self.bos] * add_special_tokens + ids}

    tok = WithBos()
    chunks = pack_documents(["ab", "c"], tok, 3)
    # Stream [1, 197, 198, 2, 1, 199, 2]; each chunk starts on the last token of the one before.
    assert [c.input_ids for c in chunks] == [[1, 197, 198], [198, 2, 1], [1, 199, 2]]
    assert [c.labels for c in chunks] == [c.input_ids for c in chunks]


def test_every_token_of_the_stream_is_a_target_exactly_once(tokenizer):
    """Chunks were cut end to end: the first token of every chunk after the first was never a target
    (nothing before it in its chunk) and the last token of each chunk predicted nothing, so one token
    in chunk_length went untrained, the same ones every epoch (a final 1-token chunk, e.g. the last
    EOS, was dropped too). Chunks now overlap by one token: every token but the stream's first is a
    target exactly once, and no chunk is longer than chunk_length."""
    from tunelab.data.packing import collate

    docs = ["one two three four", "five six", "seven", "the quick brown fox jumps over the lazy dog"]
    stream = []
    for d in docs:
        stream += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    for length in (2, 3, 4, 5, 7, len(stream) - 1, len(stream), len(stream) + 3):
        chunks = pack_documents(docs, tokenizer, length)
        assert all(2 <= len(c.input_ids) <= length for c in chunks)
        assert all(c.labels == c.input_ids for c in chunks)
        targets = [t for c in chunks for t in collate([c]).targets[0].tolist() if t != -100]
        assert targets == stream[1:], length  # each one once, in order; none lost at a border
        assert [i for c in chunks for i in c.input_ids[1:]] == stream[1:]


def test_messages_without_a_chat_template_point_at_a_model_that_has_one(tmp_path):
    """Messages rows can only take the chat template: the hint must not send users to qa / alpaca,
    which refuse messages."""
    from conftest import build_tokenizer

    tokenizer = build_tokenizer(tmp_path / "tok", chat_template=False)
    record = Record(
        "d.jsonl",
        1,
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    )
    with pytest.raises(ConfigError) as e:
        templates.render(record, templates.resolve("chat", "messages"), tokenizer)
    assert "chat template" in e.value.hint and "qa" not in e.value.hint
    with pytest.raises(ConfigError, match="cannot render OpenAI messages"):
        templates.resolve("qa", "messages")


@pytest.mark.parametrize(
    ("schema", "row"),
    [
        ("alpaca", {"instruction": "Translate to French", "input": "word 99", "output": "mot 99"}),
        ("alpaca", {"instruction": "Name a colour", "input": "", "output": "red"}),
        ("qa", {"question": "What is 2+2?", "answer": "4", "id": 7}),
    ],
)
def test_a_batch_files_row_is_prompted_as_training_rendered_it(tokenizer, tmp_path, schema, row):
    """`tunelab generate --file` rows: every field the template names reaches the prompt (an Alpaca
    row's `input` too, with the preamble training used), not the first prompt-like field alone."""
    from tunelab.generate import Generator, read_prompts

    template = templates.resolve("auto", schema)
    record = Record("d.jsonl", 1, {k: v for k, v in row.items() if isinstance(v, str)})
    trained_prompt = "".join(s.text for s in templates.render(record, template, tokenizer) if not s.train)
    answer = row.get("output", row.get("answer"))
    batch = write_jsonl(tmp_path / "b.jsonl", [{k: v for k, v in row.items() if v != answer}])
    [prompt] = read_prompts(batch)
    assert Generator(None, tokenizer, template).render(prompt) == trained_prompt


@pytest.mark.parametrize("name", ["qa", "raw", "chat"])
def test_an_alpaca_rows_input_reaches_the_prompt_under_a_template_without_input(tokenizer, tmp_path, name):
    """An Alpaca run trained with `qa`, `raw` or `chat` joins `input` to the instruction (training's
    rendering); a batch file's row with an input was prompted with the instruction alone (the chat run
    dropped the input; the qa/raw runs filled {prompt} with the bare instruction)."""
    from tunelab.generate import Generator, read_prompts

    row = {"instruction": "Translate to French", "input": "word 99", "output": "mot 99"}
    template = templates.resolve(name, "alpaca")
    segments = templates.render(Record("d.jsonl", 1, row), template, tokenizer)
    trained_prompt = segments[0].text  # what precedes the trained answer
    assert not segments[0].train and segments[1].train and "word 99" in trained_prompt
    batch = write_jsonl(tmp_path / "b.jsonl", [{"instruction": row["instruction"], "input": row["input"]}])
    [prompt] = read_prompts(batch)
    assert Generator(None, tokenizer, template).render(prompt) == trained_prompt


def test_a_batch_files_chat_row_is_prompted_up_to_its_reference_answer(tokenizer, tmp_path):
    from tunelab.generate import Generator, prompt_of, read_prompts

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": "Lima."},
    ]
    template = templates.resolve("auto", "messages")
    segments = templates.render(Record("d.jsonl", 1, {"messages": messages}), template, tokenizer)
    [prompt] = read_prompts(write_jsonl(tmp_path / "b.jsonl", [{"messages": messages}]))
    assert Generator(None, tokenizer, template).render(prompt) == segments[0].text
    assert prompt_of(prompt) == "Capital of Peru?"


def test_when_every_row_is_set_aside_the_error_says_why(tmp_path):
    """No run (and no rejects file) follows, so the reasons are in the message itself."""
    from tunelab.data.dataset import load_records

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "answer": null}\n[1]\n')
    with pytest.raises(DataError) as e:
        load_records(str(bad), on_bad_row="skip")
    message = e.value.message
    assert "no usable rows: all 2 were set aside" in message
    assert "line 1: field 'answer'" in message and "line 2: expected an object" in message
    only_format = tmp_path / "worse.jsonl"
    only_format.write_text("[1]\nnot json\n")
    with pytest.raises(DataError, match="all 2 were set aside: line 1"):
        load_records(str(only_format), on_bad_row="skip")


def test_templates_that_cannot_render_the_rows_say_so_or_render_them_whole(tokenizer):
    """'none' (raw text) on Q/A rows was a KeyError; 'chat' on Q/A rows too, though a recipe
    promises it takes them; an Alpaca input under the qa or raw template was dropped."""
    from tunelab.data.schema import Record
    from tunelab.data.templates import render, resolve
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match="'none' feeds raw text .* qa pairs") as e:
        resolve("none", "qa")
    assert "auto (here: qa)" in e.value.hint
    qa = Record("t", 1, {"question": "Capital of Peru?", "answer": "Lima."})
    chat = render(qa, resolve("chat", "qa"), tokenizer)
    as_messages = Record("t", 1, {"messages": [{"role": "user", "content": "Capital of Peru?"},
                                               {"role": "assistant", "content": "Lima."}]})  # fmt: skip
    assert chat == render(as_messages, resolve("chat", "messages"), tokenizer)
    assert [s.train for s in chat if s.text.strip()][-1] and "Lima." in "".join(
        s.text for s in chat if s.train
    )
    row = Record("t", 1, {"instruction": "Name the capital.", "input": "Spain", "output": "Madrid"})
    for name in ("qa", "raw"):
        prompt = render(row, resolve(name, "alpaca"), tokenizer)[0].text
        assert "Name the capital.\n\nSpain" in prompt, (name, prompt)
    alpaca = render(row, resolve("alpaca", "alpaca"), tokenizer)[0].text
    assert "### Input:\nSpain" in alpaca and "Name the capital.\n\nSpain" not in alpaca


@pytest.mark.parametrize(("bad_json_line", "empty_line"), [(4, 3), (2, 3)])
def test_the_first_bad_row_in_the_file_is_the_one_named(tmp_path, bad_json_line, empty_line):
    """Under on_bad_row: error, an unreadable row was reported before an earlier row with an empty
    answer (rows were read, all of them, before any was validated)."""
    rows = {i: json.dumps({"question": f"Q{i}?", "answer": f"A{i}."}) for i in range(1, 6)}
    rows[bad_json_line] = '{"question": "broken'
    rows[empty_line] = '{"question": "Empty?", "answer": ""}'
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(rows[i] for i in range(1, 6)) + "\n")
    with pytest.raises(DataError) as e:
        load_records(str(path), eval_ratio=0.0)
    assert e.value.line == min(bad_json_line, empty_line)
    skipped = load_records(str(path), eval_ratio=0.0, on_bad_row="skip")
    assert sorted(r.line for r in skipped.rejects) == sorted([bad_json_line, empty_line])
    # eval reads a test file the same way (it named the unreadable row first too); past its --limit
    # no row stops it.
    from tunelab.evaluate.predict import read_examples

    with pytest.raises(DataError) as e:
        read_examples(str(path))
    assert e.value.line == min(bad_json_line, empty_line)
    assert [x.record.line for x in read_examples(str(path), limit=1)] == [1]
    assert len(read_examples(str(path), on_bad_row="skip")) == 3


def test_data_fields_that_map_nothing_are_refused(tmp_path):
    """data.fields naming a column no row has was silent for an optional role (an Alpaca `input`
    mapped to a misspelled column: every example lost its input), and a role the schema lacks
    (`{input: c}` on Q/A rows, `{context: c}`, `{quest: question}`) was dropped without a word, or
    made detection fail with a message about the columns, not the mapping."""
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"inst": "Add 1", "ctx": "to 2", "out": "3"}] * 4)
    fields = {"instruction": "inst", "output": "out"}
    assert load_records(str(alpaca), fields={**fields, "input": "ctx"}).train[0].values["input"] == "to 2"
    with pytest.raises(DataError, match="data.fields.input names column 'context', which no row has") as e:
        load_records(str(alpaca), fields={**fields, "input": "context"})
    assert "ctx" in e.value.hint
    qa = write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "answer": "a", "c": "x"}] * 4)
    with pytest.raises(DataError, match="data.fields maps 'input', which the qa schema has no role for"):
        load_records(str(qa), fields={"input": "c"})
    with pytest.raises(DataError, match="data.fields maps 'context', which no schema has a role for"):
        load_records(str(qa), fields={"context": "c"})
    with pytest.raises(DataError, match="data.fields maps 'quest'") as e:
        load_records(str(qa), fields={"quest": "question"})
    assert "did you mean 'question'" in e.value.hint


def test_a_chat_run_stops_on_the_end_of_turn_token_its_template_writes(tokenizer):
    """Training labels a chat answer up to the token its template writes after it; generation stopped
    only on EOS and a fixed list of known end-of-turn tokens, so a template ending turns with another
    special token (`<|turn_end|>`, Command-R's, a custom one) generated on past the trained stop."""
    import copy

    from tunelab.generate import Generator

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|turn_end|>"]})
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|turn_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    template = templates.resolve("chat", "qa")
    enc = encode_records([Record("d", 1, {"question": "Hi?", "answer": "Yo."})], template, tok, 512)[0]
    trained = [t for t in enc.labels if t != IGNORE]
    end = tok.convert_tokens_to_ids("<|turn_end|>")
    assert trained[-1] == end  # what training taught the model to stop with
    assert end in Generator(None, tok, template).stop_ids()
    assert templates.turn_end(tok) == "<|turn_end|>"
    assert templates.turn_end(tokenizer) == "<|im_end|>"


def test_a_long_pretraining_document_gives_no_indexing_warning(tokenizer, caplog):
    """transformers warned 'Token indices sequence length is longer than the specified maximum
    sequence length ... will result in indexing errors' for a document longer than the tokenizer's
    model_max_length: false, since pretraining cuts it into chunks."""
    import transformers

    transformers.logging.enable_propagation()
    limit, tokenizer.model_max_length = tokenizer.model_max_length, 50  # (a session fixture: put back)
    try:
        long_doc = " ".join(["word"] * 100)
        with caplog.at_level("WARNING"):
            chunks = pack_documents([long_doc], tokenizer, 64)
    finally:
        tokenizer.model_max_length = limit
        transformers.logging.disable_propagation()
    assert len(chunks) > 1 and all(len(c.input_ids) <= 64 for c in chunks)
    assert not [r for r in caplog.records if "indexing errors" in r.getMessage()]


def test_an_empty_document_is_called_so_not_a_completion(tmp_path):
    """A text row (a pretraining document) with empty text was refused as an 'empty completion'."""
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "a document"}] * 5 + [{"text": " \n"}])
    with pytest.raises(DataError) as e:
        load_records(str(f))
    assert (e.value.line, e.value.field) == (6, "text")
    assert "empty text: no document to train on" in e.value.reason and "completion" not in e.value.reason
