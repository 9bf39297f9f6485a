"""Which test rows a run trained on: its training rows read back as training read them (its data
file(s), column mapping and train/eval split), keyed as `tunelab data check` keys leakage.

A test row whose question the run trained on measures recall, not generalisation; this says how many
there are, flags them, and gives the means on the others. It never refuses: overlap may be intended.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.check import normalise, prompt_key
from tunelab.data.schema import COMPLETION_ROLE
from tunelab.errors import TunelabError


@dataclass
class SeenCheck:
    """One run's check. `prompt[i]`: test row i asks a question the run trained on; `pair[i]`: with
    the same answer too. Both None where the check could not run (`note` says why)."""

    run_dir: str
    prompt: list[bool] | None = None
    pair: list[bool] | None = None
    trained_rows: int = 0
    note: str | None = None

    @property
    def n_prompt(self) -> int:
        return sum(self.prompt or [])

    @property
    def n_pair(self) -> int:
        return sum(self.pair or [])

    def subset(self, keep: list[int]) -> SeenCheck:
        if self.prompt is None or self.pair is None:
            return self
        return SeenCheck(
            self.run_dir, [self.prompt[i] for i in keep], [self.pair[i] for i in keep], self.trained_rows
        )

    def to_dict(self) -> dict[str, Any]:
        checked = self.prompt is not None
        return {
            "run": self.run_dir,
            "checked": checked,
            "rows": len(self.prompt) if checked else None,
            "seen_prompt": self.n_prompt if checked else None,
            "seen_prompt_and_reference": self.n_pair if checked else None,
            "trained_rows": self.trained_rows if checked else None,
            "note": self.note,
        }


def pair_key(values: dict[str, Any], schema: str) -> tuple[Any, ...] | None:
    """The question and its answer: a conversation whole, else the prompt key and the completion."""
    if schema == "messages":
        return tuple((m["role"], normalise(m["content"])) for m in values["messages"])
    prompt = prompt_key(values, schema)
    target = COMPLETION_ROLE.get(schema)
    return None if prompt is None or target is None else (prompt, normalise(values[target]))


def _locate(path: str, run_dir: Path, out: str) -> str:
    """A data path as training opened it: a relative one is relative to where training ran, which a
    run directory at `out` (relative, as given to training) tells; otherwise the current directory."""
    p = Path(path).expanduser()
    if p.is_absolute() or path.startswith("world:"):
        return path
    out_parts = Path(out).parts
    here = run_dir.resolve()
    if out_parts and not Path(out).is_absolute() and here.parts[-len(out_parts) :] == out_parts:
        candidate = here.parents[len(out_parts) - 1] / p
        if candidate.exists():
            return str(candidate)
    return path


def trained_rows(run_dir: Path) -> tuple[str, list[Any]]:
    """The schema and the records the run trained on: rows its own eval split took are left out."""
    from tunelab.config import load_config
    from tunelab.data.dataset import load_records

    cfg = load_config(run_dir / "config.yaml")
    d = cfg.data
    if cfg.task == "pretrain":
        raise TunelabError("it is a pretraining run (raw documents, no questions to match)")
    # With its own eval file, the whole data file was trained on (the eval file need not still exist).
    ratio = 0.0 if d.eval_path else d.eval_ratio
    loaded = load_records(
        _locate(d.path, run_dir, cfg.out),
        None,
        ratio,
        d.split_seed,
        d.format,
        d.schema,
        d.fields,
        d.on_bad_row,
    )
    return loaded.schema, loaded.train


def check_run(run_dir: str | Path, examples: list[Any]) -> SeenCheck:
    """Count the `examples` (evaluate.predict.Example) whose prompt, and prompt + reference, the run
    at `run_dir` trained on. A training file that is gone or unreadable gives a note, not an error."""
    run = Path(run_dir)
    try:
        schema, records = trained_rows(run)
    except (TunelabError, OSError, ValueError) as e:
        reason = e.message if isinstance(e, TunelabError) else str(e)
        return SeenCheck(str(run), note=" ".join(reason.split()))
    prompts = {prompt_key(r.values, schema) for r in records} - {None}
    pairs = {pair_key(r.values, schema) for r in records} - {None}
    prompt = [prompt_key(ex.record.values, ex.schema) in prompts for ex in examples]
    pair = [pair_key(ex.record.values, ex.schema) in pairs for ex in examples]
    return SeenCheck(str(run), prompt, pair, len(records))


def describe(label: str, check: SeenCheck, dropping: bool = False) -> str | None:
    """The stderr note (and report line) for one model's check; None where nothing was seen.
    `dropping`: the seen rows are about to be left out (--drop-seen)."""
    if check.prompt is None:
        return (
            f"{label}: could not check whether the test rows were in its training data ({check.note}); "
            "its scores may include rows it trained on"
        )
    n, total = check.n_prompt, len(check.prompt)
    if not n:
        return None
    return (
        f"{label}: {n} of {total} test rows ({100 * n / total:.1f} %) have a question the run trained on "
        f"({check.n_pair} with the same answer too); its scores on them measure recall, not "
        + (
            "generalisation: they are left out (--drop-seen)"
            if dropping
            else f"generalisation: its means on the {total - n} unseen rows are reported beside them, "
            "predictions.jsonl flags each row (seen_in_training), and --drop-seen leaves them out"
        )
    )
