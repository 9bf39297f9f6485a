"""Where training numbers go: metrics.jsonl always, a log line and a progress bar unless quiet,
and TensorBoard / MLflow / W&B only when asked (nothing leaves the machine by default)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsLogger:
    def __init__(
        self, run_dir: Path, total_steps: int, quiet: bool = False, report_to: list[str] | None = None
    ):
        self.path = run_dir / "metrics.jsonl"
        self.quiet = quiet
        self.console = Console(stderr=True, quiet=quiet)
        self.file = self.path.open("a", encoding="utf-8")
        self.progress: Progress | None = None
        self.task: Any = None
        self.total_steps = total_steps
        self.sinks = [_make_sink(name, run_dir) for name in (report_to or [])]
        if not quiet:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.task = self.progress.add_task("train", total=total_steps, info="")
            self.progress.start()

    def print(self, message: str) -> None:
        self.console.print(message, highlight=False)

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for sink in self.sinks:
            sink.log(record)
        if "loss" in record:
            line = (
                f"step {record['step']:>6}/{self.total_steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                f"{record['tokens_per_s']:,.0f} tok/s  elapsed {fmt_duration(record['elapsed_s'])}  "
                f"eta {fmt_duration(record['eta_s'])}"
            )
            if record.get("mfu") is not None:
                line += f"  mfu {100 * record['mfu']:.1f}%"
            if record.get("peak_mem_gib") is not None:
                line += f"  mem {record['peak_mem_gib']:.1f}GiB"
            self.print(line)
        if "eval_loss" in record:
            line = (
                f"step {record['step']:>6}  eval_loss {record['eval_loss']:.4f}  ppl {record['eval_ppl']:.2f}"
            )
            if record.get("eval_s") is not None:
                line += f"  ({record['eval_examples']:,} examples in {record['eval_s']:.1f} s)"
            self.print(line)

    def advance(self, step: int, info: str = "") -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.file.close()
        for sink in self.sinks:
            sink.close()


class SilentLogger:
    """What ranks other than 0 log to under several processes: nothing (rank 0 logs for the run)."""

    path = None

    def print(self, message: str) -> None:
        pass

    def log(self, record: dict[str, Any]) -> None:
        pass

    def advance(self, step: int, info: str = "") -> None:
        pass

    def close(self) -> None:
        pass


class _TensorBoard:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        for k, v in record.items():
            if k not in ("step", "time") and isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, run_dir: Path):
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=run_dir.name)

    def log(self, record: dict[str, Any]) -> None:
        nums = {k: v for k, v in record.items() if k not in ("step", "time") and isinstance(v, (int, float))}
        self.mlflow.log_metrics(nums, step=record["step"])

    def close(self) -> None:
        self.mlflow.end_run()


class _Wandb:
    def __init__(self, run_dir: Path):
        import wandb

        self.run = wandb.init(name=run_dir.name, dir=str(run_dir))

    def log(self, record: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in record.items() if k != "time"}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


_MODULES = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_trackers(names: list[str]) -> None:
    """Fail before any model is loaded when a requested tracker is not installed."""
    import importlib.util

    from tunelab.errors import ConfigError

    for name in names:
        top = "tensorboard" if name == "tensorboard" else _MODULES[name]
        if importlib.util.find_spec(top) is None:
            raise ConfigError(
                f"--report-to {name}: the package is not installed", f"pip install 'tunelab[{name}]'"
            )


def _make_sink(name: str, run_dir: Path) -> Any:
    makers = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb}
    try:
        return makers[name](run_dir)
    except ImportError:
        from tunelab.errors import ConfigError

        raise ConfigError(
            f"--report-to {name}: the package is not installed", f"pip install 'tunelab[{name}]'"
        ) from None
