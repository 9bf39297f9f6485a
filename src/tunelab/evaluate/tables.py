"""A comparison as tables of text: the same rows feed the terminal (rich) and the reports (md, html)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from tunelab.evaluate.errors import CATEGORIES

if TYPE_CHECKING:
    from tunelab.evaluate.compare import CompareResult

Table = tuple[list[str], list[list[str]]]  # header, rows

GROUP_METRICS = ("exact_match_norm", "rouge_l")


def _num(v: float | None, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _signed(v: float, digits: int = 3) -> str:
    return "-" if math.isnan(v) else f"{v:+.{digits}f}"


def metric_table(result: CompareResult) -> Table:
    """Rows of metrics, a column per model; later models show their delta against the first with the
    95% paired-bootstrap interval. An interval that excludes 0 is a difference the data supports.
    Where some rows have no score (a judge's reply without one, a --metric that failed on them), a
    mean says over how many rows, and a delta over how many both models scored: then the means
    are over different rows, and only the delta compares like with like."""
    labels = result.labels
    header = ["metric", *labels]
    rows = []
    base = result.models[0]
    for name, attr in (("held-out loss", "loss"), ("perplexity", "perplexity")):
        if base.loss is None:
            continue
        row = [name]
        for m in result.models:
            v = getattr(m, attr)
            cell = _num(v)
            if m is not base and v is not None and getattr(base, attr) is not None:
                cell += f" ({_signed(v - getattr(base, attr))})"
            row.append(cell)
        rows.append(row)
    deltas = {(d.model, d.metric): d for d in result.deltas}
    for metric in result.metrics:
        row = [metric]
        for m in result.models:
            cell = _num(result.mean(m.label, metric))
            scored = sum(not math.isnan(v) for v in m.scores(metric))
            if scored < len(m.predictions):
                cell += f" on {scored}/{len(m.predictions)}"
            d = deltas.get((m.label, metric))
            if d is not None:
                paired = d.wins + d.ties + d.losses
                over = f", {paired} paired" if paired < len(m.predictions) else ""
                cell += f" ({_signed(d.delta)} [{_signed(d.low)}, {_signed(d.high)}]{over})"
            row.append(cell)
        rows.append(row)
    if result.corpus_bleu:
        rows.append(["corpus BLEU (0-100)", *[_num(result.corpus_bleu.get(x), 1) for x in labels]])
    for p in result.pairwise:
        row = [f"judge prefers over {p.baseline}"]
        for label in labels:
            row.append(
                f"{_num(p.delta, 2)} [{_num(p.low, 2)}, {_num(p.high, 2)}] {p.wins}W/{p.ties}T/{p.losses}L"
                if label == p.model
                else ""
            )
        rows.append(row)
    return header, rows


def unseen_table(result: CompareResult) -> Table | None:
    """Each metric's mean on the rows the model's run did not train on, for the models whose run
    trained on some test rows; later models' deltas against the first on the rows neither trained
    on. None where no model saw any."""
    shown = [m for m in result.models if result.unseen(m.label) is not None]
    if not shown:
        return None
    deltas = {(d.model, d.metric): d for d in result.unseen_deltas}
    with_delta = {d.model for d in result.unseen_deltas}
    labels = [m.label for m in result.models if m in shown or m.label in with_delta]
    header = ["metric (unseen rows)"]
    for label in labels:
        keep = result.unseen(label)
        header.append(f"{label} ({len(keep)} rows)" if keep is not None else label)
    rows = []
    for metric in result.metrics:
        row = [metric]
        for label in labels:
            cell = _num(result.unseen_mean(label, metric)) if result.unseen(label) is not None else ""
            d = deltas.get((label, metric))
            if d is not None:
                paired = d.wins + d.ties + d.losses
                cell += f" ({_signed(d.delta)} [{_signed(d.low)}, {_signed(d.high)}], {paired} paired)"
            row.append(cell.strip())
        rows.append(row)
    return header, rows


def error_table(result: CompareResult) -> Table:
    header = ["error", *result.labels]
    rows = []
    for cat in (*CATEGORIES, "clean"):
        row = [cat]
        for label in result.labels:
            s = result.errors[label]
            n = s.clean if cat == "clean" else s.counts.get(cat, 0)
            row.append(f"{n} ({100 * n / max(s.total, 1):.0f}%)")
        rows.append(row)
    return header, rows


def example_table(result: CompareResult, n: int = 5) -> Table:
    """The examples the models disagree on most (or the first ones when they always agree)."""
    picked = result.disagreements[:n] or list(range(min(n, len(result.examples))))
    header = ["#", "question", "reference", *result.labels]
    rows = []
    for i in picked:
        ex = result.examples[i]
        cells = []
        for m in result.models:
            p = m.predictions[i]
            mark = "✓" if p.scores.get("exact_match_norm") == 1.0 else "✗"
            flags = f" [{', '.join(p.errors)}]" if p.errors else ""
            cells.append(f"{mark} {_short(p.text)}{flags}")
        rows.append([str(i), _short(ex.question), _short(ex.reference), *cells])
    return header, rows


def group_table(result: CompareResult) -> Table:
    header = [result.group_by or "group", "n", *[f"{x} ({' / '.join(GROUP_METRICS)})" for x in result.labels]]
    rows = []
    for value, per_model in result.groups.items():
        n = next(iter(per_model.values()))["n"]
        cells = [" / ".join(_num(per_model[x].get(k), 2) for k in GROUP_METRICS) for x in result.labels]
        rows.append([value, str(int(n)), *cells])
    return header, rows


def _short(text: str, width: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def rich_table(table: Table, title: str) -> Any:
    from rich.table import Table as RichTable

    header, rows = table
    t = RichTable(title=title, title_justify="left", show_lines=False)
    for h in header:
        t.add_column(h, overflow="fold")
    for r in rows:
        t.add_row(*r)
    return t


def print_result(result: CompareResult, console: Any = None, examples: int = 5) -> None:
    from rich.console import Console

    console = console or Console()
    n = len(result.examples)
    against = f" (delta vs {result.labels[0]} [95% CI])" if len(result.labels) > 1 else ""  # not vs itself
    console.print(rich_table(metric_table(result), f"metrics on {n} examples{against}"))
    if len(result.labels) > 1 and n < 30:  # report.FEW_EXAMPLES
        console.print(
            f"[yellow]with {n} examples the intervals are rough: test on 30 or more before trusting a difference[/]"
        )
    unseen = unseen_table(result)
    if unseen is not None:
        console.print(rich_table(unseen, "on the test rows its run did not train on"))
    if result.groups:
        console.print(rich_table(group_table(result), f"by {result.group_by}"))
    console.print(rich_table(error_table(result), "error analysis"))
    if examples:
        console.print(rich_table(example_table(result, examples), "where they differ most"))
