"""Batched generation behind the server: requests wait in a queue and one worker runs them together.

A request becomes one `Row` per choice. The worker collects rows from many requests (up to
`max_batch_size`, waiting at most `max_wait_ms` for company), runs one left-padded `model.generate`
for them in a thread and hands every row's text back. A stopping criterion watches each row after
every step, so rows stop on their own stop tokens, stop strings, `max_tokens` or a client that went
away, and a streaming row hears about each new piece of text as soon as it is decided.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from tunelab.generate import decoding, left_padded
from tunelab.serve.models import Served

# ---------------------------------------------------------------- one batch


@dataclass
class Row:
    """One choice being generated. `on_event(text, finish_reason)` gets each new piece of text, then
    ("", reason) once when the row is done; it is called from the generation thread."""

    prompt_ids: list[int]
    max_tokens: int
    stop: tuple[str, ...] = ()
    on_event: Callable[[str, str | None], None] | None = None
    is_cancelled: Callable[[], bool] = lambda: False
    tokens: list[int] = field(default_factory=list)
    generated: int = 0  # tokens the model produced, including the stop token that ended the row
    text: str = ""  # the answer; while streaming, what has been sent so far
    finish_reason: str | None = None  # stop | length | cancelled
    # Incremental detokenisation (as TGI/vLLM do it): each step decodes only the tokens since
    # `_prefix`, and `_decoded` grows by what they add, so a long answer costs O(n), not O(n^2).
    _decoded: str = ""
    _prefix: int = 0
    _read: int = 0

    def step(self, token: int, stop_ids: set[int], tok: Any) -> None:
        if self.is_cancelled():
            self.finish_reason = "cancelled"
            return
        self.generated += 1
        if token in stop_ids:
            return self.finish("stop", tok)
        self.tokens.append(token)
        if self.stop or self.on_event:
            seen = len(self._decoded)
            self._decoded += self._decode_new(tok)
            # A stop string that ends in the new text starts at most len(stop) - 1 characters before it.
            start = max(0, seen - max((len(s) for s in self.stop), default=1) + 1)
            if self._stop_at(self._decoded[start:]) is not None:
                return self.finish("stop", tok)
            if len(self.tokens) < self.max_tokens and self.on_event:
                self._emit(self._safe(self._decoded))
        if len(self.tokens) >= self.max_tokens:
            self.finish("length", tok)

    def _decode_new(self, tok: Any) -> str:
        """The text the tokens since the last call add. Decoding from a few tokens back (`_prefix`)
        keeps the spacing the tokenizer gives in context; an unfinished character waits."""
        before = tok.decode(self.tokens[self._prefix : self._read], skip_special_tokens=True)
        now = tok.decode(self.tokens[self._prefix :], skip_special_tokens=True)
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return now[len(before) :]

    def finish(self, reason: str, tok: Any) -> None:
        full = tok.decode(self.tokens, skip_special_tokens=True)
        cut = self._stop_at(full)
        self._emit(full if cut is None else full[:cut])
        self.finish_reason = reason
        if self.on_event:
            self.on_event("", reason)

    def _stop_at(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _safe(self, text: str) -> str:
        """What can be sent now: not a half-decoded character, not what may become a stop string."""
        text = text.rstrip("\ufffd")
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[: len(text) - hold]

    def _emit(self, text: str) -> None:
        if text.startswith(self.text) and len(text) > len(self.text):
            delta, self.text = text[len(self.text) :], text
            if self.on_event:
                self.on_event(delta, None)
        elif not text.startswith(self.text):  # the tokenizer re-decoded earlier text; keep the final one
            self.text = text


class _WatchRows(StoppingCriteria):
    """Called by `generate` after every step with the grown ids; True marks a row finished."""

    def __init__(self, rows: list[Row], stop_ids: set[int], tok: Any, after_step: Callable[[], None]) -> None:
        self.rows, self.stop_ids, self.tok, self.after_step = rows, stop_ids, tok, after_step

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        for row, token in zip(self.rows, input_ids[:, -1].tolist()):
            if row.finish_reason is None:
                row.step(token, self.stop_ids, self.tok)
        self.after_step()
        return torch.tensor([r.finish_reason is not None for r in self.rows], device=input_ids.device)


@torch.no_grad()
def generate_rows(
    served: Served,
    rows: list[Row],
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    after_step: Callable[[], None] = lambda: None,
) -> None:
    """Run `rows` as one left-padded batch (the same padding, stop tokens and decoding as
    `Generator.generate`); fills each row's text, finish_reason and token counts. `after_step` runs
    after every step's rows have been updated (the engine sends their stream events then)."""
    gen, tok = served.generator, served.generator.tokenizer
    stops = gen.stop_ids()
    device = next(gen.model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    input_ids, mask = left_padded([r.prompt_ids for r in rows], pad, device)
    if temperature > 0 and seed is not None:
        torch.manual_seed(seed)
    with served.activate():
        gen.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max(r.max_tokens for r in rows),
            **decoding(temperature, top_p, stops, pad),
            stopping_criteria=StoppingCriteriaList([_WatchRows(rows, set(stops), tok, after_step)]),
        )
    for r in rows:  # generate can end without a last check (e.g. a model's own max_length)
        if r.finish_reason is None:
            r.finish("length", tok)
    after_step()


# ---------------------------------------------------------------- the queue


class Overloaded(Exception):
    """More requests are waiting than the server accepts; the client should retry later."""


@dataclass
class Job:
    """One request: its rows, how to sample them, and the events its handler reads."""

    served: Served
    rows: list[Row]
    temperature: float
    top_p: float
    seed: int | None
    events: (
        asyncio.Queue
    )  # ("text", row, delta) | ("finish", row, reason) | ("done", -1, None) | ("error", -1, msg)
    cancelled: bool = False

    def key(self) -> tuple:
        """Jobs with equal keys share a batch. Greedy jobs all do; a seeded sampled job runs alone, so
        the same seed gives the same answer whatever else is in flight."""
        if self.temperature <= 0:
            return (self.served.name, "greedy")
        return (self.served.name, self.temperature, self.top_p, id(self) if self.seed is not None else None)

    async def wait(self) -> None:
        """Until every row is done; raises RuntimeError if generation failed."""
        while True:
            kind, _, payload = await self.events.get()
            if kind == "done":
                return
            if kind == "error":
                raise RuntimeError(payload)


class Engine:
    """Dynamic batching: `submit` queues a job, one worker task batches jobs and runs them in a thread.

    One generation thread serves every model: a CPU or a single GPU gains nothing from two models
    generating at once, and one thread keeps the global RNG (seeds) and PEFT adapter switching safe.
    """

    def __init__(
        self,
        models: dict[str, Served],
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
    ) -> None:
        self.models = models
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.batches = 0  # generate calls made, and rows they held: for tests and the load report
        self.batched_rows = 0
        self._queue: asyncio.Queue[Job | None] | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._last_rows = 0  # rows in the last batch: wait for company only after a shared batch
        self._outbox: list[tuple[Job, tuple]] = []  # stream events of the current step (generation thread)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tunelab-generate")
        self._closing = False
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Finish every queued job, then stop the worker."""
        if self._worker is None:
            return
        self._queue.put_nowait(None)
        await self._worker
        self._executor.shutdown(wait=True)
        self._worker = None

    def submit(
        self,
        served: Served,
        prompts: list[list[int]],
        n: int,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: tuple[str, ...] = (),
        stream: bool = False,
    ) -> Job:
        """Rows are ordered prompt by prompt, `n` choices each (choice index = prompt * n + k)."""
        if self._queue is None or self._closing:
            raise Overloaded("the server is shutting down")
        if self._queue.qsize() >= self.max_queue:
            raise Overloaded(f"{self._queue.qsize()} requests are already waiting")
        job = Job(served, [], temperature, top_p, seed, asyncio.Queue())
        for index, ids in enumerate(p for p in prompts for _ in range(n)):
            on_event = self._forward(job, index) if stream else None
            job.rows.append(Row(list(ids), max_tokens, stop, on_event, lambda: job.cancelled))
        self._queue.put_nowait(job)
        return job

    def _forward(self, job: Job, index: int) -> Callable[[str, str | None], None]:
        def on_event(text: str, reason: str | None) -> None:
            self._outbox.append((job, ("text", index, text) if reason is None else ("finish", index, reason)))

        return on_event

    def _flush(self) -> None:
        """Hand one step's events to the event loop in one wake-up, not one per row."""
        if self._outbox:
            events, self._outbox = self._outbox, []
            self._loop.call_soon_threadsafe(self._deliver, events)

    @staticmethod
    def _deliver(events: list[tuple[Job, tuple]]) -> None:
        for job, event in events:
            job.events.put_nowait(event)

    async def _next_batch(self, first: Job) -> tuple[list[Job], Job | None]:
        """`first` plus whatever arrives within max_wait, up to max_batch_size rows; returns the job
        that did not fit (it starts the next batch). The wait is only spent when the last batch had
        company: a lone client would pay it on every request for nothing (on the busy 2-core box its
        p50 was 56-101 ms with the wait, 47 ms without, the same as with batching off)."""
        batch, rows = [first], len(first.rows)
        deadline = self._loop.time() + (self.max_wait if self._last_rows > 1 else 0.0)
        while rows < self.max_batch_size:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - self._loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if job is None:
                self._closing = True
                break
            if rows + len(job.rows) > self.max_batch_size:
                self._last_rows = rows
                return batch, job
            batch.append(job)
            rows += len(job.rows)
        self._last_rows = rows
        return batch, None

    async def _run(self) -> None:
        carry: Job | None = None
        while True:
            if carry is None:
                if self._closing and self._queue.empty():
                    return
                job = await self._queue.get()
                if job is None:
                    self._closing = True
                    continue
            else:
                job, carry = carry, None
            batch, carry = await self._next_batch(job)
            groups: dict[tuple, list[Job]] = {}
            for j in batch:
                groups.setdefault(j.key(), []).append(j)
            for group in groups.values():
                await self._loop.run_in_executor(self._executor, self._generate, group)

    def _generate(self, jobs: list[Job]) -> None:
        """In the generation thread: one batched generate for jobs that share a key."""
        live = [j for j in jobs if not j.cancelled]
        error = None
        if live:
            try:
                first = live[0]
                rows = list(itertools.chain.from_iterable(j.rows for j in live))
                generate_rows(first.served, rows, first.temperature, first.top_p, first.seed, self._flush)
                self.batches += 1
                self.batched_rows += len(rows)
            except Exception as e:  # noqa: BLE001 - reported to each waiting client as a 500
                error = f"generation failed: {type(e).__name__}: {e}"
        # After the rows' own events, in the same order; a failed batch's partial events still go first.
        self._outbox += [(j, ("error", -1, error) if error else ("done", -1, None)) for j in jobs]
        self._flush()
