"""`tunelab export`: a run as a standalone Hugging Face model, or as its PEFT adapter.

`--merge OUT` folds a LoRA/DoRA adapter into the base weights (a full finetune is saved as it is) and
writes safetensors, the tokenizer, a generation config whose eos ids stop where tunelab stops, and the
run's prompt format as the tokenizer's chat template. vLLM, TGI or plain transformers then prompt the
model exactly as training did: for a qa/alpaca/raw/custom run,
`tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)` is the text
`tunelab generate RUN q` feeds the model, and with `tokenize=True` the ids (a space after the BOS
stands for the dummy prefix where the tokenizer gives text after a special token none, see
`_after_bos`). `--adapter OUT` copies a LoRA run's PEFT adapter.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from tunelab import progress
from tunelab.data.schema import COMPLETION_ROLE, PROMPT_ROLE, Record
from tunelab.data.templates import Template, render
from tunelab.data.tokenize import special_prefix
from tunelab.errors import TunelabError
from tunelab.models import TEMPLATE_FILE, load_model, load_template, pick_dtype, resolve_source

# Stands in for the user's text while the run's prompt format is rendered; never in real text.
_MARK = "\x00tunelab-content\x00"


def _literal(text: str) -> str:
    """A Jinja expression that outputs `text` verbatim. Jinja unescapes string literals like Python,
    so backslashes and quotes are escaped, and line breaks too (raw ones would be normalised)."""
    if not text:
        return ""
    for raw, escaped in (("\\", "\\\\"), ("'", "\\'"), ("\n", "\\n"), ("\r", "\\r")):
        text = text.replace(raw, escaped)
    return "{{ '" + text + "' }}"


def _after_bos(tokenizer: Any, bos: str, start: str) -> str:
    """What the template writes between the BOS text and a prompt that begins with `start` (then the
    message when `start` is empty), so that the whole text tokenised in one call without special
    tokens (`apply_chat_template(tokenize=True)`, vLLM) gives the ids tunelab feeds: the BOS, then the
    prompt tokenised at the start of text. A dummy-prefix tokenizer that prefixes only the text's first
    split (a Metaspace pre-tokenizer with prepend_scheme "first", which transformers builds for a
    Llama tokenizer loaded with legacy=False) gives text after a special token no "▁"; a space then
    stands for it. Found by behaviour: nothing, else a space, whichever gives those ids (nothing when
    neither does)."""
    if not bos:
        return ""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def lead(text: str) -> str:
        want = special_prefix(tokenizer) + ids(text)
        return next((c for c in ("", " ") if ids(bos + c + text) == want), "")

    if start:
        return _literal(lead(start))
    plain, spaced = lead("x"), lead(" x")  # the message comes first: it may begin with a space
    if plain == spaced:
        return _literal(plain)
    return (
        "{% if message['content'].startswith(' ') %}"
        + _literal(spaced)
        + "{% else %}"
        + _literal(plain)
        + "{% endif %}"
    )


def chat_template(template: Template, tokenizer: Any) -> str | None:
    """The chat template that renders messages the way the run rendered its examples.

    A user turn becomes the run's prompt with the message as the question / instruction / prompt, an
    assistant turn its completion followed by EOS (what training trained on); system turns have no place
    in these formats and are left out. The run trained on single questions, so only the conversation
    from its last user message on is rendered, as `tunelab serve` and `chat` do; the prompt's part
    after the message (e.g. `### Answer:`) is the generation prompt, written when an answer follows or
    `add_generation_prompt` asks for it. `chat` runs keep the tokenizer's own template."""
    if template.name in ("chat", "none"):
        return getattr(tokenizer, "chat_template", None)
    role = PROMPT_ROLE.get(template.schema, "prompt")
    answer = COMPLETION_ROLE.get(template.schema, "completion")
    values = {role: _MARK, "prompt": _MARK, answer: _MARK, "completion": _MARK}
    try:
        prompt, completion = render(Record("(export)", 0, values), template)
    except TunelabError as e:
        raise TunelabError(
            f"the run's prompt format cannot be written as a chat template: {e.message}",
            "its format names fields beyond the user's text; export the model and render prompts yourself",
        ) from None
    parts = prompt.text.split(_MARK)
    bos = tokenizer.decode(special_prefix(tokenizer))
    lead = _after_bos(tokenizer, bos, parts[0])
    user = "{% if loop.first %}" + lead + "{% endif %}" if lead else ""
    if len(parts) == 2:  # the message once: what follows it is the generation prompt
        user += _literal(parts[0]) + "{{ message['content'] }}"
        user += "{% if not loop.last or add_generation_prompt %}" + _literal(parts[1]) + "{% endif %}"
    else:
        user += "{{ message['content'] }}".join(_literal(p) for p in parts)
    assistant = "{{ message['content'] }}".join(_literal(p) for p in completion.text.split(_MARK))
    return (
        _literal(bos)  # e.g. Llama's BOS, as tunelab adds it
        + "{% set ns = namespace(start=0) %}"
        + "{% for message in messages %}{% if message['role'] == 'user' %}{% set ns.start = loop.index0 %}"
        + "{% endif %}{% endfor %}"
        + "{% for message in messages[ns.start:] %}"
        + "{% if message['role'] == 'user' %}"
        + user
        + "{% elif message['role'] == 'assistant' %}"
        + assistant
        + "{{ eos_token }}"
        + "{% endif %}"
        + "{% endfor %}"
    )


def _check_out(out: Path, overwrite: bool, sources: list[str | Path]) -> None:
    """Refuse, before anything is read or written, an output that cannot take the export: a file, a
    folder that is or holds or lies inside what is exported (--overwrite would delete the source
    before it is read), a non-empty folder without --overwrite."""
    if out.exists() and not out.is_dir():
        raise TunelabError(f"{out} is a file, not a folder", "choose a folder path for the export")
    for source in sources:
        if Path(source).exists() and _overlaps(out, Path(source)):
            raise TunelabError(
                f"the output {out} is or overlaps what is being exported ({source})",
                "choose an output folder outside the run (e.g. exports/NAME)",
            )
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TunelabError(
            f"{out} already exists and is not empty", "pass --overwrite or choose another path"
        )


def _overlaps(a: Path, b: Path) -> bool:
    """The same folder, or one inside the other."""
    a, b = a.expanduser().resolve(), b.expanduser().resolve()
    return a == b or a in b.parents or b in a.parents


def _prepare_out(out: Path) -> None:
    """Empties the output folder (checked by `_check_out`), once the source has been read."""
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TunelabError(f"cannot create {out}: {e.strerror}", "choose a folder you can write to") from None


def _sources(source: str) -> list[str | Path]:
    """What an export of `source` reads: the path given, its run, its model and its adapter."""
    src = resolve_source(source)
    return [source, *(p for p in (src.run_dir, src.adapter, src.model) if p)]


def _saved_dtype(model_path: str) -> str:
    """The dtype the base checkpoint was stored in, so a merged bf16 model stays bf16."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    saved = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return saved if saved in ("float32", "bfloat16", "float16") else "float32"


def merge(source: str, out: Path, dtype: str = "auto", overwrite: bool = False) -> Path:
    """Write `source` (a run dir, adapter or HF folder) as one standalone HF model folder."""
    from tunelab.generate import Generator

    _check_out(out, overwrite, _sources(source))
    # Merged in float32 on the CPU: W + (alpha/r)·BA is then exact to float32, whatever the base's dtype.
    with progress.timed(f"export: loading {source}") as say:  # a billion-parameter model takes a while
        model, tok, src = load_model(source, dtype="float32", device="cpu")
        say(f"{sum(p.numel() for p in model.parameters()):,} parameters")
    if src.adapter:
        with progress.timed("export: merging the LoRA adapter into the weights"):
            model = model.merge_and_unload()
    model = model.to(pick_dtype(_saved_dtype(src.model) if dtype == "auto" else dtype, model.device))
    saved = load_template(src.adapter or src.model)
    template = Template(**saved) if saved else None
    if template is not None:
        tok.chat_template = chat_template(template, tok)
    # Stop where `tunelab generate` stops: EOS plus any end-of-turn token the tokenizer has.
    stops = Generator(model, tok, template).stop_ids()
    gen = model.generation_config
    gen.eos_token_id = stops if len(stops) > 1 else (stops[0] if stops else None)
    gen.pad_token_id = tok.pad_token_id
    _prepare_out(out)
    with progress.timed(f"export: writing {out}"):
        model.save_pretrained(out)
        tok.save_pretrained(out)
        gen.save_pretrained(out)
    if saved is not None:
        (out / TEMPLATE_FILE).write_text(json.dumps(saved, indent=2))  # tunelab reads the folder like the run
    return out


def copy_adapter(source: str, out: Path, overwrite: bool = False) -> Path:
    """Copy a LoRA run's PEFT adapter (with tokenizer and template); `PeftModel.from_pretrained` loads it."""
    src = resolve_source(source)
    if not src.adapter:
        raise TunelabError(
            f"{source} holds a full model, not a LoRA adapter",
            f"use `tunelab export {source} --merge OUT` (or copy its final/ folder as it is)",
        )
    _check_out(out, overwrite, _sources(source))
    _prepare_out(out)
    shutil.copytree(src.adapter, out, dirs_exist_ok=True)
    return out


def handler(args: argparse.Namespace) -> int:
    if not (args.merge or args.adapter):
        raise TunelabError("nothing to export", "give --merge OUT and/or --adapter OUT")
    if args.dtype != "auto" and not args.merge:
        raise TunelabError(
            f"--dtype is the merged model's dtype, and nothing is merged: --dtype {args.dtype} would do "
            "nothing (the adapter is copied as trained)",
            "add --merge OUT, or leave --dtype out",
        )
    if args.merge and args.adapter and _overlaps(Path(args.merge), Path(args.adapter)):
        raise TunelabError(
            "--merge and --adapter name the same or nested folders", "give each its own folder"
        )
    if args.adapter:
        out = copy_adapter(args.run, Path(args.adapter), args.overwrite)
        base = json.loads((out / "adapter_config.json").read_text()).get("base_model_name_or_path")
        print(f"adapter written to {out} (base model: {base})")
    if args.merge:
        with progress.shown():  # on stderr
            out = merge(args.run, Path(args.merge), args.dtype, args.overwrite)
        print(f"merged model written to {out}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="write a run as a standalone HF model (LoRA merged) or its adapter")
    p.add_argument("run", help="run directory (or its best/ folder, an adapter or an HF model folder)")
    p.add_argument("--merge", metavar="OUT", help="standalone model: weights, tokenizer, chat template")
    p.add_argument("--adapter", metavar="OUT", help="the PEFT adapter of a LoRA run")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="merged weights' dtype (auto = the base model's)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=handler)
