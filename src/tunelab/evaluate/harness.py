"""Benchmarks through EleutherAI's lm-evaluation-harness, base and finetuned side by side.

The model is loaded by tunelab (run directory, HF folder, hub id, 'world'; a LoRA run is merged) and
handed to lm-eval's `HFLM`, so a run is benchmarked exactly as it would be served. Hub tasks such as
`arc_easy` need their data set in the local HF cache; a YAML task over local JSONL (`--include-path`)
runs fully offline.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import math
from typing import Any

from tunelab.errors import TunelabError
from tunelab.evaluate.metrics import INSTALL_HINT


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise TunelabError(
            "benchmarks need EleutherAI's lm-evaluation-harness (lm-eval), which is not installed",
            INSTALL_HINT,
        )


def task_manager(include_path: str | None = None) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def check_tasks(tasks: list[str], manager: Any) -> None:
    known = set(manager.all_tasks)
    missing = [t for t in tasks if t not in known]
    if missing:
        import difflib

        close = sorted({c for t in missing for c in difflib.get_close_matches(t, known, n=3)})
        raise TunelabError(
            f"unknown lm-eval task(s): {', '.join(missing)}"
            + (f" (did you mean {', '.join(close)}?)" if close else ""),
            "list them with `lm-eval ls tasks`; a local YAML task needs --include-path DIR",
        )


def _lm(model_name: str, device: str, batch_size: int) -> Any:
    from lm_eval.models.huggingface import HFLM

    from tunelab.models import load_model

    model, tokenizer, _ = load_model(model_name, device=device)
    if hasattr(model, "merge_and_unload"):  # a PEFT adapter: lm-eval wants a plain causal LM
        model = model.merge_and_unload()
    model.eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))


def _numbers(task_results: dict[str, Any]) -> dict[str, float]:
    """lm-eval names metrics 'acc,none', 'acc_stderr,none'; keep the number, drop the filter suffix."""
    out = {}
    for key, value in task_results.items():
        if key in ("alias", "sample_len") or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        name, _, flt = key.partition(",")
        out[name if flt in ("", "none") else f"{name} ({flt})"] = float(value)
    return out


def run_benchmarks(
    models: list[str],
    tasks: list[str],
    include_path: str | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    seed: int = 0,
    labels: list[str] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """{label: {task: {metric: value}}} for every model, one model in memory at a time."""
    require_lm_eval()
    import lm_eval

    from tunelab.evaluate.predict import label_for

    # lm-eval logs every request-building step at INFO; tunelab prints its own summary. Its warning
    # that `pretrained` is a model object rather than a name is expected here.
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
    manager = task_manager(include_path)
    check_tasks(tasks, manager)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for k, name in enumerate(models):
        label = labels[k] if labels else label_for(name)
        lm = _lm(name, device, batch_size)
        try:
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=manager,
                limit=limit,
                num_fewshot=num_fewshot,
                log_samples=False,
                bootstrap_iters=1000,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except (OSError, ConnectionError, ValueError) as e:
            raise TunelabError(
                f"lm-eval could not run {', '.join(tasks)}: {type(e).__name__}: {str(e)[:300]}",
                "hub tasks need their data set in the local HF cache (offline mode is on when "
                "HF_HUB_OFFLINE=1); a YAML task over local files runs offline with --include-path DIR",
            ) from None
        per_task = {t: _numbers(r) for t, r in (out or {}).get("results", {}).items()}
        per_task = {t: {m: v for m, v in r.items() if not math.isnan(v)} for t, r in per_task.items()}
        results[label] = per_task
        del lm
        gc.collect()
    return results
