"""report.md and a self-contained report.html (plots inlined as base64 PNG) from a comparison.

Both are written from one list of blocks, so they always say the same thing. Plots use matplotlib's
object API on the Agg canvas: no pyplot state, no GUI backend, safe inside a notebook or a server.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from tunelab.evaluate.compare import CompareResult
from tunelab.evaluate.errors import CATEGORIES, DESCRIPTIONS
from tunelab.evaluate.seen import describe
from tunelab.evaluate.tables import (
    Table,
    error_table,
    example_table,
    group_table,
    metric_table,
    unseen_table,
)

Block = tuple[str, Any]  # ("h1" | "h2" | "p" | "table" | "img" | "pre", content)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _figure(width: float = 7.0, height: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_loss(runs: dict[str, list[dict[str, Any]]], out: Path, log: bool = False) -> Path | None:
    """Train and eval loss against step, one colour per run (`log`: a log-scale loss axis)."""
    if not any(runs.values()):
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for k, (label, records) in enumerate(runs.items()):
        color = f"C{k}"
        train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
        evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
        if train:
            ax.plot(*zip(*train), color=color, label=f"{label} train")
        if evals:
            ax.plot(
                *zip(*evals), color=color, linestyle="--", marker="o", markersize=3, label=f"{label} eval"
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per trained token")
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def _bars(groups: list[str], series: dict[str, list[float]], ylabel: str, out: Path) -> Path:
    fig = _figure(max(6.0, 1.2 * len(groups) + 2), 4.0)
    ax = fig.add_subplot()
    width = 0.8 / max(len(series), 1)
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [0 if math.isnan(v) else v for v in values], width, label=label, color=f"C{k}")
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    return out


def plot_metrics(result: CompareResult, out: Path) -> Path:
    # Metrics on a 0-1 scale share the axis; a 1-5 judge score would flatten them, so it is left out.
    metrics = [m for m in result.metrics if m != "judge"]
    series = {x: [result.mean(x, m) for m in metrics] for x in result.labels}
    return _bars(metrics, series, "mean over examples", out)


def plot_errors(result: CompareResult, out: Path) -> Path:
    series = {x: [float(result.errors[x].counts.get(c, 0)) for c in CATEGORIES] for x in result.labels}
    return _bars(list(CATEGORIES), series, "generations", out)


# Under this many test examples a bootstrap interval says little: it is made of the few paired
# differences there are (all alike: zero width), not of what another sample would give.
FEW_EXAMPLES = 30


def _few_examples(n: int) -> str:
    if n >= FEW_EXAMPLES:
        return ""
    return (
        f" **With {n} examples the intervals are rough**: a bootstrap over so few resamples only the "
        "differences seen (where every example moved the same way, the interval has no width at all); "
        f"test on {FEW_EXAMPLES} or more before trusting a difference."
    )


def _blocks(result: CompareResult, plots: dict[str, Path], bench: dict[str, Any] | None) -> list[Block]:
    labels = result.labels
    blocks: list[Block] = [
        ("h1", "Evaluation: " + " vs ".join(labels)),
        (
            "p",
            f"{len(result.examples)} test examples. Deltas are against {labels[0]}, with 95% confidence "
            f"intervals from a paired bootstrap ({result.settings.get('bootstrap', 1000)} resamples of "
            "the examples); an interval that excludes 0 is a difference the data supports."
            + _few_examples(len(result.examples)),
        ),
    ]
    if "loss" in plots:
        blocks += [("h2", "Training curves"), ("img", plots["loss"])]
    blocks += [("h2", "Metrics"), ("table", metric_table(result))]
    if result.judge_error:
        blocks.append(("p", f"**The judge failed**, so there are no judge figures: {result.judge_error}"))
    if "metrics" in plots:
        blocks.append(("img", plots["metrics"]))
    blocks += _seen_blocks(result)
    if result.groups:
        blocks += [("h2", f"By {result.group_by}"), ("table", group_table(result))]
    if bench:
        blocks += [("h2", "Benchmarks (lm-evaluation-harness)"), ("table", bench_table(bench))]
    blocks += [("h2", "Error analysis"), ("table", error_table(result))]
    if "errors" in plots:
        blocks.append(("img", plots["errors"]))
    for label in labels:
        summary = result.errors[label]
        for cat in CATEGORIES:
            shown = summary.examples.get(cat)
            if not shown:
                continue
            blocks.append(("p", f"{label}: {cat} ({summary.counts[cat]}): {DESCRIPTIONS[cat]}"))
            header = ["#", "question", "prediction", "reference"]
            rows = [[str(e.index), e.question, e.prediction, e.reference] for e in shown]
            blocks.append(("table", (header, rows)))
    blocks += [("h2", "Side by side: where they differ most"), ("table", example_table(result, 10))]
    if result.judge:
        j = result.judge
        blocks.append(
            (
                "p",
                f"Judge: {j['model']} at {j['url']} ({j['mode']}); {j['requests']} requests, {j['cache_hits']} from cache.",
            )
        )
    return blocks


def _seen_blocks(result: CompareResult) -> list[Block]:
    """Test rows each run trained on: a line per run that saw some or could not be checked, and the
    means on the rows it did not see."""
    if not result.seen:
        return []
    found = [line for line in (describe(label, c) for label, c in result.seen.items()) if line]
    dropped = result.settings.get("dropped_seen", 0)
    left_out = f"{dropped} test rows a run here trained on were left out (--drop-seen). " if dropped else ""
    if not found:
        n, runs = len(result.examples), ", ".join(result.seen)
        return [
            (
                "p",
                f"Seen in training: {left_out}None of the {n} test questions is among those {runs} trained on.",
            )
        ]
    blocks: list[Block] = [("h2", "Seen in training"), *[("p", line) for line in found]]
    if left_out:
        blocks.insert(1, ("p", left_out.strip()))
    table = unseen_table(result)
    if table is not None:
        blocks.append(("table", table))
    return blocks


def bench_table(bench: dict[str, dict[str, dict[str, float]]]) -> Table:
    """{model: {task: {metric: value}}} -> a row per task and metric."""
    labels = list(bench)
    keys = sorted({(t, m) for per in bench.values() for t, ms in per.items() for m in ms})
    rows = [[t, m, *[_fmt(bench[x].get(t, {}).get(m)) for x in labels]] for t, m in keys]
    return ["task", "metric", *labels], rows


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))


def _md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|") or " "


def to_markdown(blocks: list[Block], root: Path) -> str:
    out = []
    for kind, content in blocks:
        if kind in ("h1", "h2"):
            out.append(f"{'#' if kind == 'h1' else '##'} {content}\n")
        elif kind == "p":
            out.append(f"{content}\n")
        elif kind == "pre":
            out.append(f"```\n{content}\n```\n")
        elif kind == "img":
            rel = Path(content).relative_to(root).as_posix()
            out.append(f"![{Path(content).stem}]({rel})\n")
        elif kind == "table":
            header, rows = content
            lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
            out.append("\n".join(lines) + "\n")
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:left;vertical-align:top;white-space:pre-wrap}th{background:#f3f3f3}img{max-width:100%}"""


def to_html(blocks: list[Block]) -> str:
    e = html.escape
    out = []
    for kind, content in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{e(content)}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{e(content)}</p>")
        elif kind == "pre":
            out.append(f"<pre>{e(content)}</pre>")
        elif kind == "img":
            data = base64.b64encode(Path(content).read_bytes()).decode()
            out.append(f'<img alt="{e(Path(content).stem)}" src="data:image/png;base64,{data}">')
        elif kind == "table":
            header, rows = content
            head = "".join(f"<th>{e(h)}</th>" for h in header)
            body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    title = e(blocks[0][1]) if blocks else "tunelab report"
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"
    )


def write_report(
    result: CompareResult, out_dir: str | Path, bench: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    """report.md + report.html in `out_dir`, PNGs in `out_dir/plots`. Returns the two report paths."""
    out = Path(out_dir)
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}
    runs = {m.label: read_metrics(m.run_dir) for m in result.models if m.run_dir}
    loss = plot_loss(runs, plot_dir / "loss.png")
    if loss is not None:
        plots["loss"] = loss
    plots["metrics"] = plot_metrics(result, plot_dir / "eval-metrics.png")
    plots["errors"] = plot_errors(result, plot_dir / "eval-errors.png")
    blocks = _blocks(result, plots, bench)
    md, page = out / "report.md", out / "report.html"
    md.write_text(to_markdown(blocks, out), encoding="utf-8")
    page.write_text(to_html(blocks), encoding="utf-8")
    return md, page
