"""Records -> text segments, each marked trained or not.

A template is plain data (name + two format strings) so the run directory stores it and inference
renders prompts exactly as training did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.data.schema import COMPLETION_ROLE, PROMPT_ROLE, Record
from tunelab.errors import ConfigError, DataError

QA_PROMPT = "### Question:\n{prompt}\n\n### Answer:\n"
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
BUILTIN = {
    "qa": (QA_PROMPT, "{completion}"),
    "alpaca": (ALPACA_PROMPT, "{completion}"),
    "raw": ("{prompt}", "{completion}"),
}
# What `template: auto` means for each schema.
AUTO = {
    "qa": "qa",
    "alpaca": "alpaca",
    "prompt_completion": "raw",
    "input_output": "raw",
    "messages": "chat",
    "text": "none",
}


@dataclass(frozen=True)
class Template:
    name: str  # qa | alpaca | raw | custom | chat | none
    prompt_format: str = ""
    completion_format: str = ""
    schema: str = "qa"


@dataclass(frozen=True)
class Segment:
    text: str
    train: bool


def resolve(
    name: str, schema: str, prompt_format: str | None = None, completion_format: str | None = None
) -> Template:
    """Turn the config's template choice into a concrete Template for this schema."""
    if name == "auto":
        name = AUTO[schema]
    if schema == "messages" and name != "chat":
        raise ConfigError(
            f"data.template: '{name}' cannot render OpenAI messages", "use template: chat (or auto)"
        )
    if schema == "text" and name not in ("none",):
        raise ConfigError(f"data.template: '{name}' needs prompt/completion pairs but the rows are raw text")
    if name == "none" and schema != "text":
        raise ConfigError(
            f"data.template: 'none' feeds raw text (pretraining), but these rows are {schema} pairs",
            f"use data.template: auto (here: {AUTO[schema]}), or chat for the tokenizer's chat template",
        )
    if name in ("chat", "none"):
        return Template(name, schema=schema)
    if name == "custom":
        if not prompt_format or not completion_format:
            raise ConfigError("data.template 'custom' needs data.prompt_format and data.completion_format")
        return Template("custom", prompt_format, completion_format, schema)
    if name not in BUILTIN:
        raise ConfigError(
            f"data.template: unknown template '{name}'",
            f"use one of auto, chat, custom, none, {', '.join(BUILTIN)}",
        )
    # An explicit format given with a builtin name overrides it (it is what config.yaml stores).
    p, c = BUILTIN[name]
    return Template(name, prompt_format or p, completion_format or c, schema)


def _fields(values: dict[str, Any], schema: str) -> dict[str, str]:
    """Every role a format string may name, plus the generic {prompt} and {completion}."""
    out = {k: v for k, v in values.items() if isinstance(v, str)}
    out.setdefault("input", "")
    if schema in PROMPT_ROLE:
        out.setdefault("prompt", values.get(PROMPT_ROLE[schema], ""))
        out.setdefault("completion", values.get(COMPLETION_ROLE[schema], ""))
        out.setdefault("question", out["prompt"])
        out.setdefault("answer", out["completion"])
    return out


def _format(fmt: str, fields: dict[str, str]) -> str:
    try:
        return fmt.format_map(fields)
    except KeyError as e:
        # Every row of a schema offers the same fields (Alpaca's optional input defaults to ""), so
        # a name missing here is missing for all of them: the template is wrong, not this row.
        raise ConfigError(
            f"the template names {{{e.args[0]}}}, a field these rows do not have",
            f"available fields: {', '.join(sorted(fields))} (fix data.prompt_format / "
            "data.completion_format, or map a column to a role with data.fields)",
        ) from None
    except (ValueError, IndexError) as e:
        raise ConfigError(
            f"template format string {fmt!r} is malformed: {e}", "escape literal braces as {{ }}"
        ) from None


def _with_input(values: dict[str, Any], schema: str, fmt: str) -> dict[str, Any]:
    """An Alpaca row's `input` under a format that has no {input} (qa, raw, a custom one): joined to
    the instruction, as eval joins them, rather than dropped."""
    extra = values.get("input", "")
    if schema != "alpaca" or "{input}" in fmt or not isinstance(extra, str) or not extra.strip():
        return values
    return {**values, "instruction": f"{values['instruction']}\n\n{extra}", "input": ""}


def prompt_text(template: Template, values: dict[str, Any]) -> str:
    fmt = template.prompt_format
    fields = _fields(_with_input(values, template.schema, fmt), template.schema)
    if template.name == "alpaca" and not fields.get("input", "").strip() and fmt == ALPACA_PROMPT:
        fmt = ALPACA_PROMPT_NO_INPUT
    return _format(fmt, fields)


def render(record: Record, template: Template, tokenizer: Any = None) -> list[Segment]:
    """The example as text segments; `train` marks what the loss is computed on."""
    if template.name == "none":
        return [Segment(record.values["text"], True)]
    if template.name == "chat":
        return _render_chat(record, tokenizer, template.schema)
    prompt = prompt_text(template, record.values)
    completion = _format(template.completion_format, _fields(record.values, template.schema))
    return [Segment(prompt, False), Segment(completion, True)]


def _chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def as_messages(values: dict[str, Any], schema: str) -> list[dict[str, str]]:
    """A row as OpenAI messages: its own, or a prompt/completion pair as one user and one assistant
    turn (an Alpaca input joined to the instruction)."""
    if "messages" in values:
        return values["messages"]
    values = _with_input(values, schema, "")
    return [
        {"role": "user", "content": values[PROMPT_ROLE[schema]]},
        {"role": "assistant", "content": values[COMPLETION_ROLE[schema]]},
    ]


def _render_chat(record: Record, tokenizer: Any, schema: str = "messages") -> list[Segment]:
    """Every assistant turn is trained; everything else (system, user, the template's markup) is not.
    Prompt/completion rows are one user turn and one assistant turn."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "template 'chat' needs a tokenizer with a chat template, and this one has none",
            "messages rows need one: use a model (or model.tokenizer) whose tokenizer ships a chat "
            "template, e.g. an instruct model's"
            if "messages" in record.values
            else "use template: qa / alpaca / custom, or a model whose tokenizer ships a chat template",
        )
    messages = as_messages(record.values, schema)
    segments, bad = _chat_segments(tokenizer, messages)
    if bad is not None:
        raise DataError(
            "the chat template renders earlier turns differently once later turns are added, "
            "so the trained part cannot be located exactly",
            source=record.source,
            line=record.line,
            field=f"messages[{bad}]",
            hint="use a single assistant turn per row, or a template without history rewriting",
        )
    return segments


def _chat_segments(
    tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False
) -> tuple[list[Segment], int | None]:
    """A conversation as `_render_chat`'s segments (with the generation prompt after the last turn
    when asked), and the message where the template rewrites earlier turns (None when it does not)."""
    segments: list[Segment] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _chat(tokenizer, messages[:i], add_generation_prompt=True)
        full = _chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            return segments, i
        segments.append(Segment(prefix[len(done) :], False))
        answer = full[len(prefix) :]
        # Whitespace the template writes after the turn's end token ("<|im_end|>\n") is markup
        # between turns, not the answer: the model stops at the end token and never writes it.
        body = answer.rstrip()
        if body != answer and body.endswith(tuple(_end_tokens(tokenizer))):
            segments += [Segment(body, True), Segment(answer[len(body) :], False)]
        else:
            segments.append(Segment(answer, True))
        done = full
    if add_generation_prompt:
        prompt = _chat(tokenizer, messages, add_generation_prompt=True)
        if not prompt.startswith(done):
            return segments, len(messages) - 1
        segments.append(Segment(prompt[len(done) :], False))
    return [s for s in segments if s.text], None


def chat_prompt_pieces(tokenizer: Any, messages: list[dict[str, str]]) -> list[str]:
    """A conversation's generation prompt as the text segments chat training tokenises one by one
    (its earlier turns, answers and markup), so inference feeds the same ids; the whole prompt as one
    piece when the template rewrites earlier turns (training refuses such rows)."""
    segments, bad = _chat_segments(tokenizer, messages, add_generation_prompt=True)
    if bad is not None:
        return [_chat(tokenizer, messages, add_generation_prompt=True)]
    return [s.text for s in segments]


def _end_tokens(tokenizer: Any) -> set[str]:
    """The tokenizer's special and added tokens (a turn's end token is one of them)."""
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    try:
        tokens |= set(tokenizer.get_added_vocab())
    except (AttributeError, NotImplementedError):
        pass
    return {t for t in tokens if t.strip()}


def turn_end(tokenizer: Any) -> str | None:
    """The special token the chat template writes after an assistant's answer (its end of turn, which
    `chat` training trains), so generation stops there; None when it writes none (a template ending a
    turn with plain text, e.g. `role: content\\n`), or the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    probe = "tunelab probe answer"
    messages = [
        {"role": "user", "content": "tunelab probe question"},
        {"role": "assistant", "content": probe},
    ]
    try:
        prefix = _chat(tokenizer, messages[:1], add_generation_prompt=True)
        full = _chat(tokenizer, messages, add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - a template that rejects the probe: no end token learnt from it
        return None
    answer = full[len(prefix) :] if full.startswith(prefix) else full
    if probe not in answer:
        return None
    after = answer[answer.rindex(probe) + len(probe) :]
    hits = [(after.find(t), -len(t), t) for t in _end_tokens(tokenizer) if t in after]
    return min(hits)[2] if hits else None


def chat_prompt(tokenizer: Any, user_text: str) -> str:
    return _chat(tokenizer, [{"role": "user", "content": user_text}], add_generation_prompt=True)
