"""Inference with the run's own template and stop tokens, so training and inference never disagree."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.data.templates import Template, chat_prompt, chat_prompt_pieces, prompt_text, turn_end
from tunelab.errors import DataError, TunelabError
from tunelab.models import load_model, load_template

# A prompt: its text, or a whole data row (a batch file's JSONL line), rendered as training rendered
# rows: every field the template names (Alpaca's `input` too), or a chat's messages.
Prompt = str | dict[str, Any]


class RenderedPrompt(str):
    """A rendered prompt's text that keeps the segments it was rendered as (evaluation's few-shot
    prompts, a chat's turns), so raw generation tokenises them as training tokenised them."""

    pieces: tuple[str, ...]

    def __new__(cls, pieces: list[str]) -> RenderedPrompt:
        text = super().__new__(cls, "".join(pieces))
        text.pieces = tuple(pieces)
        return text


# The field that holds a row's prompt text, first found first.
PROMPT_KEYS = ("prompt", "question", "instruction", "input")

# End-of-turn tokens of common chat templates; generation stops on any the tokenizer knows.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop": a stop token or stop string ended it; "length": it hit max_new_tokens
    prompt_tokens: int
    completion_tokens: int  # generated tokens before the stop (the stop token itself not counted)


def left_padded(ids: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of prompts padded on the left, so every prompt's last token sits where the first new
    token is predicted; returns input_ids and attention_mask."""
    width = max(len(i) for i in ids)
    input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
    return input_ids, mask


def decoding(temperature: float, top_p: float, stops: list[int], pad: int) -> dict[str, Any]:
    """generate() arguments for greedy (temperature 0) or sampled decoding that stops on `stops`."""
    sample = temperature > 0
    return {
        "do_sample": sample,
        "temperature": temperature if sample else None,
        "top_p": top_p if sample else None,
        "top_k": None,
        "eos_token_id": stops,
        "pad_token_id": pad,
    }


def check_decoding(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Refuse what generate() cannot honour, before a model loads (transformers raises deep inside,
    or silently decodes greedily for a negative temperature)."""
    if max_new_tokens < 1:
        raise TunelabError(
            f"max_new_tokens: got {max_new_tokens}, expected at least 1",
            "ask for 1 or more new tokens (--max-new-tokens N, or max_new_tokens=N in Python)",
        )
    if temperature < 0 or not 0 < top_p <= 1:
        raise TunelabError(
            f"temperature {temperature}, top_p {top_p}: expected temperature >= 0 (0 = greedy) "
            "and 0 < top_p <= 1"
        )


def note_unused_sampling(temperature: float, top_p: float, seed: int | None = None) -> None:
    """Say that sampling options given with temperature 0 change nothing (greedy decoding draws no
    random numbers and keeps no nucleus); `seed` None = not given or not only for sampling."""
    unused = [f"--top-p {top_p}"] * (top_p != 1.0) + [f"--seed {seed}"] * (seed is not None)
    if temperature == 0 and unused:
        print(
            f"note: {', '.join(unused)} ignored: --temperature is 0, greedy decoding (the likeliest "
            "token each time, nothing sampled); a --temperature above 0 samples with them",
            file=sys.stderr,
        )


@dataclass
class Generator:
    model: Any
    tokenizer: Any
    template: Template | None  # None = feed the text as-is (a plain HF model with no tunelab template)

    @classmethod
    def load(cls, name_or_path: str, device: str = "auto", dtype: str = "auto") -> Generator:
        model, tok, src = load_model(name_or_path, dtype=dtype, device=device)
        folder = src.adapter or src.model
        saved = load_template(folder)
        template = Template(**saved) if saved else None
        model.eval()
        return cls(model, tok, template)

    def render(self, prompt: Prompt) -> str:
        if isinstance(prompt, dict):
            return self._render_row(prompt)
        text = prompt
        if self.template is None or self.template.name == "none":
            return text
        if self.template.name == "chat":
            return chat_prompt(self.tokenizer, text)
        from tunelab.data.schema import PROMPT_ROLE

        role = PROMPT_ROLE.get(self.template.schema, "prompt")
        return prompt_text(self.template, {role: text, "prompt": text})

    def pieces(self, prompt: Prompt) -> list[str]:
        """The rendered prompt as the text segments training tokenised one by one (a conversation's
        turns; one piece for a single question), so `prompt_ids` feeds the ids training saw."""
        messages = self._chat_messages(prompt) if isinstance(prompt, dict) else None
        if messages is not None:
            return chat_prompt_pieces(self.tokenizer, messages)
        return [self.render(prompt)]

    def _chat_messages(self, row: dict[str, Any]) -> list[dict[str, str]] | None:
        """A row's conversation up to the answer to generate, under a chat run; None otherwise."""
        messages = row.get("messages")
        if not (
            isinstance(messages, list)
            and messages
            and self.template is not None
            and self.template.name == "chat"
        ):
            return None
        if messages[-1].get("role") == "assistant":  # the reference answer: not part of the prompt
            messages = messages[:-1]
        return messages

    def _render_row(self, row: dict[str, Any]) -> str:
        messages = self._chat_messages(row)
        if messages is not None:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        key = prompt_key(row)
        if self.template is None or self.template.name == "none":
            return self.render(str(row[key]))
        from tunelab.data.schema import PROMPT_ROLE
        from tunelab.data.templates import _with_input

        role = PROMPT_ROLE.get(self.template.schema, "prompt")
        # {prompt} is left to the template to derive from the role, as in training: an Alpaca input
        # is then joined to the instruction it stands for.
        values = {**{k: v for k, v in row.items() if isinstance(v, str) and k != key}, role: str(row[key])}
        if self.template.name == "chat":  # one user turn, as training made of a prompt/completion row
            return chat_prompt(self.tokenizer, _with_input(values, self.template.schema, "")[role])
        return prompt_text(self.template, values)

    @property
    def context_length(self) -> int | None:
        """The most tokens (prompt and answer) the model takes, where its config says."""
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def stop_ids(self) -> list[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
        if self.template is None or self.template.name in ("chat", "none"):  # prompts via the chat template
            end = turn_end(self.tokenizer)  # what chat training labels last in an answer
            if end in vocab:
                ids.add(vocab[end])
        return sorted(ids)

    def generate(
        self,
        prompts: list[Prompt],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        batch_size: int = 32,
        raw: bool = False,
    ) -> list[str]:
        """Greedy by default. `raw=True` skips the template (the text is already a full prompt)."""
        details = self.generate_detailed(prompts, max_new_tokens, temperature, top_p, seed, batch_size, raw)
        return [d.text for d in details]

    @torch.no_grad()
    def prompt_ids(
        self, prompts: list[Prompt], max_new_tokens: int, raw: bool = False, first: int = 1
    ) -> list[list[int]]:
        """Each prompt's token ids as generation feeds them (rendered unless `raw`, after the BOS the
        template wants), its segments tokenised as training tokenised them (`tokenize.sequence_ids`);
        a prompt that leaves no room for `max_new_tokens` in the model's context is refused, named by
        its number (the first one is `first`)."""
        from tunelab.data.tokenize import sequence_ids, special_prefix

        tok = self.tokenizer
        prefix = [] if (self.template is not None and self.template.name == "chat") else special_prefix(tok)
        ids = [
            prefix
            + sequence_ids(
                (list(p.pieces) if isinstance(p, RenderedPrompt) else [prompt_of(p)])
                if raw
                else self.pieces(p),
                tok,
            )
            for p in prompts
        ]
        context = self.context_length
        for k, prompt_ids in enumerate(ids):
            if context is not None and len(prompt_ids) + max_new_tokens > context:
                raise TunelabError(
                    f"prompt {first + k} is {len(prompt_ids):,} tokens and {max_new_tokens} more were "
                    f"asked for, past this model's context of {context:,} tokens",
                    "shorten the prompt, or lower --max-new-tokens",
                )
        return ids

    def generate_detailed(
        self,
        prompts: list[Prompt],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        batch_size: int = 32,
        raw: bool = False,
        stop_strings: list[str] | None = None,
    ) -> list[Generation]:
        """As `generate`, plus why each generation ended and its token counts. `stop_strings` also end
        a generation (the text is cut before them), e.g. the next question of a few-shot prompt."""
        check_decoding(max_new_tokens, temperature, top_p)
        device = next(self.model.parameters()).device
        if seed is not None:
            torch.manual_seed(seed)
        stops = self.stop_ids()
        tok = self.tokenizer
        outputs: list[Generation] = []
        for start in range(0, len(prompts), batch_size):
            ids = self.prompt_ids(prompts[start : start + batch_size], max_new_tokens, raw, first=start + 1)
            pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
            input_ids, mask = left_padded(ids, pad, device)
            width = input_ids.shape[1]
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                **decoding(temperature, top_p, stops, pad),
                stop_strings=stop_strings or None,
                tokenizer=tok if stop_strings else None,
            )
            for prompt_ids, row in zip(ids, out[:, width:].tolist()):
                cut = next((k for k, t in enumerate(row) if t in stops), None)
                text = tok.decode(row[:cut], skip_special_tokens=True)
                n = len(row) if cut is None else cut
                hit = min((text.index(s) for s in stop_strings or () if s in text), default=None)
                if hit is not None:
                    text = text[:hit]
                    n = len(tok(text, add_special_tokens=False)["input_ids"])
                reason = "length" if cut is None and hit is None else "stop"
                outputs.append(Generation(text, reason, len(prompt_ids), n))
        return outputs


def prompt_key(row: dict[str, Any]) -> str:
    """The field of a data row that holds its prompt text."""
    return next(k for k in PROMPT_KEYS if k in row)


def prompt_of(prompt: Prompt) -> str:
    """A prompt's own text: a row's prompt field (a chat row's last user turn)."""
    if not isinstance(prompt, dict):
        return prompt
    messages = prompt.get("messages")
    if isinstance(messages, list):
        users = [m.get("content", "") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1]) if users else ""
    return str(prompt[prompt_key(prompt)])


def read_prompts(path: str | Path) -> list[Prompt]:
    """A batch file: JSONL rows, each rendered whole as training renders rows (a `prompt`, `question`,
    `instruction` or `input` field and whatever else the template names, or `messages`), or plain
    lines of text."""
    p = Path(path)
    if not p.exists():
        raise DataError("file not found", source=str(p))
    prompts: list[Prompt] = []
    for number, line in enumerate(p.read_text(encoding="utf-8-sig").split("\n"), start=1):
        if not line.strip():
            continue
        if p.suffix in (".jsonl", ".json"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"not valid JSON ({e.msg})", source=str(p), line=number) from None
            if not isinstance(row, dict) or not (
                any(k in row for k in PROMPT_KEYS) or isinstance(row.get("messages"), list)
            ):
                raise DataError(
                    "no prompt/question/instruction/input field, and no messages list",
                    source=str(p),
                    line=number,
                )
            prompts.append(row)
        else:
            prompts.append(line.rstrip("\r"))
    return prompts
