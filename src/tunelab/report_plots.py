"""Loss-curve plots from metrics.jsonl files (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curves(runs: dict[str, Path], out: Path) -> Path:
    """One figure: train loss (solid) and eval loss (dashed, markers) per run, by optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for i, (label, path) in enumerate(runs.items()):
        records = read_metrics(path)
        color = f"C{i}"
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        if train:
            ax.plot(*zip(*train), color=color, label=f"{label}: train")
        if evals:
            ax.plot(
                *zip(*evals), color=color, linestyle="--", marker="o", markersize=3, label=f"{label}: eval"
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per trained token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
