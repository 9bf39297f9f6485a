"""The same questions through several models, side by side: metrics, deltas against the first model
with paired-bootstrap confidence intervals, errors, and the examples where the models disagree most.

    from tunelab.evaluate import compare
    result = compare(["world", "runs/qa"], rows)   # rows: [{"question": ..., "answer": ...}, ...]
    result.print()
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.data import templates
from tunelab.errors import TunelabError
from tunelab.evaluate import judge as judging
from tunelab.evaluate.errors import ErrorSummary, summarise
from tunelab.evaluate.metrics import check_user_metrics, corpus_bleu, resolve_metrics
from tunelab.evaluate.predict import (
    EvalSettings,
    Example,
    ModelResult,
    check_prompts_fit,
    evaluate_contender,
    examples_from_rows,
    label_for,
    own_template,
    parse_contender,
    pick_shots,
)
from tunelab.evaluate.seen import SeenCheck, check_run, describe
from tunelab.models import check_loadable

# The fewest bootstrap resamples a 95 % interval is drawn from: its ends are the 2.5th and 97.5th
# percentiles, so 200 resamples leave 5 in each tail; fewer, and an end is one or two draws (at 1, a
# "95 % interval" of a single resample). Statistics libraries default to 1000 or more (scipy's
# `bootstrap` 9999; Efron and Tibshirani ask 1000 or more for percentile intervals).
MIN_BOOTSTRAP = 200


def bootstrap_mean(
    values: list[float], resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Mean over examples and its percentile interval from resampling examples with replacement.
    NaN (no score) is left out."""
    d = np.asarray(values, dtype=float)
    d = d[~np.isnan(d)]
    if d.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.concatenate(
        [  # blocks of 100 resamples keep memory at 100 x n
            d[rng.integers(0, d.size, size=(min(100, resamples - start), d.size))].mean(axis=1)
            for start in range(0, resamples, 100)
        ]
    )
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(d.mean()), float(low), float(high)


def paired_bootstrap(
    a: list[float], b: list[float], resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Mean of b - a and its interval: both models are resampled on the same examples, and that
    pairing is what makes small differences detectable on a few hundred examples."""
    return bootstrap_mean(list(np.asarray(b, float) - np.asarray(a, float)), resamples, seed, confidence)


def _mean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmean(arr)) if (~np.isnan(arr)).any() else math.nan


@dataclass
class Delta:
    model: str
    baseline: str
    metric: str
    delta: float  # mean(model) - mean(baseline)
    low: float
    high: float
    wins: int  # examples where the model scored higher
    ties: int
    losses: int


@dataclass
class CompareResult:
    examples: list[Example]
    models: list[ModelResult]
    metrics: list[str]
    deltas: list[Delta] = field(default_factory=list)
    disagreements: list[int] = field(default_factory=list)  # example indices, most disagreement first
    errors: dict[str, ErrorSummary] = field(default_factory=dict)
    corpus_bleu: dict[str, float] = field(default_factory=dict)
    group_by: str | None = None
    groups: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # value -> model -> metric
    pairwise: list[Delta] = field(default_factory=list)  # judge preference of each model over the first
    judge: dict[str, Any] | None = None
    judge_error: str | None = None  # the judge failed mid-run: every other figure stands, without its
    settings: dict[str, Any] = field(default_factory=dict)
    seen: dict[str, SeenCheck] = field(default_factory=dict)  # label -> which test rows its run trained on
    unseen_deltas: list[Delta] = field(default_factory=list)  # deltas on the rows neither model trained on

    @property
    def labels(self) -> list[str]:
        return [m.label for m in self.models]

    def model(self, label: str) -> ModelResult:
        return next(m for m in self.models if m.label == label)

    def mean(self, label: str, metric: str) -> float:
        return _mean(self.model(label).scores(metric))

    def unseen(self, label: str) -> list[int] | None:
        """The rows whose question the model's run did not train on; None where nothing was seen (or
        the model is no run, or its check could not run)."""
        check = self.seen.get(label)
        if check is None or not check.n_prompt:
            return None
        return [i for i, s in enumerate(check.prompt or []) if not s]

    def unseen_mean(self, label: str, metric: str) -> float:
        keep = self.unseen(label)
        scores = self.model(label).scores(metric)
        return _mean(scores if keep is None else [scores[i] for i in keep])

    def summary(self) -> dict[str, Any]:
        models = {}
        for m in self.models:
            seen = self.seen.get(m.label)
            models[m.label] = {
                "spec": m.spec,
                "template": m.template,
                "loss": m.loss,
                "perplexity": m.perplexity,
                **{k: self.mean(m.label, k) for k in self.metrics},
                "corpus_bleu": self.corpus_bleu.get(m.label),
                "errors": self.errors[m.label].to_dict() if m.label in self.errors else None,
                "seconds": round(m.seconds, 2),
                "seen_in_training": None
                if seen is None
                else seen.to_dict()
                | (
                    {"unseen_means": {k: self.unseen_mean(m.label, k) for k in self.metrics}}
                    if self.unseen(m.label) is not None
                    else {}
                ),
            }
        return {
            "n_examples": len(self.examples),
            "metrics": self.metrics,
            "models": models,
            "deltas": [vars(d) for d in self.deltas],
            "unseen_deltas": [vars(d) for d in self.unseen_deltas],
            "pairwise": [vars(d) for d in self.pairwise],
            "group_by": self.group_by,
            "groups": self.groups,
            "disagreements": self.disagreements,
            "judge": self.judge,
            "judge_error": self.judge_error,
            "settings": self.settings,
        }

    def per_example(self) -> list[dict[str, Any]]:
        """One row per (example, model): long format, one `pandas.read_json(lines=True)` away."""
        out = []
        for i, ex in enumerate(self.examples):
            extra = {
                k: v
                for k, v in ex.row.items()
                if isinstance(v, (str, int, float, bool)) and k not in ("question", "answer")
            }
            for m in self.models:
                p = m.predictions[i]
                check = self.seen.get(m.label)
                seen = {}
                if check is not None and check.prompt is not None and check.pair is not None:
                    seen = {"seen_in_training": check.prompt[i], "seen_with_reference": check.pair[i]}
                out.append(
                    {
                        "index": i,
                        "model": m.label,
                        "question": ex.question,
                        "reference": ex.reference,
                        "prediction": p.text,
                        "finish_reason": p.finish_reason,
                        "prompt_tokens": p.prompt_tokens,
                        "completion_tokens": p.completion_tokens,
                        **{k: (None if math.isnan(v) else v) for k, v in p.scores.items()},
                        "errors": p.errors,
                        **seen,
                        **({"columns": extra} if extra else {}),
                    }
                )
        return out

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """predictions.jsonl (per example and model) and summary.json."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        preds, summary = out / "predictions.jsonl", out / "summary.json"
        with preds.open("w", encoding="utf-8") as f:
            for row in self.per_example():
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        summary.write_text(json.dumps(_finite(self.summary()), indent=2, ensure_ascii=False) + "\n")
        return preds, summary

    def print(self, console: Any = None, examples: int = 5) -> None:
        from tunelab.evaluate.tables import print_result

        print_result(self, console, examples)


def _finite(obj: Any) -> Any:
    """JSON has no NaN: write null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _unique_labels(labels: list[str]) -> list[str]:
    out: list[str] = []
    for label in labels:
        name, k = label, 2
        while name in out:
            name, k = f"{label} ({k})", k + 1
        out.append(name)
    return out


def _deltas(
    models: list[ModelResult],
    metrics: list[str],
    resamples: int,
    seed: int,
    keep: list[int] | None = None,
) -> list[Delta]:
    """Each later model against the first, on the rows `keep` (None: all of them)."""
    base = models[0]
    out = []
    for m in models[1:]:
        for metric in metrics:
            a_all, b_all = base.scores(metric), m.scores(metric)
            if keep is not None:
                a_all, b_all = [a_all[i] for i in keep], [b_all[i] for i in keep]
            a, b = np.asarray(a_all, dtype=float), np.asarray(b_all, dtype=float)
            delta, low, high = paired_bootstrap(a_all, b_all, resamples, seed)
            ok = ~np.isnan(a) & ~np.isnan(b)
            wins, losses = int((b[ok] > a[ok]).sum()), int((b[ok] < a[ok]).sum())
            out.append(
                Delta(
                    m.label, base.label, metric, delta, low, high, wins, int(ok.sum()) - wins - losses, losses
                )
            )
    return out


def _disagreements(models: list[ModelResult], top: int) -> list[int]:
    """Examples ranked by the spread of scores across models: exact match first, ROUGE-L to break ties."""
    if len(models) < 2:
        return []
    em = np.array([m.scores("exact_match_norm") for m in models])
    rouge = np.array([m.scores("rouge_l") for m in models])
    spread = np.nan_to_num(em.max(0) - em.min(0)) + np.nan_to_num(rouge.max(0) - rouge.min(0)) / 2
    texts_differ = [len({m.predictions[i].text for m in models}) > 1 for i in range(em.shape[1])]
    order = sorted(range(em.shape[1]), key=lambda i: (-spread[i], i))
    return [i for i in order if spread[i] > 0 or texts_differ[i]][:top]


def _group_name(row: dict[str, Any], column: str) -> str:
    """A row's group: its value, or `(no <column>)` / `(empty)` where it has none (not a blank
    label, nor 'None', merged with each other)."""
    if column not in row or row[column] is None:
        return f"(no {column})"
    value = str(row[column])
    return value if value.strip() else "(empty)"


def _groups(
    examples: list[Example], models: list[ModelResult], metrics: list[str], column: str
) -> dict[str, dict[str, dict[str, float]]]:
    values = [_group_name(ex.row, column) for ex in examples]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for value in sorted(set(values)):
        idx = [i for i, v in enumerate(values) if v == value]
        out[value] = {
            m.label: {"n": len(idx), **{k: _mean([m.scores(k)[i] for i in idx]) for k in metrics}}
            for m in models
        }
    return out


def _run_judge(result: CompareResult, cfg: judging.JudgeConfig, resamples: int, seed: int) -> None:
    questions = [ex.question for ex in result.examples]
    refs = [ex.reference for ex in result.examples]
    unscored, asked = 0, 0
    with judging.JudgeClient(cfg) as client:
        if cfg.mode == "rubric":
            for m in result.models:
                grades = judging.grade(client, questions, refs, [p.text for p in m.predictions])
                unscored, asked = unscored + grades.count(None), asked + len(grades)
                for p, g in zip(m.predictions, grades):
                    p.scores["judge"] = math.nan if g is None else float(g)
            result.metrics.append("judge")
        else:
            base = result.models[0]
            for m in result.models[1:]:
                pref = judging.prefer(
                    client,
                    questions,
                    refs,
                    [p.text for p in base.predictions],
                    [p.text for p in m.predictions],
                )
                unscored, asked = unscored + pref.count(None), asked + len(pref)
                prefs = [math.nan if v is None else v for v in pref]
                rate, low, high = bootstrap_mean(prefs, resamples, seed)
                ok = [v for v in prefs if not math.isnan(v)]
                wins, losses = sum(v > 0.5 for v in ok), sum(v < 0.5 for v in ok)
                ties = len(ok) - wins - losses
                result.pairwise.append(
                    Delta(m.label, base.label, "judge_preference", rate, low, high, wins, ties, losses)
                )
        result.judge = judging.judge_info(client)
    if unscored:
        # Left out of the judge's figures (a model all of whose replies lack one shows no figure).
        print(
            f"judge: {unscored} of {asked} replies held no {'score' if cfg.mode == 'rubric' else 'verdict'}; "
            "they are left out and not cached (a rerun asks again) — check --judge-model and its replies",
            file=sys.stderr,
        )


def _as_examples(rows: list[dict[str, Any]] | list[Example], source: str) -> list[Example]:
    if rows and all(isinstance(r, Example) for r in rows):
        return list(rows)  # type: ignore[arg-type]
    return examples_from_rows(list(rows), source)  # type: ignore[arg-type]


def _template_of(model: str | Any) -> Any:
    return own_template(parse_contender(model).model) if isinstance(model, str) else model.template


def _seen_in_training(
    models: list[str | Any], labels: list[str], examples: list[Example], dropping: bool = False
) -> dict[str, SeenCheck]:
    """For each contender that is a run (its final/ or best/, fewshot:K:RUN): which test rows its run
    trained on, each run read once; said on stderr before any model generates."""
    from tunelab.models import resolve_source

    by_run: dict[str, SeenCheck] = {}
    out: dict[str, SeenCheck] = {}
    for spec, label in zip(models, labels):
        if not isinstance(spec, str):
            continue
        run = resolve_source(parse_contender(spec).model).run_dir
        if run is None:
            continue
        key = str(run.resolve())
        if key not in by_run:
            by_run[key] = check_run(run, examples)
        out[label] = by_run[key]
        note = describe(label, out[label], dropping)
        if note:
            print(note, file=sys.stderr)
    return out


def _drop_seen(
    examples: list[Example], seen: dict[str, SeenCheck]
) -> tuple[list[Example], dict[str, SeenCheck]]:
    """The test rows no contender's run trained on (drop_seen)."""
    flags = [c.prompt for c in seen.values() if c.prompt is not None]
    keep = [i for i in range(len(examples)) if not any(f[i] for f in flags)]
    if not keep:
        raise TunelabError(
            f"every one of the {len(examples)} test rows has a question a run here trained on: "
            "with the seen rows dropped, nothing is left to evaluate",
            "evaluate on rows kept out of training, or leave out --drop-seen to measure recall",
        )
    if len(keep) < len(examples):
        print(
            f"left out {len(examples) - len(keep)} test rows a run here trained on (--drop-seen)",
            file=sys.stderr,
        )
    return [examples[i] for i in keep], {label: c.subset(keep) for label, c in seen.items()}


def compare(
    models: list[str | Any],
    rows: list[dict[str, Any]] | list[Example],
    settings: EvalSettings | None = None,
    train_rows: list[dict[str, Any]] | list[Example] | None = None,
    group_by: str | None = None,
    judge: judging.JudgeConfig | None = None,
    bootstrap: int = 1000,
    top: int = 10,
    labels: list[str] | None = None,
    on_model_done: Callable[[CompareResult], None] | None = None,
    drop_seen: bool = False,
) -> CompareResult:
    """Run every model over `rows` and compare them with the first.

    `models`: names (run dir, HF folder, hub id, 'world', `fewshot:K:MODEL`) or loaded `Generator`s.
    `rows`: dicts with `question`/`answer` (or any trainable schema) plus any other columns, which
    `group_by` can break the metrics down by. `train_rows` feed the few-shot contenders.
    `on_model_done`: called after each model with the models done so far (their predictions and
    scores; no deltas yet), e.g. to keep them should a later model fail.
    Each contender that is a run is checked for test rows it trained on (said on stderr, flagged per
    row, means on the other rows reported); `drop_seen` leaves those rows out before any generates.
    """
    settings = settings or EvalSettings()
    if bootstrap < MIN_BOOTSTRAP:
        raise TunelabError(
            f"bootstrap={bootstrap} resamples: a 95 % interval's ends would be one or two resamples",
            f"give at least {MIN_BOOTSTRAP} (1000, the default, is what statistics libraries recommend)",
        )
    if not models:
        raise TunelabError("nothing to evaluate", "give at least one model")
    examples = _as_examples(rows, "<rows>")
    pool = _as_examples(train_rows, "<train rows>") if train_rows else None
    if any(isinstance(s, str) and parse_contender(s).shots for s in models) and not pool:
        raise TunelabError(
            "a fewshot:K:MODEL contender needs training examples to show", "pass --train-data FILE"
        )
    if group_by and all(group_by not in ex.row for ex in examples):  # before any model is loaded
        raise TunelabError(
            f"no row has a '{group_by}' column to group by", f"columns: {', '.join(sorted(examples[0].row))}"
        )
    if settings.template is not None:
        templates.resolve(settings.template, examples[0].schema)  # a bad name fails before any model loads
    metric_fns = resolve_metrics(settings.metrics)  # a --metric that cannot load or run fails here
    check_user_metrics(metric_fns, examples[0].reference)
    for spec in models:  # every model named, and every few-shot pool, before the first one generates
        if isinstance(spec, str):
            contender = parse_contender(spec)
            check_loadable(contender.model)
            if contender.shots:
                pick_shots(pool or [], contender.shots, settings.seed, examples)
    names = labels or [label_for(s) if isinstance(s, str) else f"model {i + 1}" for i, s in enumerate(models)]
    names = _unique_labels(names)
    seen = _seen_in_training(models, names, examples, drop_seen)
    asked = len(examples)
    if drop_seen:
        examples, seen = _drop_seen(examples, seen)
    # A model without a template of its own (a base model) is asked in the first template found, so
    # base and finetuned see the very same prompt.
    shared = next((t for t in map(_template_of, models) if t is not None), None)
    tokenizers: dict[str, Any] = {}
    for spec, label in zip(models, names):  # every prompt fits every model, before the first generates
        check_prompts_fit(spec, examples, settings, shared, pool, label, tokenizers)
    tokenizers.clear()
    if judge is not None and judge.mode == "pairwise" and len(models) < 2:
        raise TunelabError("pairwise judging needs two models or more", "use --judge-mode rubric for one")
    if judge is not None:  # a judge that is down would waste every model's generations
        with judging.JudgeClient(judge) as client:
            client.check_reachable()
    metrics = [m.name for m in metric_fns]
    results: list[ModelResult] = []
    for spec, label in zip(models, names):
        results.append(evaluate_contender(spec, examples, settings, metric_fns, shared, pool, label))
        if on_model_done is not None:
            on_model_done(CompareResult(examples, list(results), list(metrics), seen=seen))
    result = CompareResult(examples, results, metrics, group_by=group_by)
    result.settings = {k: v for k, v in vars(settings).items() if k not in ("progress", "device")} | {
        "bootstrap": bootstrap,
        "drop_seen": drop_seen,
        "dropped_seen": asked - len(examples),
    }
    refs = [ex.reference for ex in examples]
    for m in results:
        texts = [p.text for p in m.predictions]
        result.errors[m.label] = summarise(
            [p.errors for p in m.predictions], [ex.question for ex in examples], texts, refs
        )
        result.corpus_bleu[m.label] = corpus_bleu(texts, refs)
    if judge is not None:
        try:
            _run_judge(result, judge, bootstrap, settings.seed)
        except TunelabError as e:  # the generations and the other metrics are kept, the failure said
            result.judge_error = f"{e.message}" + (f" ({e.hint})" if e.hint else "")
            result.metrics = [m for m in result.metrics if m != "judge"]
            result.pairwise = []
            for m in results:
                for p in m.predictions:
                    p.scores.pop("judge", None)
    result.deltas = _deltas(results, result.metrics, bootstrap, settings.seed)
    result.seen = seen
    for m in results[1:]:  # again on the rows neither model's run trained on, where either did
        if result.unseen(results[0].label) is None and result.unseen(m.label) is None:
            continue
        flags = [seen[x.label].prompt for x in (results[0], m) if result.unseen(x.label) is not None]
        keep = [i for i in range(len(examples)) if not any(f[i] for f in flags if f is not None)]
        result.unseen_deltas += _deltas([results[0], m], result.metrics, bootstrap, settings.seed, keep)
    result.disagreements = _disagreements(results, top)
    if group_by:
        result.groups = _groups(examples, results, result.metrics, group_by)
    return result
