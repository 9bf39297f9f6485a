"""Progress of a long step outside the training loop (reading, tokenising, batch generation), on
stderr: a rich bar on a terminal; piped or logged, a line every `EVERY_S` seconds with the count and
an ETA. Either way a step that took `SAY_S` or more ends with one line of its count and time, so a log
shows where the time went. stdout is never written to (commands that print JSON keep it clean).

Library calls show nothing unless a command turned it on: `with progress.shown(True): ...`.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from tunelab.training.logger import fmt_duration

EVERY_S = 10.0  # without a terminal: a line this often while the step runs
CHUNK = 4096  # items per call in `chunked`
SAY_S = 2.0  # a step this long or longer ends with a line saying what it did and in how long

_shown: contextvars.ContextVar[bool] = contextvars.ContextVar("tunelab_progress", default=False)


@contextlib.contextmanager
def shown(enabled: bool = True) -> Iterator[None]:
    """Show the progress of the steps run inside (a command's work, unless --quiet)."""
    token = _shown.set(enabled)
    try:
        yield
    finally:
        _shown.reset(token)


def _is_terminal() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def track(label: str, total: int, unit: str = "examples") -> Iterator[Callable[[int], None]]:
    """Yields `advance(n)`: `n` more of the `total` done. `label` says what is being done
    ('data: tokenising train')."""
    if not _shown.get() or total <= 0:
        yield lambda n: None
        return
    started = time.perf_counter()
    done = 0
    said = [started]  # when the last line went out (no terminal)
    bar: Any = None
    if _is_terminal():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn(f"[bold]{label}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        task = bar.add_task(label, total=total)
        bar.start()

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if bar is not None:
            bar.advance(task, n)
            return
        now = time.perf_counter()
        if now - said[0] >= EVERY_S and done < total:
            said[0] = now
            eta = (now - started) / done * (total - done) if done else float("inf")
            print(
                f"{label}: {done:,}/{total:,} {unit} ({100 * done / total:.0f}%), "
                f"{fmt_duration(now - started)} elapsed, eta {fmt_duration(eta)}",
                file=sys.stderr,
                flush=True,
            )

    try:
        yield advance
    finally:
        if bar is not None:
            bar.stop()
    took = time.perf_counter() - started
    if took >= SAY_S or said[0] != started:
        print(f"{label}: {done:,} {unit} in {took:.1f} s", file=sys.stderr, flush=True)


@contextlib.contextmanager
def timed(label: str) -> Iterator[Callable[[str], None]]:
    """A step with no count known ahead (reading a file): a spinner on a terminal, and, when it took
    `SAY_S` or more, one line at the end with what the step reports through `say(summary)`."""
    if not _shown.get():
        yield lambda summary: None
        return
    started = time.perf_counter()
    summary = [""]
    status: Any = None
    if _is_terminal():
        from rich.console import Console

        status = Console(stderr=True).status(label)
        status.start()
    try:
        yield lambda text: summary.__setitem__(0, text)
    finally:
        if status is not None:
            status.stop()
    took = time.perf_counter() - started
    if took >= SAY_S:
        said = f"{label}: {summary[0]}" if summary[0] else label
        print(f"{said} in {took:.1f} s", file=sys.stderr, flush=True)


def chunked(
    label: str,
    items: list[Any],
    work: Callable[[list[Any]], list[Any]],
    unit: str = "examples",
    size: int | None = None,
) -> list[Any]:
    """`work(items)` done `size` items at a time under `track`: for work whose result for an item
    does not depend on the other items in its call (tokenising), so the result is the same."""
    size = size or CHUNK
    if not _shown.get() or len(items) <= size:
        return work(items)
    out: list[Any] = []
    with track(label, len(items), unit) as advance:
        for start in range(0, len(items), size):
            part = items[start : start + size]
            out.extend(work(part))
            advance(len(part))
    return out
