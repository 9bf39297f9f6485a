"""`tunelab chat RUN`: talk to a run in the terminal, with the prompts the server would build.

A chat-template run (and a plain model whose tokenizer has a chat template) sees the whole
conversation. A run trained on a single-turn template (qa, alpaca, ...) never saw history, so each
message is sent on its own as one question; the banner says which.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from tunelab.errors import TunelabError
from tunelab.generate import Generator, check_decoding
from tunelab.serve.engine import Row, generate_rows
from tunelab.serve.models import Served, chat_ids, uses_history

HELP = "/reset starts over, /exit quits"


def banner(gen: Generator, name: str) -> str:
    template = gen.template.name if gen.template else "none"
    if uses_history(gen):
        return f"chatting with {name} (template {template}): the model sees the whole conversation. {HELP}"
    return (
        f"chatting with {name} (template {template}): each message is one question on its own, "
        f"the model sees no history (it was trained on single turns). {HELP}"
    )


def chat_loop(
    gen: Generator,
    name: str = "model",
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    system: str | None = None,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] | None = None,
) -> int:
    write = write or _print
    check_decoding(max_new_tokens, temperature, top_p)
    served = Served(name, gen)
    context = served.context_length
    if context is not None and max_new_tokens >= context:
        raise TunelabError(
            f"--max-new-tokens {max_new_tokens:,} leaves no room for a message in this model's context "
            f"of {context:,} tokens",
            f"ask for fewer, e.g. --max-new-tokens {max(1, context // 4)}",
        )
    if system and not uses_history(gen):
        write(f"(--system is not used: {name}'s template has no system turn)\n")
    start = [{"role": "system", "content": system}] if system and uses_history(gen) else []
    history = list(start)
    write(banner(gen, name) + "\n")
    while True:
        try:
            text = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        if text == "/exit":
            return 0
        if text == "/reset":
            history = list(start)
            write("(history cleared)\n")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        ids = _fit(served, history, max_new_tokens)
        if ids is None:
            write(
                f"(that message and an answer of up to {max_new_tokens:,} tokens do not fit the model's "
                "context; try a shorter message or a smaller --max-new-tokens)\n"
            )
            history.pop()
            continue
        write("bot> ")
        row = Row(ids, max_new_tokens, on_event=lambda delta, reason: write(delta))
        generate_rows(served, [row], temperature, top_p)
        write("\n")
        if uses_history(gen):
            history.append({"role": "assistant", "content": row.text})
        else:
            history = list(start)


def _print(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _fit(served: Served, history: list[dict[str, str]], max_new_tokens: int) -> list[int] | None:
    """The prompt ids, dropping the oldest turns (never the system message) until the answer fits."""
    context = served.context_length
    first = 1 if history and history[0]["role"] == "system" else 0
    while True:
        ids = chat_ids(served.generator, history)
        if context is None or len(ids) + max_new_tokens <= context:
            return ids
        if len(history) - first <= 1:
            return None
        del history[first]
