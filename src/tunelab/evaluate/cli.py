"""`tunelab eval`, `tunelab compare` and `tunelab bench`: parse, call the library, print, write."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

# The fewest --bootstrap resamples (compare.MIN_BOOTSTRAP, which says why; not imported: the parser is
# built on every tunelab command, and compare imports numpy and the models).
MIN_BOOTSTRAP = 200
# The judge options' defaults: the parser's, and what `_check_unused` takes as "not given".
JUDGE_DEFAULTS = {"judge_mode": "rubric", "judge_concurrency": 4, "judge_retries": 4}


def base_of(model: str) -> str | None:
    """The model a run (or adapter) started from; None for a plain model or a run trained from scratch."""
    from tunelab.models import resolve_source

    src = resolve_source(model)
    if src.run_dir is not None:
        from tunelab.config import load_config

        cfg = load_config(src.run_dir / "config.yaml")
        if cfg.model.init is not None:
            return None
        base = cfg.model.name_or_path
        local = base != "world" and not base.startswith("world:")
        if src.adapter is not None and local and not Path(base).expanduser().exists():
            # An older run's relative base path: the adapter keeps the path it was loaded from.
            base = resolve_source(str(src.adapter)).model or base
        return base
    return src.model if src.adapter else None


def _default_out(model: str, kind: str) -> Path:
    from tunelab.models import resolve_source

    src = resolve_source(model)
    if src.run_dir is not None:
        inner = Path(model).resolve() not in (src.run_dir.resolve(), (src.run_dir / "final").resolve())
        return src.run_dir / f"{kind}-{Path(model).name}" if inner else src.run_dir  # best/: beside final's
    from tunelab.evaluate.predict import label_for

    return Path("runs") / f"{kind}-{re.sub(r'[^A-Za-z0-9._-]+', '-', label_for(model)).strip('-')}"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", required=True, help="test file (any format `tunelab train` reads), e.g. world:heldout.jsonl"
    )
    p.add_argument("--limit", type=_at_least(1), help="only the first N test rows")
    p.add_argument(
        "--drop-seen",
        action="store_true",
        help="leave out test rows whose question a run evaluated here trained on (they are counted and "
        "flagged either way)",
    )
    p.add_argument("--out", help="where report.md/html, plots/ and eval/ go")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="sampling, few-shot choice and bootstrap")
    g.add_argument("--batch-size", type=_at_least(1), default=16)
    g.add_argument("--device", default="auto")
    g.add_argument(
        "--template", help="force a template (qa, alpaca, raw, chat, none) instead of each run's own"
    )
    m = p.add_argument_group("scoring")
    m.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="MODULE:FUNCTION",
        help="extra metric fn(prediction, reference) -> float; repeatable",
    )
    m.add_argument(
        "--format-regex", help="a prediction must fully match this, else it counts as wrong_format"
    )
    m.add_argument("--group-by", metavar="COLUMN", help="break metrics down by this column of the test rows")
    m.add_argument(
        "--bootstrap",
        type=_at_least(MIN_BOOTSTRAP),
        default=1000,
        help=f"paired bootstrap resamples for the intervals (at least {MIN_BOOTSTRAP})",
    )
    m.add_argument("--no-loss", action="store_true", help="skip held-out loss / perplexity")
    m.add_argument("--show", type=_at_least(0), default=5, help="side-by-side examples printed")
    j = p.add_argument_group("LLM-as-judge (any OpenAI-compatible endpoint; nothing is sent without --judge)")
    j.add_argument("--judge", metavar="URL", help="e.g. http://localhost:8000")
    j.add_argument("--judge-model", help="model name the endpoint serves")
    j.add_argument("--judge-mode", choices=("rubric", "pairwise"), default=JUDGE_DEFAULTS["judge_mode"])
    j.add_argument(
        "--judge-api-key-env",
        help="environment variable holding the endpoint's key (default: OPENAI_API_KEY, sent only to "
        "api.openai.com; other endpoints get a key only when this names its variable)",
    )
    j.add_argument("--judge-concurrency", type=int, default=JUDGE_DEFAULTS["judge_concurrency"])
    j.add_argument("--judge-retries", type=_at_least(0), default=JUDGE_DEFAULTS["judge_retries"])
    j.add_argument("--judge-cache", help="cache folder (default ~/.cache/tunelab/judge)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _at_least(least: int):
    """An argparse type: an int of at least `least` (argparse says so, with the flag's name)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="held-out loss, metrics and error analysis of a run (vs its base model)")
    e.add_argument("model", help="run directory, HF folder or hub id")
    e.add_argument("--base", help="the model to compare against (default: the run's own base model)")
    e.add_argument("--no-base", action="store_true", help="evaluate the model alone")
    _add_common(e)
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("compare", help="several models on the same questions, with deltas and intervals")
    c.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="first is the baseline; fewshot:K:MODEL prompts MODEL with K training examples",
    )
    c.add_argument("--train-data", help="training rows the fewshot:K:MODEL contenders show")
    _add_common(c)
    c.set_defaults(func=cmd_compare)

    b = sub.add_parser("bench", help="lm-evaluation-harness tasks on a run and its base, side by side")
    b.add_argument(
        "models", nargs="+", metavar="MODEL", help="run directory, HF folder or hub id (more to compare)"
    )
    b.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks, e.g. arc_easy,hellaswag")
    b.add_argument("--include-path", help="folder of YAML tasks (local data runs offline)")
    b.add_argument("--limit", type=float, help="examples per task (or a fraction < 1)")
    b.add_argument("--num-fewshot", type=int)
    b.add_argument("--batch-size", type=_at_least(1), default=8)
    b.add_argument("--device", default="auto")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-base", action="store_true", help="do not add the run's base model")
    b.add_argument("--out", help="where eval/bench.json goes (default: the run directory)")
    b.set_defaults(func=cmd_bench)


def _settings(args: argparse.Namespace):
    from tunelab.evaluate.predict import EvalSettings
    from tunelab.generate import check_decoding, note_unused_sampling

    check_decoding(args.max_new_tokens, args.temperature, args.top_p)  # before any model loads
    note_unused_sampling(args.temperature, args.top_p)  # (--seed also picks few-shot rows, bootstraps)
    return EvalSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        template=args.template,
        metrics=args.metric,
        format_regex=args.format_regex,
        with_loss=not args.no_loss,
        progress=not args.quiet,
    )


def _judge_key(url: str, env: str | None) -> str | None:
    """The judge's API key: from the variable `env` names (which must be set), else OPENAI_API_KEY
    for OpenAI's own endpoint only: a user's OpenAI key is not sent to any other server."""
    if env:
        key = os.environ.get(env)
        if not key:
            raise TunelabError(
                f"--judge-api-key-env {env}: no such environment variable is set", f"export {env}=... first"
            )
        return key
    from urllib.parse import urlparse

    host = urlparse(url if "://" in url else f"https://{url}").hostname or ""
    return os.environ.get("OPENAI_API_KEY") or None if host == "api.openai.com" else None


def _judge(args: argparse.Namespace):
    if not args.judge:
        return None
    if not args.judge_model:
        raise TunelabError("--judge needs --judge-model", "the name of the model the endpoint serves")
    from tunelab.evaluate.judge import JudgeConfig, default_cache_dir

    return JudgeConfig(
        url=args.judge,
        model=args.judge_model,
        mode=args.judge_mode,
        api_key=_judge_key(args.judge, args.judge_api_key_env),
        concurrency=args.judge_concurrency,
        retries=args.judge_retries,
        cache_dir=Path(args.judge_cache) if args.judge_cache else default_cache_dir(),
    )


def _check_regex(pattern: str | None) -> None:
    if pattern is None:
        return
    try:
        re.compile(pattern)
    except re.error as e:
        raise TunelabError(
            f"--format-regex {pattern!r} is not a valid regular expression: {e}",
            "fix the pattern (Python `re` syntax); quote it in the shell, e.g. --format-regex '^[A-D]$'",
        ) from None


def _data_options(args: argparse.Namespace, trained: Any) -> tuple[dict[str, str], bool, Any]:
    """Column names for the rows' roles: `--data.fields.ROLE=COLUMN` on the command line (`{}`: the
    rows' own names), else the `data.fields` the evaluated run trained with (`trained`, its config or
    None), and whether they are the run's; and what to do with a bad test row,
    `--data.on_bad_row=error|skip` (default error)."""
    from tunelab.config import parse_override

    given: dict[str, str] = {}
    mapped_here = False
    on_bad_row = "error"
    for arg in getattr(args, "overrides", []):
        keys, value = parse_override(arg)
        if keys == ["data", "on_bad_row"] and value in ("error", "skip"):
            on_bad_row = value
            continue
        if keys[:2] != ["data", "fields"] or (len(keys) == 2) != isinstance(value, dict):
            raise TunelabError(
                f"{arg}: eval and compare take only the test rows' column names and data.on_bad_row",
                "as --data.fields.question=q --data.fields.answer=a, or --data.on_bad_row=skip",
            )
        given.update({str(k): str(v) for k, v in value.items()} if len(keys) == 2 else {keys[2]: str(value)})
        mapped_here = True
    if mapped_here or trained is None or not trained.data.fields:
        return given, False, on_bad_row
    return dict(trained.data.fields), True, on_bad_row


def _read_examples(path: str, fields: dict[str, str], lent: bool, **kw: Any) -> Any:
    """The rows of `path`; where a mapping the run lent does not fit them, the error says so."""
    from tunelab.errors import DataError
    from tunelab.evaluate.predict import read_examples

    try:
        return read_examples(path, fields=fields, **kw)
    except DataError as e:
        if not lent or not e.reason.startswith(("data.fields", "cannot tell the schema")):
            raise
        mapping = ", ".join(f"{k}={v}" for k, v in fields.items())
        raise DataError(
            f"{e.reason} (the run's own data.fields, {mapping}, lent to the test rows)",
            source=e.source,
            hint="map this file's columns with --data.fields.ROLE=COLUMN, or --data.fields={} to read "
            "them by their own names",
        ) from None


def _trained_with(models: list[str]) -> Any:
    """The config of the last run among the models (its test rows likely share its columns, and
    its eval loss its truncation), or None. A run's final/ or best/ folder is read with its run."""
    from tunelab.config import load_config
    from tunelab.evaluate.predict import parse_contender
    from tunelab.models import resolve_source

    for model in reversed(models):
        try:
            run = resolve_source(parse_contender(model).model).run_dir  # fewshot:K:RUN too
            if run is not None:
                return load_config(run / "config.yaml")
        except (TunelabError, OSError, ValueError):  # one that cannot load: compare names it
            continue
    return None


def _run(models: list[str], args: argparse.Namespace, out: Path, train_data: str | None = None) -> int:
    from rich.console import Console

    from tunelab.evaluate.compare import compare
    from tunelab.evaluate.report import write_report

    _check_regex(args.format_regex)
    trained = _trained_with(models)
    fields, lent, on_bad_row = _data_options(args, trained)
    examples = _read_examples(args.data, fields, lent, limit=args.limit, on_bad_row=on_bad_row)
    pool = _read_examples(train_data, fields, lent, on_bad_row=on_bad_row) if train_data else None
    settings = _settings(args)
    if trained is not None and trained.task == "sft":  # every contender's loss cut as the run's was
        settings = dataclasses.replace(
            settings, max_length=trained.data.max_length, truncation_side=trained.data.truncation_side
        )
    partial = out / "eval" / "partial-predictions.jsonl"
    partial.unlink(missing_ok=True)  # an earlier failed run's: this run generates them again

    def keep(done: Any) -> None:  # each model's generations, written as soon as it is done
        partial.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.per_example()))
        tmp.replace(partial)

    try:
        result = compare(
            models,
            examples,
            settings,
            train_rows=pool,
            group_by=args.group_by,
            judge=_judge(args),
            bootstrap=args.bootstrap,
            on_model_done=keep,
            drop_seen=args.drop_seen,
        )
    except BaseException:  # a later model failing (memory, weights, Ctrl-C) loses no finished one
        if partial.exists():
            done = list(dict.fromkeys(json.loads(line)["model"] for line in partial.open(encoding="utf-8")))
            print(
                f"the generations and scores of the models done before it stopped ({', '.join(done)}) "
                f"are in {partial}",
                file=sys.stderr,
            )
        raise
    partial.unlink(missing_ok=True)
    result.print(Console(), examples=args.show)
    if (out / "eval" / "summary.json").exists():
        print(f"replacing the earlier report in {out} (--out DIR keeps both)", file=sys.stderr)
    preds, summary = result.write(out / "eval")
    md, page = write_report(result, out, _bench_of(out / "eval" / "bench.json", result.labels))
    print(f"wrote {preds}, {summary}, {md} and {page}")
    if result.judge_error:
        print(
            f"error: the judge failed, so the report has no judge figures: {result.judge_error}\n"
            "  hint: fix the judge and run again: the replies it gave are cached and not asked again",
            file=sys.stderr,
        )
        return 1
    return 0


def _bench_of(path: Path, labels: list[str]) -> dict[str, Any] | None:
    """`tunelab bench`'s results for the models of this report; those of other models are left out,
    said on stderr (a bench.json from an earlier comparison would show them as if measured here)."""
    if not path.exists():
        return None
    bench = json.loads(path.read_text())
    kept = {k: v for k, v in bench.items() if k in labels}
    if len(kept) < len(bench):
        other = ", ".join(k for k in bench if k not in labels)
        print(
            f"{path}: benchmark results of {other} left out of the report (not among its models)",
            file=sys.stderr,
        )
    return kept or None


def _check_unused(args: argparse.Namespace) -> None:
    """Options that would change nothing in this call are refused, not dropped without a word."""
    judging = {
        "--judge-model": args.judge_model is not None,
        "--judge-mode": args.judge_mode != JUDGE_DEFAULTS["judge_mode"],
        "--judge-api-key-env": args.judge_api_key_env is not None,
        "--judge-concurrency": args.judge_concurrency != JUDGE_DEFAULTS["judge_concurrency"],
        "--judge-retries": args.judge_retries != JUDGE_DEFAULTS["judge_retries"],
        "--judge-cache": args.judge_cache is not None,
    }
    unused = [flag for flag, given in judging.items() if given]
    if unused and not args.judge:
        raise TunelabError(
            f"{', '.join(unused)} without --judge: nothing is judged, so they would do nothing",
            "add --judge URL (an OpenAI-compatible endpoint), or leave them out",
        )
    if getattr(args, "base", None) and args.no_base:
        raise TunelabError(
            "--base and --no-base: --no-base evaluates the model alone, so --base would be ignored",
            "give one of them",
        )
    if getattr(args, "train_data", None):
        from tunelab.evaluate.predict import parse_contender

        if not any(parse_contender(m).shots for m in args.models):
            raise TunelabError(
                "--train-data feeds fewshot:K:MODEL contenders, and none is named: it would not be read",
                "add a contender such as fewshot:3:BASE, or leave --train-data out",
            )


def cmd_eval(args: argparse.Namespace) -> int:
    _check_unused(args)
    models = [args.model]
    if not args.no_base:
        base = args.base or base_of(args.model)
        if base is not None:
            models.insert(0, base)
    out = Path(args.out) if args.out else _default_out(args.model, "eval")
    return _run(models, args, out)


def cmd_compare(args: argparse.Namespace) -> int:
    _check_unused(args)
    out = Path(args.out) if args.out else _default_out(args.models[-1], "compare")
    return _run(args.models, args, out, args.train_data)


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tunelab.evaluate.harness import require_lm_eval, run_benchmarks
    from tunelab.evaluate.report import bench_table
    from tunelab.evaluate.tables import rich_table

    require_lm_eval()
    models = list(args.models)
    if not args.no_base and len(models) == 1:
        base = base_of(models[0])
        if base is not None:
            models.insert(0, base)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    results = run_benchmarks(
        models, tasks, args.include_path, limit, args.num_fewshot, args.batch_size, args.device, args.seed
    )
    Console().print(rich_table(bench_table(results), "lm-evaluation-harness"))
    out = (Path(args.out) if args.out else _default_out(args.models[-1], "bench")) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'bench.json'} (the next `tunelab eval` report includes it)")
    return 0
