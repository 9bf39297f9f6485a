"""LLM-as-judge through any OpenAI-compatible endpoint (POST {url}/v1/chat/completions).

Two modes: a 1-5 score against a rubric, or pairwise A-vs-B asked in both orders so a judge that
prefers whichever answer comes first cancels out. Requests run a few at a time, retry with backoff on
5xx/429/timeouts, and land in an on-disk cache keyed by (model, messages): a rerun pays nothing.
Nothing is sent anywhere unless the user gives --judge.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunelab.errors import TunelabError

RUBRIC = """Score the candidate answer from 1 to 5 against the reference answer:
5 = correct and complete, in the reference's format; 4 = correct, with a small flaw in form or extra text;
3 = partly correct; 2 = mostly wrong but on topic; 1 = wrong, empty, off topic or rambling."""

# "Score: 4", "score=4", "**Score**: 4", "Score: **4**"; not "Score: 4.5" or "Score: 1-5 ..." (a
# decimal or a range read as its first digit was a wrong grade: such a reply holds no score).
_SCORE = re.compile(r"score\**\s*[:=]?\s*\**\s*([1-5])(?![\d.,]\d|\s*[-\u2013]\s*\d)\b", re.IGNORECASE)
_VERDICT = re.compile(r"\[\[\s*(A|B|tie)\s*\]\]", re.IGNORECASE)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tunelab" / "judge"


@dataclass
class JudgeConfig:
    url: str
    model: str
    mode: Literal["rubric", "pairwise"] = "rubric"
    api_key: str | None = None
    concurrency: int = 4
    retries: int = 4  # attempts after the first
    backoff_s: float = 1.0  # doubled after every failed attempt
    timeout_s: float = 60.0
    cache_dir: Path = field(default_factory=default_cache_dir)
    rubric: str = RUBRIC


def endpoint(url: str) -> str:
    """Accepts http://host:port, .../v1 or the full .../v1/chat/completions."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def _served_models(response: Any) -> set[str] | None:
    """The model ids an OpenAI-style `/models` answer lists; None when it is not such an answer."""
    if response.status_code != 200:
        return None
    try:
        data = response.json().get("data")
        return {str(m["id"]) for m in data} if isinstance(data, list) else None
    except (ValueError, AttributeError, KeyError, TypeError):
        return None


class JudgeClient:
    def __init__(self, cfg: JudgeConfig) -> None:
        import httpx

        self.cfg = cfg
        self.url = endpoint(cfg.url)
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self.http = httpx.Client(timeout=cfg.timeout_s, headers=headers)
        self.requests_made = 0  # HTTP attempts, retries included
        self.cache_hits = 0
        self._lock = threading.Lock()

    def check_reachable(self) -> None:
        """Fail now, before the models generate: nothing answers at the endpoint's address, it refuses
        the API key (401/403 on its model list), or its model list does not hold --judge-model. An
        endpoint without a model list (404) is asked anyway: its replies are checked as they come.
        And the cache folder must be one that can be written."""
        import httpx

        models_url = self.url.removesuffix("/chat/completions") + "/models"
        try:
            r = self.http.get(models_url, timeout=min(self.cfg.timeout_s, 10.0))
        except httpx.HTTPError as e:
            raise TunelabError(
                f"the judge endpoint {self.url} cannot be reached: {type(e).__name__}: {e}",
                "start it, or check --judge (nothing was generated yet)",
            ) from None
        if r.status_code in (401, 403):
            raise TunelabError(
                f"the judge endpoint refused the API key (HTTP {r.status_code} on {models_url})",
                "set the key in the variable --judge-api-key-env names (nothing was generated yet)",
            )
        served = _served_models(r)
        if served is not None and self.cfg.model not in served:
            raise TunelabError(
                f"the judge endpoint does not serve '{self.cfg.model}'",
                f"it serves: {', '.join(sorted(served)[:10]) or 'nothing'}; fix --judge-model (nothing was generated yet)",
            )
        try:
            self.cfg.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TunelabError(
                f"the judge cache {self.cfg.cache_dir} cannot be a folder: {e.strerror}",
                "give --judge-cache a folder that can be written (nothing was generated yet)",
            ) from None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> JudgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _cache_path(self, messages: list[dict[str, str]]) -> Path:
        # The endpoint is part of the key: another server's replies are not this one's.
        key = json.dumps(
            {"url": self.url, "model": self.cfg.model, "messages": messages},
            sort_keys=True,
            ensure_ascii=False,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.cfg.cache_dir / digest[:2] / f"{digest}.json"

    def complete(self, messages: list[dict[str, str]], usable: Callable[[str], bool] | None = None) -> str:
        """The judge's reply; from the cache when this (endpoint, model, messages) was asked before.
        A reply `usable` refuses (no score in it) is returned but not cached: a rerun asks again."""
        path = self._cache_path(messages)
        if path.exists():
            with self._lock:
                self.cache_hits += 1
            return json.loads(path.read_text(encoding="utf-8"))["reply"]
        reply = self._post(messages)
        if usable is not None and not usable(reply):
            return reply
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{threading.get_ident()}")
        tmp.write_text(json.dumps({"model": self.cfg.model, "reply": reply}), encoding="utf-8")
        os.replace(tmp, path)  # atomic: a crash never leaves half an entry
        return reply

    def _post(self, messages: list[dict[str, str]]) -> str:
        import httpx

        body = {"model": self.cfg.model, "messages": messages, "temperature": 0.0}
        problem = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            with self._lock:
                self.requests_made += 1
            try:
                r = self.http.post(self.url, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                problem = f"{type(e).__name__}: {e}"
                continue
            if r.status_code == 429 or r.status_code >= 500:
                problem = f"HTTP {r.status_code}: {r.text[:200]}"
                continue
            if r.status_code >= 400:
                raise TunelabError(
                    f"the judge endpoint {self.url} refused the request: HTTP {r.status_code}: {r.text[:300]}",
                    "check --judge-model and the API key (--judge-api-key-env)",
                )
            try:
                return str(r.json()["choices"][0]["message"]["content"])
            except (ValueError, KeyError, IndexError, TypeError):
                raise TunelabError(
                    f"the judge endpoint {self.url} did not answer like an OpenAI chat completion: {r.text[:200]}",
                    "point --judge at an OpenAI-compatible server (POST /v1/chat/completions)",
                ) from None
        raise TunelabError(
            f"the judge endpoint {self.url} failed {self.cfg.retries + 1} times; last: {problem}",
            "check the server is up, or raise --judge-retries",
        )

    def complete_many(
        self, conversations: list[list[dict[str, str]]], usable: Callable[[str], bool] | None = None
    ) -> list[str]:
        """In order, at most `concurrency` in flight; a conversation repeated in the batch is asked once."""
        keys = [self._cache_path(c) for c in conversations]
        unique = {k: c for k, c in zip(keys, conversations)}
        if not unique:
            return []
        with ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency)) as pool:
            replies = dict(zip(unique, pool.map(lambda c: self.complete(c, usable), unique.values())))
        return [replies[k] for k in keys]


def rubric_messages(question: str, reference: str, answer: str, rubric: str = RUBRIC) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You grade answers to questions. Be strict and consistent."},
        {
            "role": "user",
            "content": f"{rubric}\n\n[Question]\n{question}\n\n[Reference answer]\n{reference}\n\n"
            f"[Candidate answer]\n{answer}\n\nGive one sentence of reasons, then a last line 'Score: N'.",
        },
    ]


def pairwise_messages(question: str, reference: str, first: str, second: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You compare two answers to a question. Judge content, not order."},
        {
            "role": "user",
            "content": f"[Question]\n{question}\n\n[Reference answer]\n{reference}\n\n"
            f"[Answer A]\n{first}\n\n[Answer B]\n{second}\n\n"
            "Which answer is better? Give one sentence of reasons, then [[A]], [[B]] or [[tie]].",
        },
    ]


def parse_score(reply: str) -> int | None:
    found = _SCORE.findall(reply)
    if found:
        return int(found[-1])
    stripped = reply.strip()
    return int(stripped) if stripped in {"1", "2", "3", "4", "5"} else None


def parse_verdict(reply: str) -> str | None:
    found = _VERDICT.findall(reply)
    return found[-1].upper() if found else None  # "A", "B" or "TIE"


def grade(
    client: JudgeClient, questions: list[str], references: list[str], answers: list[str]
) -> list[int | None]:
    """1-5 per answer; None where the judge's reply held no score."""
    convs = [rubric_messages(q, r, a, client.cfg.rubric) for q, r, a in zip(questions, references, answers)]
    return [parse_score(r) for r in client.complete_many(convs, lambda r: parse_score(r) is not None)]


def prefer(
    client: JudgeClient, questions: list[str], references: list[str], a: list[str], b: list[str]
) -> list[float | None]:
    """Per example, how much the judge prefers B over A: 1 = B, 0.5 = tie, 0 = A, averaged over both
    orders (so a judge that always picks the first answer scores every pair 0.5). A pair with a
    verdict in one order only is None (no verdict): one order alone brings the position bias back."""
    n = len(questions)
    convs = [pairwise_messages(questions[i], references[i], a[i], b[i]) for i in range(n)]
    convs += [pairwise_messages(questions[i], references[i], b[i], a[i]) for i in range(n)]
    verdicts = [parse_verdict(r) for r in client.complete_many(convs, lambda r: parse_verdict(r) is not None)]
    as_b = {"A": 0.0, "B": 1.0, "TIE": 0.5}
    swapped = {"A": 1.0, "B": 0.0, "TIE": 0.5}  # in the second order, "A" is model B's answer
    out: list[float | None] = []
    for i in range(n):
        first, second = verdicts[i], verdicts[n + i]
        out.append((as_b[first] + swapped[second]) / 2 if first and second else None)
    return out


def judge_info(client: JudgeClient) -> dict[str, Any]:
    return {
        "url": client.url,
        "model": client.cfg.model,
        "mode": client.cfg.mode,
        "requests": client.requests_made,
        "cache_hits": client.cache_hits,
    }
