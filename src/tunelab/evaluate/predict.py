"""One contender through the test set: render each question with the run's template, generate, score,
analyse errors, and measure held-out loss on the references.

A contender is a model name (run directory, HF folder, hub id, 'world') or `fewshot:K:MODEL`: MODEL
prompted with K training examples before each question, so "prompt engineering or finetuning?" is
answered on the user's own data.
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from tunelab.data import formats, schema, templates
from tunelab.data.schema import COMPLETION_ROLE, PROMPT_ROLE, Record
from tunelab.data.templates import Segment, Template
from tunelab.errors import DataError, TunelabError
from tunelab.evaluate import errors as error_rules
from tunelab.evaluate.metrics import Metric, score

SHOT_SEPARATOR = "\n\n"


@dataclass
class Example:
    question: str  # the user's text, shown in tables and checked by copies_prompt
    reference: str
    record: Record  # validated row, rendered exactly as training renders it
    schema: str
    row: dict[str, Any]  # every column of the row, for --group-by and display


def examples_from_rows(
    rows: list[dict[str, Any]] | list[formats.Row],
    source: str = "<rows>",
    fields: dict[str, str] | None = None,
    skipped: list[DataError] | None = None,
) -> list[Example]:
    """Rows with `question`/`answer` (or any schema tunelab trains on, except raw text); `fields`
    maps roles to other column names, as `data.fields` does for training. A row that is not a
    usable example raises its DataError, or with `skipped` is left out and its error added there."""
    fields = fields or {}
    wrapped = [
        r if isinstance(r, formats.Row) else formats.Row(source, i, r) for i, r in enumerate(rows, start=1)
    ]
    schema.check_fields(wrapped, fields, None, source)  # as training does: a role no schema has
    name = schema.detect_schema(wrapped, fields, source)
    schema.check_fields(wrapped, fields, name, source)  # a role of another schema, a column no row has
    if name == "text":
        raise DataError(
            "evaluation needs prompt/answer pairs, but the rows are raw text",
            source=source,
            hint="give rows with question/answer (or instruction/output, prompt/completion, messages)",
        )
    out = []
    for row in wrapped:
        try:
            rec = schema.to_record(row, name, fields)
        except DataError as e:
            if skipped is None:
                raise
            skipped.append(e)
            continue
        if name == "messages":
            msgs = rec.values["messages"]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            question = next((m["content"] for m in reversed(msgs[:last]) if m["role"] == "user"), "")
            reference = msgs[last]["content"]
        else:
            question = rec.values[PROMPT_ROLE[name]]
            if name == "alpaca" and rec.values.get("input", "").strip():
                question = f"{question}\n\n{rec.values['input']}"
            reference = rec.values[COMPLETION_ROLE[name]]
        out.append(Example(question, reference, rec, name, row.data))
    return out


def read_examples(
    path: str,
    limit: int | None = None,
    fields: dict[str, str] | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
) -> list[Example]:
    """A test file in any format `tunelab train` reads (`world:heldout.jsonl` for the shipped one).
    `on_bad_row="skip"` leaves out rows that cannot be read or are not usable examples (an empty
    answer, say), each said on stderr with its line; `limit` counts the usable ones. Under "error"
    the first bad row stops it, unless it lies past the `limit` rows used."""
    from tunelab.world.build import resolve_world_path

    file = resolve_world_path(path)
    read = formats.read_rows(file, on_bad_row="skip")
    skipped: list[DataError] = []
    examples = examples_from_rows(read.rows, path, fields, skipped)
    examples = examples[:limit]  # their records keep the file's own line numbers, for messages
    if on_bad_row == "error":
        last = examples[-1].record.line if limit is not None and len(examples) == limit else math.inf
        formats.raise_first_bad_row(file, "auto", read.rejects, skipped, upto=last)
        read.rejects, skipped = [], []  # past the limit: not read
    bad = [f"{r.source}:{r.line}: {r.reason}" for r in read.rejects] + [
        str(e).splitlines()[0] for e in skipped
    ]
    if bad:
        print(f"left out {len(bad)} bad rows of {path}:", *bad[:10], sep="\n  ", file=sys.stderr)
    if not examples:
        raise DataError("no rows to evaluate", source=path)
    return examples


@dataclass(frozen=True)
class Contender:
    spec: str  # as the user wrote it
    model: str  # what `load_model` reads
    shots: int = 0


def parse_contender(spec: str) -> Contender:
    if spec.startswith("fewshot:"):
        _, k, model = (spec.split(":", 2) + ["", ""])[:3]
        if not k.isdigit() or int(k) < 1 or not model:
            raise TunelabError(
                f"'{spec}' is not of the form fewshot:K:MODEL", "e.g. fewshot:5:world (5 training examples)"
            )
        return Contender(spec, model, int(k))
    return Contender(spec, spec)


def label_for(spec: str) -> str:
    """A short column name: a path's last part, a hub id as is."""
    from tunelab.models import run_of

    c = parse_contender(spec)
    p = Path(c.model)
    name = p.name if p.exists() else c.model
    run = run_of(p) if p.is_dir() else None
    if run is not None:  # a run's final/ is the run; its best/ is "run/best"
        name = run.name if p.name == "final" else f"{run.name}/{p.name}"
    elif name == "final" and p.exists():
        name = p.parent.name
    return f"{c.shots}-shot {name}" if c.shots else name


def own_template(model: str) -> Template | None:
    """The template saved with a model, read without loading weights."""
    from tunelab.models import load_template, resolve_source

    try:
        src = resolve_source(model)
    except TunelabError:
        return None
    saved = load_template(src.adapter or src.model)
    return Template(**saved) if saved else None


@dataclass
class EvalSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0  # sampling and the choice of few-shot examples
    batch_size: int = 16
    device: str = "auto"
    # None: each model's own template, and for a model without one (a base model) the first template
    # found among the contenders, so base and finetuned see the same prompt. Or a builtin name.
    template: str | None = None
    metrics: list[str] = field(default_factory=list)  # user metrics, module:function
    format_regex: str | None = None
    with_loss: bool = True
    micro_batch_tokens: int = 8192
    progress: bool = False
    # The held-out loss's truncation: a run's data.max_length / truncation_side, so its number is
    # training's eval loss (None: the model's context, cut on the left). Not for few-shot prompts.
    max_length: int | None = None
    truncation_side: Literal["left", "right"] = "left"


@dataclass
class Prediction:
    index: int
    prompt: str  # the full text the model saw
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    scores: dict[str, float]
    errors: list[str]


@dataclass
class ModelResult:
    label: str
    spec: str
    template: str | None
    loss: float | None
    predictions: list[Prediction]
    run_dir: str | None = None
    seconds: float = 0.0

    @property
    def perplexity(self) -> float | None:
        return None if self.loss is None else math.exp(min(self.loss, 50.0))

    def scores(self, metric: str) -> list[float]:
        return [p.scores.get(metric, math.nan) for p in self.predictions]


def _as_template_record(ex: Example, template: Template) -> Record:
    """The example in the template's own schema (a QA test file through an Alpaca run, say)."""
    if template.name == "chat":
        msgs = ex.record.values["messages"] if ex.schema == "messages" else []
        if not msgs:
            msgs = [{"role": "user", "content": ex.question}, {"role": "assistant", "content": ex.reference}]
        return replace(ex.record, values={"messages": msgs})
    if ex.schema == template.schema:
        return ex.record
    role = PROMPT_ROLE.get(template.schema, "prompt")
    target = COMPLETION_ROLE.get(template.schema, "completion")
    return replace(ex.record, values={role: ex.question, target: ex.reference})


def segments(ex: Example, template: Template | None, tokenizer: Any, shots: list[Example]) -> list[Segment]:
    """The example as text segments, ending with its final answer; everything before that answer is
    the prompt the model generates from. The eval loss scores the example's own answers, every
    assistant turn of a conversation as training's evaluation does, never the shots'."""
    if template is None or template.name == "none":
        return [Segment(ex.question, False), Segment(ex.reference, True)]
    if template.name == "chat":
        turns = []
        for s in shots:
            turns += [{"role": "user", "content": s.question}, {"role": "assistant", "content": s.reference}]
        rec = _as_template_record(ex, template)
        rec = replace(rec, values={"messages": turns + rec.values["messages"]})
        segs = templates.render(rec, template, tokenizer)
    else:
        segs = []
        for s in shots:
            segs += templates.render(_as_template_record(s, template), template, tokenizer)
            segs.append(Segment(SHOT_SEPARATOR, False))
        segs += templates.render(_as_template_record(ex, template), template, tokenizer)
    trained = [i for i, s in enumerate(segs) if s.train]  # each shot's answer is one, first
    scored = set(trained[len(shots) :])
    return [Segment(s.text, i in scored) for i, s in enumerate(segs[: trained[-1] + 1])]


def shot_stops(template: Template | None) -> list[str]:
    """Where the next few-shot example would start: a few-shot answer ends there. Alpaca's prompt
    opens with one of two preambles (with an input or without), so both stop it. Under chat the
    shots are earlier turns: the end-of-turn token ends the answer, as it does without shots."""
    if template is not None and template.name == "chat":
        return []
    if template is None or template.name == "none":
        return [SHOT_SEPARATOR]
    formats = [template.prompt_format]
    if template.name == "alpaca" and template.prompt_format == templates.ALPACA_PROMPT:
        formats.append(templates.ALPACA_PROMPT_NO_INPUT)
    heads = [f.split("{", 1)[0].strip().split("\n", 1)[0].strip() for f in formats]
    return list(dict.fromkeys(h for h in heads if h)) or [SHOT_SEPARATOR]


def pick_shots(pool: list[Example], k: int, seed: int, test: list[Example]) -> list[Example]:
    """K training examples, seeded, never one whose question is also a test question (leakage)."""
    asked = {e.question.strip() for e in test}
    usable = [e for e in pool if e.question.strip() not in asked]
    if len(usable) < k:
        raise TunelabError(
            f"few-shot needs {k} training examples not in the test set, found {len(usable)}",
            "give more rows with --train-data, or a smaller K",
        )
    return random.Random(seed).sample(usable, k)


def held_out_loss(
    model: Any,
    tokenizer: Any,
    segs: list[list[Segment]],
    chat: bool,
    micro_batch_tokens: int,
    max_length: int | None = None,
    truncation_side: Literal["left", "right"] = "left",
) -> float:
    """Mean loss per answer token with the training loop's own `evaluate` (and its per-example
    packed attention, so the number is computed exactly as training's eval loss)."""
    from tunelab.data.tokenize import encode
    from tunelab.training.loop import evaluate, fast_paths

    limit = max_length or getattr(model.config, "max_position_embeddings", None) or 2048
    # By default left truncation: a long (few-shot) prompt loses its head, never the scored answer.
    encoded = [
        encode(s, tokenizer, limit, truncation_side, add_eos=not chat, add_prefix=not chat) for s in segs
    ]
    device = next(model.parameters()).device
    longest = max((len(e.input_ids) for e in encoded), default=1)
    with fast_paths(model):
        return evaluate(model, encoded, max(micro_batch_tokens, longest), device)


def _generate(
    gen: Any, prompts: list[str], settings: EvalSettings, stop: list[str] | None, name: str
) -> list[Any]:
    out: list[Any] = []
    gen.prompt_ids(prompts, settings.max_new_tokens, raw=True)  # every row fits, before any generates
    with _progress(settings.progress, name, len(prompts)) as advance:
        for n, start in enumerate(range(0, len(prompts), settings.batch_size)):
            chunk = prompts[start : start + settings.batch_size]
            out += gen.generate_detailed(
                chunk,
                settings.max_new_tokens,
                settings.temperature,
                settings.top_p,
                settings.seed if n == 0 else None,  # seeded once: later batches continue the stream
                settings.batch_size,
                raw=True,
                stop_strings=stop,
            )
            advance(len(chunk))
    return out


def _predictions(
    examples: list[Example],
    generations: list[Any],
    prompts: list[str],
    metrics: list[Metric],
    rules: Any,
    label: str = "model",
) -> list[Prediction]:
    out = []
    failures: dict[str, list[str]] = {}
    for i, (ex, g, prompt) in enumerate(zip(examples, generations, prompts)):
        text = g.text.strip()
        out.append(
            Prediction(
                index=i,
                prompt=prompt,
                text=text,
                finish_reason=g.finish_reason,
                prompt_tokens=g.prompt_tokens,
                completion_tokens=g.completion_tokens,
                scores=score(text, ex.reference, metrics, failures),
                errors=error_rules.analyse(text, ex.reference, ex.question, g.finish_reason, rules),
            )
        )
    for name, errors in failures.items():
        print(
            f"metric '{name}' failed on {len(errors)} of {len(out)} rows for {label}; those rows have no "
            f"score (left out of its mean and intervals). First: {errors[0][:200]}",
            file=sys.stderr,
        )
    return out


def _template_for(
    own: Template | None, shared: Template | None, settings: EvalSettings, examples: list[Example], shots: int
) -> Template | None:
    """The template a contender is asked in: --template, else its own, else the shared one (a base
    model asked as the run is), else for a few-shot contender qa (its shots need markup between)."""
    if settings.template is not None:
        return templates.resolve(settings.template, examples[0].schema)
    if own is None and shared is None and shots:
        return templates.resolve("qa", "qa")
    return own or shared


@dataclass
class _ConfigOnly:
    """A model's config without its weights: all `Generator.prompt_ids` reads of a model."""

    config: Any


def check_prompts_fit(
    spec: str | Any,
    examples: list[Example],
    settings: EvalSettings,
    shared_template: Template | None = None,
    train_pool: list[Example] | None = None,
    label: str | None = None,
    tokenizers: dict[str, Any] | None = None,
) -> None:
    """Every prompt a contender will be asked, with its template, shots and tokenizer, leaves room for
    `max_new_tokens` in its context, read without loading its weights: so that a prompt too long for
    a later contender stops a comparison before the earlier ones generate, not after."""
    from transformers import AutoConfig

    from tunelab.generate import Generator
    from tunelab.models import load_tokenizer, resolve_source

    if isinstance(spec, str):
        contender = parse_contender(spec)
        src = resolve_source(contender.model)
        folder = src.adapter or src.model
        cache = tokenizers if tokenizers is not None else {}
        if folder not in cache:
            cache[folder] = load_tokenizer(folder)
        gen = Generator(
            _ConfigOnly(AutoConfig.from_pretrained(src.model)), cache[folder], own_template(contender.model)
        )
        shots = contender.shots
    else:
        gen, shots = spec, 0
    template = _template_for(gen.template, shared_template, settings, examples, shots)
    chosen = pick_shots(train_pool or [], shots, settings.seed, examples) if shots else []
    prompts = ["".join(s.text for s in segments(ex, template, gen.tokenizer, chosen)[:-1]) for ex in examples]
    previous = gen.template
    gen.template = template  # as evaluate_contender sets it: it decides the BOS prefix
    try:
        gen.prompt_ids(prompts, settings.max_new_tokens, raw=True)
    except TunelabError as e:
        name = label or (spec if isinstance(spec, str) else "model")
        raise TunelabError(
            f"{name}: {e.message} (found before any model generated)",
            f"{e.hint}{', or fewer shots' if shots else ''}; or leave {name} out of the comparison",
        ) from None
    finally:
        gen.template = previous


def evaluate_contender(
    spec: str | Any,
    examples: list[Example],
    settings: EvalSettings,
    metrics: list[Metric],
    shared_template: Template | None = None,
    train_pool: list[Example] | None = None,
    label: str | None = None,
) -> ModelResult:
    """Load (or take a loaded `Generator`), generate for every example, score, analyse, and measure
    the loss of the references."""
    from tunelab.generate import Generator, RenderedPrompt
    from tunelab.models import resolve_source

    started = time.perf_counter()
    loaded_here = isinstance(spec, str)
    contender = parse_contender(spec) if loaded_here else Contender(label or "model", "", 0)
    gen = Generator.load(contender.model, device=settings.device) if loaded_here else spec
    template = _template_for(gen.template, shared_template, settings, examples, contender.shots)
    previous = gen.template
    gen.template = template  # the template decides whether a BOS prefix is added
    try:
        shots = (
            pick_shots(train_pool or [], contender.shots, settings.seed, examples) if contender.shots else []
        )
        segs = [segments(ex, template, gen.tokenizer, shots) for ex in examples]
        # Each prompt keeps its segments, so generation tokenises them as training tokenises them.
        rendered = [RenderedPrompt([s.text for s in seg[:-1]]) for seg in segs]
        prompts = [str(p) for p in rendered]
        stop = shot_stops(template) if shots else None
        generations = _generate(gen, rendered, settings, stop, label or contender.spec)
        rules = error_rules.ErrorRules(format_regex=settings.format_regex)
        predictions = _predictions(
            examples, generations, prompts, metrics, rules, label or label_for(contender.spec)
        )
        loss = None
        if settings.with_loss:
            chat = template is not None and template.name == "chat"
            cut = (None, "left") if shots else (settings.max_length, settings.truncation_side)
            loss = held_out_loss(gen.model, gen.tokenizer, segs, chat, settings.micro_batch_tokens, *cut)
    finally:
        gen.template = previous
    run_dir = None
    if loaded_here:
        src = resolve_source(contender.model)
        run_dir = str(src.run_dir) if src.run_dir else None
        del gen  # one model in memory at a time
        gc.collect()
        _empty_cuda_cache()
    return ModelResult(
        label=label or label_for(contender.spec),
        spec=contender.spec,
        template=template.name if template else None,
        loss=loss,
        predictions=predictions,
        run_dir=run_dir,
        seconds=time.perf_counter() - started,
    )


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _progress(enabled: bool, name: str, total: int) -> Iterator[Callable[[int], None]]:
    """Each contender's generation: a bar on a terminal; piped or logged, a line every 10 s with the
    count and an ETA, and the count and time at the end (tunelab.progress); nothing when quiet."""
    from tunelab import progress

    with progress.shown(enabled), progress.track(f"generate {name}", total) as advance:
        yield advance
