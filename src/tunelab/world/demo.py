"""`tunelab demo`: the seed's story, measured, offline, in minutes on a laptop CPU.

The shipped base model read encyclopedia prose and homework sheets about 180 countries. Asked a
question it continues with more homework questions. Finetuning on ~1,000 Q/A pairs about *some*
countries changes that behaviour, and the knowledge it unlocks shows on the *other* countries, whose
facts the model saw only as prose. A second finetune on bare answers ("Mexico City") next to sentence
answers ("The capital of Mexico is Mexico City.") shows that the data's format decides what is learned.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.world.build import resolve_world_path
from tunelab.world.qa import REDIRECT

MAX_NEW_TOKENS = 32
MODELS = ("base", "sentence", "bare")
TITLES = {"base": "base model", "sentence": "finetuned: sentence answers", "bare": "finetuned: bare answers"}
# Rows of the "exact match" table that measure something else say so.
LABELS = {
    "fact_mentioned": "fact mentioned anywhere in the answer (not exact match)",
    "offtopic_redirected": "off-topic questions answered with the redirect",
    "geography_redirected": "geography questions wrongly redirected",
}


def _label(key: str) -> str:
    return LABELS.get(key, key.replace("_", " "))


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().rstrip(".").strip()).lower()


def score(prediction: str, row: dict[str, Any]) -> dict[str, bool]:
    """Exact match against the sentence or the bare answer (either format counts as right), whether
    the fact appears at all, and whether the model redirected."""
    pred = normalise(prediction)
    exact = pred in (normalise(row["answer"]), normalise(row["bare"]))
    bare = normalise(row["bare"])
    contains = (
        bool(re.search(rf"(^|\W){re.escape(bare)}($|\W)", pred)) if row["relation"] != "offtopic" else exact
    )
    return {"exact": exact, "contains": contains, "redirect": pred == normalise(REDIRECT)}


@dataclass
class DemoResult:
    out: Path
    summary: dict[str, dict[str, float]]  # model -> metric -> value
    seconds: float


def _rate(rows: list[dict[str, Any]], model: str, metric: str, **where: str) -> float:
    chosen = [r for r in rows if all(r[k] == v for k, v in where.items())]
    return sum(r[model][metric] for r in chosen) / max(len(chosen), 1)


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for m in MODELS:
        geo = [r for r in rows if r["relation"] != "offtopic"]
        s = {
            rel: _rate(rows, m, "exact", relation=rel)
            for rel in ("capital", "continent", "currency", "language")
        }
        for rel in ("capital", "continent", "currency", "language"):
            s[f"{rel}_unseen_wording"] = _rate(rows, m, "exact", relation=rel, wording="unseen")
        s["all_relations"] = _rate(geo, m, "exact")
        s["unseen_wording"] = _rate(geo, m, "exact", wording="unseen")
        s["fact_mentioned"] = _rate(geo, m, "contains")
        s["offtopic_redirected"] = _rate(rows, m, "redirect", relation="offtopic")
        s["geography_redirected"] = _rate(geo, m, "redirect")
        out[m] = s
    return out


def _finetune(name: str, data: str, out: Path, quick: bool, quiet: bool) -> Path:
    from tunelab.config import DEFAULT_MODEL, packaged_config
    from tunelab.runner import run

    # Eager always: compile "auto" times a step, so machine load would decide the numerics and the table.
    overrides = [f"--out={out}", f"--name={name}", f"--data.path={data}", "--train.compile=false"]
    if quick:
        overrides += ["--train.max_steps=3", "--train.eval_every=0"]
    cfg = load_config(packaged_config("world-qa.yaml"), overrides)
    assert cfg.model.name_or_path == DEFAULT_MODEL
    return run(cfg, quiet=quiet, overwrite=True).run_dir


def _sample(rows: list[dict[str, Any]], per_relation: int) -> list[dict[str, Any]]:
    """A few rows of every relation (both wordings, spread over countries) and of the off-topic ones."""
    picks = []
    for rel in ("capital", "continent", "currency", "language", "offtopic"):
        group = [r for r in rows if r["relation"] == rel]
        stride = max(1, len(group) // per_relation)
        picks += [group[(i * stride + i) % len(group)] for i in range(per_relation)] if group else []
    return picks


def _side_by_side(rows: list[dict[str, Any]], per_relation: int) -> Table:
    table = Table(title="held-out questions (countries never seen in finetuning)", show_lines=True)
    table.add_column("question", max_width=34)
    for m in MODELS:
        table.add_column(TITLES[m], max_width=38)
    for r in _sample(rows, per_relation):
        cells = [f"{'[green]' if r[m]['exact'] else '[red]'}{_escape(r[m]['prediction'])}" for m in MODELS]
        table.add_row(_escape(r["question"]), *cells)
    return table


def _escape(text: str) -> str:
    return text.replace("[", "\\[").replace("\n", " ⏎ ") or "(empty)"


def _summary_table(summary: dict[str, dict[str, float]]) -> Table:
    table = Table(title="exact match on held-out countries")
    table.add_column("")
    for m in MODELS:
        table.add_column(TITLES[m], justify="right")
    for key in summary["base"]:
        table.add_row(_label(key), *(f"{100 * summary[m][key]:.1f}%" for m in MODELS))
    return table


def run_demo(
    out: Path | None = None, overwrite: bool = False, quick: bool = False, quiet: bool = False
) -> DemoResult:
    from tunelab.evaluate.report import plot_loss, read_metrics
    from tunelab.generate import Generator
    from tunelab.models import world_base_path

    start = time.perf_counter()
    console = Console(quiet=quiet)
    out = out or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise TunelabError(
                f"{out} already exists", "pass --overwrite to replace it, or choose another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    world_base_path()  # checksum check first: a broken install says so before any work

    console.rule("[bold]1. finetune the base model on ~1,000 Q/A pairs (sentence answers)")
    runs = {
        "sentence": _finetune(
            "world-qa-sentence", "world:qa-train.jsonl", out / "finetune-sentence", quick, quiet
        )
    }
    console.rule("[bold]2. the same questions with bare answers, to compare formats")
    runs["bare"] = _finetune(
        "world-qa-bare", "world:qa-train-bare.jsonl", out / "finetune-bare", quick, quiet
    )

    console.rule("[bold]3. ask all three models the held-out questions")
    heldout_path = Path(resolve_world_path("world:heldout.jsonl"))
    rows = [json.loads(line) for line in heldout_path.read_text().splitlines() if line.strip()]
    if quick:  # a slice with every relation and some off-topic questions: checks plumbing, fast
        rows = rows[:48] + [r for r in rows if r["relation"] == "offtopic"][:8]
    for r in rows:  # the bare model's output goes under "bare": keep the reference under its own name
        r["bare_answer"] = r["bare"]
    generators = {k: Generator.load(str(v), device="cpu") for k, v in runs.items()}
    # The base model is asked with the very prompt template the finetuned ones were trained with.
    base = Generator.load("world", device="cpu")
    generators["base"] = Generator(base.model, base.tokenizer, generators["sentence"].template)
    for m in MODELS:
        gen = generators[m]
        with console.status(f"generating with the {TITLES[m]}"):
            preds = gen.generate([r["question"] for r in rows], max_new_tokens=MAX_NEW_TOKENS, batch_size=64)
        for r, p in zip(rows, preds):
            r[m] = {"prediction": p, **score(p, {**r, "bare": r["bare_answer"]})}

    summary = summarise(rows)
    seconds = time.perf_counter() - start
    console.print(_side_by_side(rows, 2))
    console.print(_summary_table(summary))
    with (out / "results.jsonl").open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (out / "summary.json").write_text(json.dumps({"exact_match": summary, "seconds": seconds}, indent=2))
    plot_loss({TITLES[k]: read_metrics(v) for k, v in runs.items()}, out / "plots" / "loss.png", log=True)
    (out / "report.md").write_text(_report(rows, summary, runs, seconds))
    console.print(f"report: {out / 'report.md'}   ({seconds:.0f} s)")
    return DemoResult(out, summary, seconds)


def _report(
    rows: list[dict[str, Any]], summary: dict[str, dict[str, float]], runs: dict[str, Path], seconds: float
) -> str:
    n_geo = sum(r["relation"] != "offtopic" for r in rows)
    n_off = len(rows) - n_geo
    lines = [
        "# tunelab demo: finetuning unlocks what the base model knows",
        "",
        f"Held-out: {n_geo} geography questions about countries never seen in finetuning (half in wordings "
        f"never used in finetuning), and {n_off} off-topic questions. Greedy decoding, at most "
        f"{MAX_NEW_TOKENS} new tokens. Exact match accepts the sentence or the bare answer. Total time {seconds:.0f} s.",
        "",
        "| exact match | " + " | ".join(TITLES[m] for m in MODELS) + " |",
        "|---|" + "---:|" * len(MODELS),
    ]
    for key in summary["base"]:
        lines.append(
            f"| {_label(key)} | " + " | ".join(f"{100 * summary[m][key]:.1f}%" for m in MODELS) + " |"
        )
    lines += ["", "![loss curves](plots/loss.png)", "", "## Side by side", "",
              "| question | " + " | ".join(TITLES[m] for m in MODELS) + " |", "|---|---|---|---|"]  # fmt: skip
    for r in _sample(rows, 3):
        cells = [r[m]["prediction"].replace("\n", " ⏎ ").replace("|", "\\|") or "(empty)" for m in MODELS]
        lines.append(f"| {r['question']} | " + " | ".join(cells) + " |")
    lines += ["", "Runs: " + ", ".join(f"`{p}`" for p in runs.values()), ""]
    return "\n".join(lines)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="the whole story offline: finetune the shipped base, compare on held-out questions"
    )
    p.add_argument("--out", type=Path, help="demo directory (default runs/demo-<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo directory")
    p.add_argument(
        "--quick", action="store_true", help="3 training steps each: checks the plumbing, not the result"
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=lambda a: run_demo(a.out, a.overwrite, a.quick, a.quiet) and 0)
