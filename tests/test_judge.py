"""LLM-as-judge against a real OpenAI-compatible HTTP server on 127.0.0.1 (http.server in a thread):
retries after a 500, the on-disk cache (a rerun makes zero requests), bounded concurrency, pairwise
order swapping, and the judge inside `compare`."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tunelab.errors import TunelabError
from tunelab.evaluate import judge as J


class FakeJudge:
    """A judge that scores 5 when the candidate repeats the reference, else 1; pairwise it picks the
    answer equal to the reference, or always [[A]] when `biased` (a position-biased judge)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.fail_first = 0  # answer the next N requests with HTTP 500
        self.status = 200
        self.biased = False
        self.mute = False  # replies with no score or verdict in them
        self.delay_s = 0.0
        self.models: list[str] | None = None  # GET /models lists these; None: no such route (404)
        self.models_status = 200
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

    def reply(self, body: dict) -> str:
        if self.mute:
            return "I would rather not say."
        text = body["messages"][-1]["content"]
        ref = re.search(r"\[Reference answer\]\n(.*?)\n\n", text, re.S).group(1)
        if "[Candidate answer]" in text:
            cand = re.search(r"\[Candidate answer\]\n(.*?)\n\nGive", text, re.S).group(1)
            return f"The answer {'matches' if cand == ref else 'differs'}.\nScore: {5 if cand == ref else 1}"
        if self.biased:
            return "The first one reads better. [[A]]"
        first = re.search(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]", text, re.S).group(1)
        second = re.search(r"\[Answer B\]\n(.*?)\n\nWhich", text, re.S).group(1)
        return (
            "[[A]]"
            if first == ref and second != ref
            else "[[B]]"
            if second == ref and first != ref
            else "[[tie]]"
        )


@pytest.fixture
def server():
    fake = FakeJudge()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_GET(self):
            if not self.path.endswith("/models") or fake.models is None or fake.models_status != 200:
                self.send_response(fake.models_status if fake.models_status != 200 else 404)
                self.end_headers()
                return
            out = json.dumps({"object": "list", "data": [{"id": m, "object": "model"} for m in fake.models]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(out.encode())

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with fake.lock:
                fake.requests.append(
                    {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
                )
                fake.in_flight += 1
                fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                failing = fake.fail_first > 0
                fake.fail_first -= failing
            time.sleep(fake.delay_s)
            with fake.lock:
                fake.in_flight -= 1
            if failing or fake.status != 200:
                code = 500 if failing else fake.status
                self.send_response(code)
                self.end_headers()
                self.wfile.write(b'{"error": "try again"}')
                return
            content = fake.reply(body)
            out = json.dumps(
                {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
            )
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(out.encode())

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield fake
    httpd.shutdown()
    httpd.server_close()


def config(server, tmp_path, **kw) -> J.JudgeConfig:
    return J.JudgeConfig(url=server.url, model="judge-1", cache_dir=tmp_path / "cache", backoff_s=0.01, **kw)


QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of Peru?",
    "What is the capital of Japan?",
]
REFS = ["The capital of France is Paris.", "The capital of Peru is Lima.", "The capital of Japan is Tokyo."]


def test_endpoint_forms():
    assert J.endpoint("http://h:1") == "http://h:1/v1/chat/completions"
    assert J.endpoint("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert J.endpoint("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"


def test_parse_replies():
    assert J.parse_score("Close enough.\nScore: 4") == 4
    assert J.parse_score("**Score:** 2") == 2
    assert J.parse_score("**Score**: 5") == 5 and J.parse_score("Score: **3**") == 3
    # A decimal or a range was read as its first digit: a wrong grade, cached. Now no score.
    assert J.parse_score("Score: 4.5") is None and J.parse_score("Score: 1-5 scale: 4") is None
    assert J.parse_score("3") == 3
    assert J.parse_score("I would say six") is None
    assert J.parse_verdict("B is better [[B]]") == "B"
    assert J.parse_verdict("[[tie]]") == "TIE"
    assert J.parse_verdict("no idea") is None


def test_rubric_retries_after_500_then_caches(server, tmp_path):
    server.fail_first = 1
    answers = [REFS[0], "Lima, I think", REFS[2]]
    with J.JudgeClient(config(server, tmp_path, concurrency=1, api_key="sk-test")) as client:
        assert J.grade(client, QUESTIONS, REFS, answers) == [5, 1, 5]
        assert client.requests_made == 4  # three questions + one retry of the 500
    assert len(server.requests) == 4
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["body"]["model"] == "judge-1"
    assert first["auth"] == "Bearer sk-test" and first["body"]["temperature"] == 0.0

    with J.JudgeClient(config(server, tmp_path)) as again:  # a rerun: everything from the cache
        assert J.grade(again, QUESTIONS, REFS, answers) == [5, 1, 5]
        assert (again.requests_made, again.cache_hits) == (0, 3)
    assert len(server.requests) == 4
    with J.JudgeClient(config(server, tmp_path)) as other:  # the key includes the answer graded
        assert J.grade(other, QUESTIONS[:1], REFS[:1], ["Paris"]) == [1]
        assert other.requests_made == 1


def test_concurrency_is_bounded(server, tmp_path):
    server.delay_s = 0.05
    with J.JudgeClient(config(server, tmp_path, concurrency=2)) as client:
        J.grade(client, [f"q{i}" for i in range(8)], ["r"] * 8, [f"a{i}" for i in range(8)])
    assert len(server.requests) == 8
    assert server.max_in_flight == 2


def test_errors_give_up_or_fail_fast(server, tmp_path):
    server.fail_first = 100
    with J.JudgeClient(config(server, tmp_path, retries=2)) as client:
        with pytest.raises(TunelabError, match="failed 3 times; last: HTTP 500"):
            client.complete([{"role": "user", "content": "x"}])
    server.fail_first, server.status = 0, 401
    before = len(server.requests)
    with J.JudgeClient(config(server, tmp_path)) as client:
        with pytest.raises(TunelabError, match="refused the request: HTTP 401"):
            client.complete([{"role": "user", "content": "y"}])
    assert len(server.requests) == before + 1  # a 4xx is not retried


def test_pairwise_swaps_order_to_cancel_position_bias(server, tmp_path):
    a = [REFS[0], "wrong", REFS[2]]
    b = [REFS[0], REFS[1], "wrong"]
    with J.JudgeClient(config(server, tmp_path)) as client:
        assert J.prefer(client, QUESTIONS, REFS, a, b) == [0.5, 1.0, 0.0]
    # Every pair is asked in both orders; the first pair's answers are equal, so its two orders are
    # the same question, asked once.
    assert len(server.requests) == 5
    server.biased = True
    with J.JudgeClient(config(server, tmp_path / "fresh")) as client:
        assert J.prefer(client, QUESTIONS, REFS, a, b) == [0.5, 0.5, 0.5]


def test_judge_inside_compare(server, tmp_path, tiny_models, capsys):
    from tunelab.evaluate.compare import compare
    from tunelab.evaluate.predict import EvalSettings
    from tunelab.generate import Generation, Generator

    class Canned(Generator):
        def generate_detailed(self, prompts, *args, **kwargs):
            return [Generation(self.answers.get(p, "no idea."), "stop", 1, 2) for p in prompts]

    rows = [{"question": q, "answer": r} for q, r in zip(QUESTIONS, REFS)]
    g = Generator.load(str(tiny_models["llama"]), device="cpu")
    base, tuned = Canned(g.model, g.tokenizer, None), Canned(g.model, g.tokenizer, None)
    base.answers = {QUESTIONS[0]: REFS[0]}
    tuned.answers = dict(zip(QUESTIONS, REFS))
    settings = EvalSettings(device="cpu", with_loss=False)

    res = compare([base, tuned], rows, settings, judge=config(server, tmp_path), labels=["base", "tuned"])
    assert "judge" in res.metrics
    assert res.model("base").scores("judge") == [5.0, 1.0, 1.0]
    d = next(d for d in res.deltas if d.metric == "judge")
    assert d.delta == pytest.approx(8 / 3) and d.low <= d.delta <= d.high
    # Both models gave the same first answer: the identical prompt is asked once.
    assert (res.judge["requests"], res.judge["cache_hits"]) == (5, 1)

    pair = config(server, tmp_path, mode="pairwise")
    res = compare([base, tuned], rows, settings, judge=pair, labels=["base", "tuned"])
    (p,) = res.pairwise
    assert (p.model, p.baseline, p.wins, p.ties, p.losses) == ("tuned", "base", 2, 1, 0)
    assert p.delta == pytest.approx(2.5 / 3) and p.low <= p.delta <= p.high

    server.mute = True  # replies with no score: counted and said, not silently a blank column
    compare([base, tuned], rows, settings, judge=config(server, tmp_path / "mute"), labels=["base", "tuned"])
    assert "judge: 6 of 6 replies held no score" in capsys.readouterr().err

    # A judge that fails mid-run (500s past the retries): the generations and every other metric
    # are kept (they were lost with the whole run), the failure is on the result and in the report.
    server.mute, server.fail_first = False, 100
    failing = config(server, tmp_path / "down", retries=1)
    res = compare([base, tuned], rows, settings, judge=failing, labels=["base", "tuned"])
    assert "failed 2 times" in res.judge_error and "judge" not in res.metrics
    assert all("judge" not in p.scores for m in res.models for p in m.predictions)
    assert res.mean("tuned", "exact_match") == 1.0 and not res.pairwise
    assert json.loads(json.dumps(res.summary()))["judge_error"] == res.judge_error


def test_replies_without_a_score_are_not_cached_and_another_endpoint_has_its_own_cache(server, tmp_path):
    answers = [REFS[0], "Lima, I think", REFS[2]]
    server.mute = True
    with J.JudgeClient(config(server, tmp_path)) as client:
        assert J.grade(client, QUESTIONS, REFS, answers) == [None, None, None]
    server.mute = False
    with J.JudgeClient(config(server, tmp_path)) as again:  # asked again, not read back from the cache
        assert J.grade(again, QUESTIONS, REFS, answers) == [5, 1, 5]
        assert (again.requests_made, again.cache_hits) == (3, 0)
    elsewhere = J.JudgeConfig(
        url="http://127.0.0.1:9", model="judge-1", cache_dir=tmp_path / "cache", retries=0, backoff_s=0.01
    )
    with J.JudgeClient(elsewhere) as other, pytest.raises(TunelabError):  # not the other server's replies
        J.grade(other, QUESTIONS, REFS, answers)


def test_a_judge_that_cannot_be_reached_stops_compare_before_any_model_generates(tmp_path, tiny_models):
    from tunelab.evaluate.compare import compare
    from tunelab.evaluate.predict import EvalSettings
    from tunelab.generate import Generator

    class Counting(Generator):
        calls = 0

        def generate_detailed(self, prompts, *args, **kwargs):
            Counting.calls += 1
            return super().generate_detailed(prompts, *args, **kwargs)

    g = Generator.load(str(tiny_models["llama"]), device="cpu")
    down = J.JudgeConfig(url="http://127.0.0.1:9", model="j", cache_dir=tmp_path / "c", retries=0)
    rows = [{"question": q, "answer": r} for q, r in zip(QUESTIONS, REFS)]
    with pytest.raises(TunelabError, match="cannot be reached"):
        compare([Counting(g.model, g.tokenizer, None)], rows, EvalSettings(device="cpu"), judge=down)
    assert Counting.calls == 0


def test_a_pair_judged_in_one_order_only_has_no_verdict():
    """A verdict from one order alone brought the position bias back (a judge always answering [[A]]
    but silent when the finetuned answer came second scored 0.94, not 0.5), uncounted."""

    class Replies:
        def complete_many(self, conversations, usable):
            return ["[[A]]", "[[A]]", "no verdict here", "[[A]]"]  # pair 0: first order only

    out = J.prefer(Replies(), ["q0", "q1"], ["r0", "r1"], ["a0", "a1"], ["b0", "b1"])
    assert out == [None, 0.5]


def test_a_misconfigured_judge_stops_before_anything_generates(server, tmp_path):
    """A refused key, a model the endpoint does not serve, a cache path that is a file: each found
    only after every model had generated (the first POST)."""
    server.models = ["judge-1"]
    with J.JudgeClient(config(server, tmp_path)) as client:
        client.check_reachable()  # served, key accepted: fine
    server.models = ["other-model"]
    with (
        pytest.raises(TunelabError, match="does not serve 'judge-1'") as e,
        J.JudgeClient(config(server, tmp_path)) as c,
    ):
        c.check_reachable()
    assert "other-model" in e.value.hint
    server.models_status = 401
    with (
        pytest.raises(TunelabError, match="refused the API key"),
        J.JudgeClient(config(server, tmp_path)) as c,
    ):
        c.check_reachable()
    server.models_status, server.models = 200, None  # no model list (404): asked anyway
    afile = tmp_path / "afile"
    afile.write_text("x")
    cfg = J.JudgeConfig(url=server.url, model="judge-1", cache_dir=afile)
    with pytest.raises(TunelabError, match="cannot be a folder"), J.JudgeClient(cfg) as c:
        c.check_reachable()
    assert not server.requests  # nothing was asked


def test_the_openai_key_goes_to_openai_only(monkeypatch):
    from tunelab.evaluate.cli import _judge_key

    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    assert _judge_key("http://127.0.0.1:8000", None) is None
    assert _judge_key("https://api.openai.com/v1", None) == "sk-secret"
    monkeypatch.setenv("MY_KEY", "k2")
    assert _judge_key("http://127.0.0.1:8000", "MY_KEY") == "k2"
    with pytest.raises(TunelabError, match="MY_TYPO: no such environment variable"):
        _judge_key("http://127.0.0.1:8000", "MY_TYPO")


def test_eval_writes_its_report_when_the_judge_fails_and_exits_1(server, tmp_path, tiny_models, capsys):
    from tunelab.cli import main

    server.fail_first = 100
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": r}) + "\n" for q, r in zip(QUESTIONS, REFS)))
    out = tmp_path / "out"
    args = ["eval", str(tiny_models["llama"]), "--data", str(data), "--no-base", "--max-new-tokens", "1",
            "--judge", server.url, "--judge-model", "judge-1", "--judge-retries", "0",
            "--judge-cache", str(tmp_path / "cache"), "--quiet", "--out", str(out), "--bootstrap", "200"]  # fmt: skip
    assert main(args) == 1
    assert "the judge failed, so the report has no judge figures" in capsys.readouterr().err
    assert len((out / "eval" / "predictions.jsonl").read_text().splitlines()) == 3  # nothing lost
    assert "**The judge failed**" in (out / "report.md").read_text()
