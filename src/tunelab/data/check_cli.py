"""`tunelab data check`: the pre-flight report in the terminal, as JSON and as Markdown.

Exit status: 0 = no blocking problem (warnings allowed), 1 = a blocking problem (a bad row under
--on-bad-row=error, every label masked, no EOS token, leakage over --max-leakage), 2 = the check could
not run (bad config, missing file or model), printed like every other tunelab error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import typing
from pathlib import Path
from typing import Any

from tunelab.config import DataConfig, RunConfig
from tunelab.data.check import analyse, settings_from_config
from tunelab.data.check_report import (
    DEFAULT_MAX_LEAKAGE,
    STAT_ROWS,
    Finding,
    Report,
    epoch_line,
    quantile_cell,
)
from tunelab.data.formats import Reject
from tunelab.errors import DataError, TunelabError


def register(sub: Any) -> None:
    data = sub.add_parser("data", help="inspect training data before training on it")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser(
        "check",
        help="pre-flight report: lengths, truncation, duplicates, leakage, epoch size",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "config",
        nargs="?",
        help="YAML config (a path or a shipped name like world-qa.yaml); any of its keys can also be "
        "set as --section.key=value, e.g. --data.fields.question=q",
    )
    p.add_argument("--data", help="data file or datasets folder (overrides the config's data.path)")
    p.add_argument("--eval-data", dest="eval_data", help="held-out file (default: split off eval_ratio)")
    p.add_argument("--model", help="model or tokenizer: hub id, folder, run directory, or 'world'")
    p.add_argument("--template", choices=typing.get_args(typing.get_type_hints(DataConfig)["template"]))
    p.add_argument("--max-length", dest="max_length", type=int, help="longest example in tokens")
    p.add_argument("--on-bad-row", dest="on_bad_row", choices=("error", "skip"))
    p.add_argument(
        "--max-leakage",
        dest="max_leakage",
        type=float,
        default=None,
        help="share of eval rows whose prompt may also be in train before it blocks "
        f"(default: the config's data.max_leakage, {DEFAULT_MAX_LEAKAGE}; 0 = any overlap blocks)",
    )
    p.add_argument(
        "--tokens-per-s",
        dest="tokens_per_s",
        type=float,
        help="measured training speed, for the time per epoch (default: from a run directory's "
        "metrics.jsonl when --model is one; otherwise the time is reported as unknown)",
    )
    p.add_argument("--out", default="data-check", help="folder for report.json, report.md, rejects.jsonl")
    p.set_defaults(func=handle_check)


def _config(args: argparse.Namespace) -> RunConfig:
    from tunelab.cli import packaged_config
    from tunelab.config import load_config

    if not args.config and not args.data:
        raise TunelabError("nothing to check", "give a CONFIG file or --data FILE")
    path = args.config
    if path and not Path(path).exists() and packaged_config(path).exists():
        path = packaged_config(path)
    values: dict[str, object] = {}
    for key, value in (
        ("data.path", args.data),
        ("data.eval_path", args.eval_data),
        ("model.name_or_path", args.model),
        ("data.template", args.template),
        ("data.max_length", args.max_length),
        ("data.on_bad_row", args.on_bad_row),
    ):
        if value is not None:
            values[key] = value
    return load_config(path, getattr(args, "overrides", []), values)


def measured_tokens_per_s(name_or_path: str) -> float | None:
    """The median training speed a run directory logged, if the model is one; never a guess."""
    path = Path(name_or_path) / "metrics.jsonl"
    if not path.is_file():
        return None
    speeds = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            value = json.loads(line).get("tokens_per_s")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(value, (int, float)) and value > 0:
            speeds.append(float(value))
    return statistics.median(speeds) if speeds else None


def run_check(
    cfg: RunConfig, max_leakage: float | None = None, tokens_per_s: float | None = None
) -> tuple[Report, list[Reject]]:
    """The report and the rejected rows for a config. A bad row under on_bad_row=error becomes a
    one-finding blocking report; other errors (config, model, missing file) raise."""
    from tunelab.data import templates
    from tunelab.data.dataset import load_records
    from tunelab.models import load_tokenizer, resolve_source
    from tunelab.runner import resolve_max_length

    cfg = resolve_max_length(cfg)
    tok_src = resolve_source(cfg.model.tokenizer or cfg.model.name_or_path)
    tokenizer = load_tokenizer(tok_src.adapter or tok_src.model, cfg.model.trust_remote_code)
    if tokens_per_s is None:
        tokens_per_s = measured_tokens_per_s(cfg.model.name_or_path)
    settings = settings_from_config(cfg, tokens_per_s)
    if max_leakage is not None:
        settings = dataclasses.replace(settings, max_leakage=max_leakage)
    d = cfg.data
    try:
        loaded = load_records(
            d.path, d.eval_path, d.eval_ratio, d.split_seed, d.format, d.schema, d.fields, d.on_bad_row
        )
        if cfg.task == "pretrain" and loaded.schema != "text":  # as train refuses them
            raise DataError(
                f"pretraining reads raw text, but the rows look like '{loaded.schema}'",
                source=d.path,
                hint="give rows with a 'text' field, or a .txt file",
            )
        template = templates.resolve(d.template, loaded.schema, d.prompt_format, d.completion_format)
        return analyse(loaded, template, tokenizer, settings), loaded.rejects
    except DataError as e:
        if e.line is None:
            raise
        return Report(findings=[Finding("blocking", "bad_row", e.message)]), []


def handle_check(args: argparse.Namespace) -> int:
    from tunelab import progress
    from tunelab.data.formats import write_rejects

    cfg = _config(args)
    with progress.shown():  # on stderr: the report on stdout stays as it is
        report, rejects = run_check(cfg, max_leakage=args.max_leakage, tokens_per_s=args.tokens_per_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(report.to_json(), encoding="utf-8")
    (out / "report.md").write_text(report.to_markdown(), encoding="utf-8")
    written = [out / "report.json", out / "report.md"]
    if rejects:
        write_rejects(rejects, out / "rejects.jsonl")
        written.append(out / "rejects.jsonl")
    print_report(report)
    print(f"wrote {', '.join(map(str, written))}")
    return 1 if report.blocking else 0


def print_report(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    if report.blocking:
        console.print(Text("data check: blocking problems found", style="bold red"))
    else:
        console.print(Text("data check: no blocking problems", style="bold green"))
    for f in report.findings:
        style = "red" if f.level == "blocking" else "yellow"
        console.print(Text(f"  {f.level}: ", style=style) + Text(f.message))
    if not report.splits:
        return
    console.print(f"schema {report.schema}, template {report.template}, {report.length_setting}")
    console.print("fields: " + ", ".join(f"{role} <- {col}" for role, col in report.fields.items()))
    files = Table("file", "train", "eval", "rejected")
    for name, c in report.files.items():
        files.add_row(name, str(c["train"]), str(c["eval"]), str(c["rejected"]))
    console.print(files)
    splits = Table("", *report.splits)
    for name in STAT_ROWS:
        splits.add_row(name, *(f"{getattr(s, name):,}" for s in report.splits.values()))
    for part in ("prompt", "completion", "total"):
        cells = [quantile_cell(getattr(s, f"{part}_tokens")) for s in report.splits.values()]
        splits.add_row(f"{part} tokens p50/p90/p99/max", *cells)
    console.print(splits)
    if report.tokenizer is not None:
        t = report.tokenizer
        console.print(f"tokenizer: EOS {t.eos_token!r}, pad {t.pad_token!r}: {t.note}")
    if report.epoch is not None:
        console.print(epoch_line(report.epoch))
    for ex in report.examples:
        # The prompt dim, the trained part highlighted: exactly the split the loss sees.
        console.print(Text(f"\n{ex.source}:{ex.line}" + (" (truncated)" if ex.truncated else ""), "bold"))
        body = Text()
        for text, trained in ex.segments:
            body.append(text, style="bold green" if trained else "dim")
        console.print(body)
