"""What the server serves: models loaded once under the names clients pick, and requests turned into
prompt ids exactly as `tunelab generate` builds them."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.templates import Template, chat_prompt_pieces
from tunelab.data.tokenize import sequence_ids, special_prefix
from tunelab.errors import ModelLoadError
from tunelab.generate import Generator

BASE = "__base__"  # a served name whose model is a PeftModel but which must run with adapters off


@dataclass
class Served:
    """One name clients can pick with `model`: a Generator and, for shared bases, which adapter is on."""

    name: str
    generator: Generator
    adapter: str | None = None  # PEFT adapter to activate; BASE = adapters off; None = as loaded

    @property
    def context_length(self) -> int | None:
        return self.generator.context_length

    def activate(self) -> Any:
        model = self.generator.model
        if self.adapter == BASE:
            return model.disable_adapter()
        if self.adapter is not None:
            model.set_adapter(self.adapter)
        return nullcontext()


# ---------------------------------------------------------------- prompts


def _is_chat_run(gen: Generator) -> bool:
    return gen.template is not None and gen.template.name == "chat"


def uses_history(gen: Generator) -> bool:
    """Chat runs and plain models with a chat template see the whole conversation; template runs
    (qa, alpaca, ...) were trained on single questions, so they see only the last user message."""
    plain = gen.template is None or gen.template.name == "none"
    return _is_chat_run(gen) or (plain and bool(getattr(gen.tokenizer, "chat_template", None)))


def completion_ids(gen: Generator, text: str, raw: bool = False) -> list[int]:
    """Token ids exactly as `Generator.generate` builds them, so greedy answers match `tunelab generate`."""
    tok = gen.tokenizer
    prefix = [] if _is_chat_run(gen) else special_prefix(tok)
    return prefix + sequence_ids([text] if raw else gen.pieces(text), tok)


def chat_ids(gen: Generator, messages: list[dict[str, str]]) -> list[int]:
    """A chat run's conversation tokenised turn by turn as chat training tokenised it; a plain model's
    (no training to agree with) as one text."""
    if uses_history(gen):
        tok = gen.tokenizer
        if _is_chat_run(gen):
            return sequence_ids(chat_prompt_pieces(tok, messages), tok)
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return sequence_ids([text], tok)
    last_user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    return completion_ids(gen, last_user)


# ---------------------------------------------------------------- loading


def _same_model(a: str, b: str) -> bool:
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def load_served(
    models: list[str],
    adapters: list[str] = (),
    names: dict[str, str] | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> dict[str, Served]:
    """Load each model once. Each of `adapters` (LoRA runs) is put on the served model holding the
    base it was trained on, sharing its weights. Names: `names[path]` when given, else the path's basename (a hub id stays whole)."""
    from peft import PeftModel

    from tunelab.models import load_template, load_tokenizer, resolve_source

    names = names or {}

    def name_of(path: str) -> str:
        given = [name for key, name in names.items() if _same_model(key, path)]
        if given:
            return given[0]
        p = Path(path)
        if not p.exists():
            return path  # a hub id names itself
        return p.parent.name if p.name == "final" else p.name

    served: dict[str, Served] = {}

    def add(s: Served) -> None:
        if s.name in served:
            raise ModelLoadError(
                f"two served models are both named '{s.name}'", "name one of them with --name NAME=PATH"
            )
        served[s.name] = s

    hosts: list[tuple[str, Served]] = []  # (base weights path, the served model holding them)
    for path in models:
        gen = Generator.load(path, device=device, dtype=dtype)
        s = Served(name_of(path), gen, "default" if isinstance(gen.model, PeftModel) else None)
        add(s)
        hosts.append((resolve_source(path).model, s))
    for k, path in enumerate(adapters):
        src = resolve_source(path)
        if src.adapter is None:
            raise ModelLoadError(
                f"--adapter {path} holds no LoRA adapter (a full model)",
                f"serve it as a model: tunelab serve {path}",
            )
        host = next((s for base, s in hosts if _same_model(src.model, base)), None)
        if host is None:
            raise ModelLoadError(
                f"adapter {path} was trained on {src.model}, which is not among the served models",
                f"serve its base too: tunelab serve {src.model} --adapter {path}",
            )
        model = host.generator.model
        adapter_name = f"adapter{k}"
        if isinstance(model, PeftModel):
            model.load_adapter(src.adapter, adapter_name=adapter_name)
        else:  # the base was loaded plain: wrap it once, and keep serving it with adapters off
            model = PeftModel.from_pretrained(model, src.adapter, adapter_name=adapter_name)
            model.eval()
            host.generator.model = model
            host.adapter = BASE
        saved = load_template(src.adapter)
        gen = Generator(model, load_tokenizer(src.adapter), Template(**saved) if saved else None)
        add(Served(name_of(path), gen, adapter_name))
    return served
