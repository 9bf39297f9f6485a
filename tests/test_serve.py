"""`tunelab serve` end to end: the official `openai` client against the real server on a loopback port,
compared with `Generator.generate` (what `tunelab generate` prints)."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import COUNTRIES, write_jsonl  # noqa: E402

KEY = "test-key"
QUESTION = "What is the capital of France?"


class LiveServer:
    """uvicorn on 127.0.0.1, a free port, in a background thread."""

    def __init__(self, served: dict, **settings) -> None:
        import uvicorn

        from tunelab.serve.app import ServeSettings, create_app
        from tunelab.serve.engine import Engine

        self.engine = Engine(served, max_batch_size=16, max_wait_ms=20)
        app = create_app(self.engine, ServeSettings(**settings))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def client(self, key: str | None = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=60)

    def post(self, path: str, body: object = None, key: str | None = KEY, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if body is not None:
            kw["content"] = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        return httpx.post(self.url + path, headers=headers, timeout=60, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llama_dir) -> dict[str, Path]:
    """A LoRA run on the qa template (high lr so it visibly differs from its base) and a full run
    on the chat template."""
    from tunelab.api import train

    root = tmp_path_factory.mktemp("serve-runs")
    qa = write_jsonl(
        root / "qa.jsonl",
        [
            {"question": f"What is the capital of {c}?", "answer": f"The capital of {c} is {cap}."}
            for c, cap in COUNTRIES
        ]
        * 3,
    )
    chats = write_jsonl(
        root / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": f"Capital of {c}?"},
                    {"role": "assistant", "content": cap},
                ]
            }
            for c, cap in COUNTRIES
        ]
        * 3,
    )
    common = dict(model=str(llama_dir), quiet=True, check="off")
    lora = train(data=str(qa), out=str(root / "qa-lora"), max_steps=5, lr=1e-2, method="lora", **common)
    chat = train(data=str(chats), out=str(root / "chat-run"), max_steps=3, **common)
    return {"qa-lora": lora.path, "chat-run": chat.path, "base": llama_dir}


@pytest.fixture(scope="module")
def live(runs):
    from tunelab.serve.models import load_served

    served = load_served(
        [str(runs["base"]), str(runs["chat-run"])],
        adapters=[str(runs["qa-lora"])],
        names={str(runs["base"]): "base"},
    )
    server = LiveServer(served, api_key=KEY, max_tokens_limit=300, max_body_bytes=64 * 1024)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def generators(runs):
    from tunelab.generate import Generator

    return {name: Generator.load(str(path)) for name, path in runs.items()}


def test_models_health_and_names(live):
    assert sorted(m.id for m in live.client().models.list()) == ["base", "chat-run", "qa-lora"]
    assert live.client().models.retrieve("qa-lora").id == "qa-lora"
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}  # no key needed to probe


@pytest.mark.parametrize("name", ["qa-lora", "base", "chat-run"])
def test_greedy_completion_equals_generate(live, generators, name):
    """Each served model (adapter on, adapters off, a full run) answers as `tunelab generate` does."""
    from tunelab.serve.models import completion_ids

    gen = generators[name]
    r = live.client().completions.create(model=name, prompt=QUESTION, max_tokens=12)
    assert r.choices[0].text == gen.generate([QUESTION], max_new_tokens=12)[0]
    assert r.usage.prompt_tokens == len(completion_ids(gen, QUESTION))
    assert r.usage.completion_tokens <= 12
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 12 else "stop")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_adapter_and_base_differ(live):
    """The shared base really switches adapters: the LoRA run and its base answer differently."""
    c = live.client()
    texts = {
        m: c.completions.create(model=m, prompt=QUESTION, max_tokens=8).choices[0].text
        for m in ("qa-lora", "base")
    }
    assert texts["qa-lora"] != texts["base"]


def test_chat_with_qa_run_renders_last_user_message(live, generators):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of Peru?"},
        {"role": "assistant", "content": "Lima."},
        {"role": "user", "content": QUESTION},
    ]
    r = live.client().chat.completions.create(model="qa-lora", messages=messages, max_tokens=10)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == generators["qa-lora"].generate([QUESTION], max_new_tokens=10)[0]


def test_chat_with_chat_run_uses_whole_history(live, generators):
    gen = generators["chat-run"]
    messages = [
        {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": "Lima"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Capital of "}, {"type": "text", "text": "Chile?"}],
        },
    ]
    r = live.client().chat.completions.create(model="chat-run", messages=messages, max_tokens=10)
    flat = messages[:2] + [{"role": "user", "content": "Capital of Chile?"}]
    prompt = gen.tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
    assert r.choices[0].message.content == gen.generate([prompt], max_new_tokens=10, raw=True)[0]
    assert r.usage.prompt_tokens == len(gen.tokenizer(prompt, add_special_tokens=False)["input_ids"])


def test_streaming_equals_non_streaming(live):
    c = live.client()
    whole = c.completions.create(model="qa-lora", prompt=QUESTION, max_tokens=15).choices[0]
    chunks = list(c.completions.create(model="qa-lora", prompt=QUESTION, max_tokens=15, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == whole.text
    assert len(chunks) > 2  # token by token, not one blob
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason

    chat = [{"role": "user", "content": QUESTION}]
    whole = c.chat.completions.create(model="qa-lora", messages=chat, max_tokens=15)
    chunks = list(
        c.chat.completions.create(
            model="qa-lora", messages=chat, max_tokens=15, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stream_wire_format_ends_with_done(live):
    body = {"model": "qa-lora", "prompt": QUESTION, "max_tokens": 4, "stream": True}
    r = live.post("/v1/completions", body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0].removeprefix("data: "))
    assert first["object"] == "text_completion" and first["model"] == "qa-lora"


def test_stop_sequences(live):
    c = live.client()
    full = c.completions.create(model="qa-lora", prompt=QUESTION, max_tokens=12).choices[0].text
    assert len(full.strip()) >= 4, full
    stop = full.strip()[2:4]
    expected = full[: full.find(stop)]
    r = c.completions.create(model="qa-lora", prompt=QUESTION, max_tokens=12, stop=[stop, "never-appears"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    streamed = c.completions.create(model="qa-lora", prompt=QUESTION, max_tokens=12, stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == expected


def test_n_seed_and_prompt_lists(live):
    c = live.client()
    kw = dict(model="base", prompt=QUESTION, max_tokens=8, temperature=1.0, top_p=0.9, n=3, seed=7)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]  # same seed, same answers
    assert len({ch.text for ch in a.choices}) > 1  # sampled: the choices differ
    two = c.completions.create(
        model="qa-lora", prompt=[QUESTION, "What is the capital of Peru?"], max_tokens=6
    )
    single = c.completions.create(model="qa-lora", prompt="What is the capital of Peru?", max_tokens=6)
    assert [ch.index for ch in two.choices] == [0, 1]
    assert two.choices[1].text == single.choices[0].text


def test_concurrent_requests_are_batched(live):
    before = (live.engine.batches, live.engine.batched_rows)
    single = live.client().completions.create(model="base", prompt=QUESTION, max_tokens=10).choices[0].text
    with ThreadPoolExecutor(8) as pool:
        texts = list(
            pool.map(
                lambda _: (
                    live.client()
                    .completions.create(model="base", prompt=QUESTION, max_tokens=10)
                    .choices[0]
                    .text
                ),
                range(8),
            )
        )
    assert texts == [single] * 8
    batches = live.engine.batches - before[0] - 1
    rows = live.engine.batched_rows - before[1] - 1
    assert rows == 8 and batches < 8  # at least two requests shared a generate call


def test_auth(live):
    with pytest.raises(openai.AuthenticationError):
        live.client(key="wrong").models.list()
    r = live.post("/v1/completions", {"model": "qa-lora", "prompt": "hi"}, key=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = live.post("/v1/completions", b"{not json", key=None)
    assert r.status_code == 401  # the key is checked before the body is read


BAD = [
    ("malformed json", "/v1/completions", b'{"model": "qa-lora", "prompt": ', 400, None),
    ("not an object", "/v1/completions", [1, 2], 400, None),
    ("wrong type", "/v1/completions", {"model": "qa-lora", "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("prompt type", "/v1/completions", {"model": "qa-lora", "prompt": 5}, 400, "prompt"),
    ("bad role", "/v1/chat/completions", {"model": "qa-lora", "messages": [{"role": "bot", "content": "x"}]}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"model": "qa-lora", "messages": []}, 400, "messages"),
    ("no user message", "/v1/chat/completions", {"model": "qa-lora", "messages": [{"role": "system", "content": "x"}]}, 400, "messages"),
    ("unknown model", "/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model"),
    ("path as model", "/v1/completions", {"model": "../../../etc/passwd", "prompt": "hi"}, 404, "model"),
    ("prompt too long", "/v1/completions", {"model": "qa-lora", "prompt": "Paris " * 600}, 400, "prompt"),
    ("context exceeded", "/v1/completions", {"model": "qa-lora", "prompt": "Paris " * 100, "max_tokens": 300}, 400, "max_tokens"),
    ("max_tokens over limit", "/v1/completions", {"model": "qa-lora", "prompt": "hi", "max_tokens": 301}, 400, "max_tokens"),
    ("temperature range", "/v1/completions", {"model": "qa-lora", "prompt": "hi", "temperature": 3}, 400, "temperature"),
    ("n zero", "/v1/completions", {"model": "qa-lora", "prompt": "hi", "n": 0}, 400, "n"),
    ("empty stop", "/v1/completions", {"model": "qa-lora", "prompt": "hi", "stop": [""]}, 400, "stop"),
    ("unsupported", "/v1/completions", {"model": "qa-lora", "prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    ("empty raw prompt", "/v1/completions", {"model": "base", "prompt": "", "raw": True}, 400, "prompt"),
    ("too large", "/v1/completions", {"model": "qa-lora", "prompt": "x" * 70_000}, 413, None),
    ("lone surrogate", "/v1/completions", b'{"model": "qa-lora", "prompt": "\\ud800"}', 400, "prompt"),
    ("seed too big", "/v1/completions", {"model": "qa-lora", "prompt": "hi", "seed": 10**25, "temperature": 1}, 400, "seed"),
    ("temperature nan", "/v1/completions", b'{"model": "qa-lora", "prompt": "hi", "temperature": NaN}', 400, "temperature"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "path", "body", "status", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_in_openai_shape(live, case, path, body, status, param):
    r = live.post(path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_errors_through_the_client_and_server_keeps_serving(live):
    c = live.client()
    with pytest.raises(openai.NotFoundError, match="not served here"):
        c.chat.completions.create(model="runs/other", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        c.completions.create(model="qa-lora", prompt="Paris " * 600)
    assert live.post("/v1/completions", b"]]").status_code == 400
    assert c.completions.create(model="qa-lora", prompt=QUESTION, max_tokens=3).choices[0].text is not None


def test_client_disconnect_mid_stream_does_not_break_server(live):
    body = json.dumps({"model": "base", "prompt": QUESTION, "max_tokens": 250, "stream": True}).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    with httpx.stream("POST", live.url + "/v1/completions", content=body, headers=headers, timeout=30) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    # closed after one event: the server cancels the rows and answers the next request normally
    r = live.client().completions.create(model="qa-lora", prompt=QUESTION, max_tokens=5)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_cors_is_off_unless_asked(live, runs):
    from fastapi.testclient import TestClient

    from tunelab.serve.app import ServeSettings, create_app
    from tunelab.serve.engine import Engine

    origin = {"Origin": "http://evil.example"}
    assert "access-control-allow-origin" not in httpx.get(live.url + "/health", headers=origin).headers
    app = create_app(Engine(live.engine.models), ServeSettings(cors_origins=["http://ok.example"]))
    with TestClient(app) as tc:
        preflight = {"Origin": "http://ok.example", "Access-Control-Request-Method": "POST"}
        r = tc.options("/v1/completions", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "http://ok.example"


def test_graceful_shutdown_finishes_in_flight_stream(runs):
    from tunelab.serve.models import load_served

    server = LiveServer(load_served([str(runs["base"])]))
    client = server.client()
    assert [m.id for m in client.models.list()] == ["llama"]  # named by the folder's basename
    expected = client.completions.create(model="llama", prompt=QUESTION, max_tokens=200).choices[0].text
    stream = client.completions.create(model="llama", prompt=QUESTION, max_tokens=200, stream=True)
    parts = [next(stream).choices[0].text]
    stopper = threading.Thread(target=server.stop)
    stopper.start()  # as Ctrl-C: stop accepting, finish what is in flight
    parts += [ch.choices[0].text for ch in stream]
    stopper.join(timeout=60)
    assert "".join(parts) == expected
    assert not server.thread.is_alive()


def test_chat_cli_loop(runs, generators):
    from tunelab.chat import chat_loop

    out: list[str] = []
    inputs = iter([QUESTION, "/reset", "", "/exit"])
    assert chat_loop(generators["qa-lora"], "qa-lora", 8, read=lambda _: next(inputs), write=out.append) == 0
    text = "".join(out)
    assert "one question on its own" in text
    assert generators["qa-lora"].generate([QUESTION], max_new_tokens=8)[0] in text
    assert "(history cleared)" in text

    gen = generators["chat-run"]
    out.clear()
    inputs = iter(["Capital of Peru?", "Capital of Chile?", "/exit"])
    chat_loop(gen, "chat-run", 6, read=lambda _: next(inputs), write=out.append)
    answers = "".join(out).split("bot> ")[1:]  # each streamed answer, then a newline
    first = gen.generate(["Capital of Peru?"], max_new_tokens=6)[0]
    history = [
        {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Capital of Chile?"},
    ]
    prompt = gen.tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert answers == [first + "\n", gen.generate([prompt], max_new_tokens=6, raw=True)[0] + "\n"]


def test_chat_checks_its_decoding_settings_as_generate_does(generators):
    """chat took --max-new-tokens 0 to a transformers traceback, answered every message of a
    max_new_tokens past the context with 'that message alone is longer than the model's context',
    took a negative temperature and dropped --system on a qa run without a word."""
    from tunelab.chat import chat_loop
    from tunelab.errors import TunelabError
    from tunelab.serve.models import Served

    gen = generators["qa-lora"]
    never = lambda _: pytest.fail("no message should be read")  # noqa: E731
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0)):
        with pytest.raises(TunelabError, match="max_new_tokens|temperature"):
            chat_loop(gen, "qa-lora", **{"max_new_tokens": 8, **bad}, read=never, write=lambda t: None)
    context = Served("qa-lora", gen).context_length
    with pytest.raises(TunelabError, match="leaves no room for a message"):
        chat_loop(gen, "qa-lora", context, read=never, write=lambda t: None)
    out: list[str] = []
    inputs = iter(["/exit"])
    chat_loop(gen, "qa-lora", 8, system="be brief", read=lambda _: next(inputs), write=out.append)
    assert "--system is not used" in "".join(out)


def test_cli_errors():
    from tunelab.cli import main

    assert main(["serve"]) == 2  # nothing to serve
    assert main(["serve", "--name", "noequals"]) == 2


def test_serve_refuses_a_bad_or_busy_port_before_loading(capsys):
    """--port 99999 was an OverflowError traceback; a port in use only uvicorn's bare errno, after
    every model had loaded."""
    from tunelab.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "world", "--port", "99999"])
    assert "expected a port number 0-65535" in capsys.readouterr().err
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["serve", "world", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "pick another port with --port" in err


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab é日本 ,.\n!Zq")), min_size=1, max_size=40))
def test_incremental_decoding_equals_full_decode(tokenizer, text):
    """The server decodes each step's new tokens only; what it accumulates (and streams) must be the
    full decode, multi-byte characters split across byte-level tokens included."""
    from tunelab.serve.engine import Row

    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces: list[str] = []
    row = Row([], max_tokens=len(ids) + 1, on_event=lambda piece, reason: pieces.append(piece))
    for token in ids:
        row.step(token, set(), tokenizer)
    assert row._decoded == tokenizer.decode(ids, skip_special_tokens=True)
    row.finish("stop", tokenizer)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == row.text


def test_stop_string_across_tokens_is_found_and_cut(tokenizer):
    from tunelab.serve.engine import Row

    ids = tokenizer.encode("The capital of Peru is Lima. Question 2: what", add_special_tokens=False)
    row = Row([], max_tokens=100, stop=("Question 2",))
    for token in ids:
        row.step(token, set(), tokenizer)
        if row.finish_reason:
            break
    assert row.finish_reason == "stop" and row.text == "The capital of Peru is Lima. "
    assert len(row.tokens) < len(ids)  # it stopped as soon as the stop string was complete
