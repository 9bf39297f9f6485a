"""The Python API, as short as the course's three lines:

    import tunelab
    run = tunelab.train(model="EleutherAI/pythia-70m", data="qa.jsonl", epochs=3, lr=1e-5)
    print(run.generate("What is the capital of Mexico?"))

It calls exactly what the CLI calls.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cached_property
from pathlib import Path
from typing import Any

from tunelab.config import RunConfig, check_task, load_config
from tunelab.errors import ConfigError, TunelabError

_SECTIONS = ("model", "data", "train", "lora")


def _dotted(key: str) -> str:
    """`lr` -> `train.lr` when exactly one section has that key; dotted keys pass through."""
    if "." in key or key in {f.name for f in dataclasses.fields(RunConfig)}:
        return key
    owners = [
        s for s in _SECTIONS if key in {f.name for f in dataclasses.fields(type(getattr(RunConfig(), s)))}
    ]
    if len(owners) == 1:
        return f"{owners[0]}.{key}"
    if not owners:
        raise ConfigError(f"unknown setting '{key}'", "see docs/configs.md for every key")
    raise ConfigError(
        f"'{key}' exists in several sections ({', '.join(owners)})", f"write e.g. '{owners[0]}.{key}'"
    )


class Run:
    """A finished (or running) run directory: its config, metrics and model."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run('{self.path}')"

    @property
    def config(self) -> RunConfig:
        return load_config(self.path / "config.yaml")

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            raise TunelabError(
                f"{self.path} has no metrics.jsonl (has its training started?)",
                "load a run directory that `tunelab train` wrote, or wait until its first step is logged",
            )
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    @cached_property
    def generator(self) -> Any:
        from tunelab.generate import Generator

        return Generator.load(str(self.path))

    def generate(self, prompt: str | list[str], **kwargs: Any) -> str | list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        out = self.generator.generate(prompts, **kwargs)
        return out[0] if isinstance(prompt, str) else out


def _run(task: str, config: str | Path | None, quiet: bool, overwrite: bool, values: dict[str, Any]) -> Run:
    from tunelab.runner import run

    check_task(config, task)
    cfg = load_config(config, values={"task": task, **{_dotted(k): v for k, v in values.items()}})
    return Run(run(cfg, quiet=quiet, overwrite=overwrite).run_dir)


def train(
    model: str | None = None,
    data: str | None = None,
    config: str | Path | None = None,
    quiet: bool = False,
    overwrite: bool = False,
    **settings: Any,
) -> Run:
    """Finetune `model` on `data`; any config key may be given by name (lr=1e-4) or dotted (train.lr=...)."""
    values = dict(settings)
    if model is not None:
        values["model.name_or_path"] = model
    if data is not None:
        values["data.path"] = data
    return _run("sft", config, quiet, overwrite, values)


def pretrain(
    data: str | None = None,
    model: str | None = None,
    config: str | Path | None = None,
    quiet: bool = False,
    overwrite: bool = False,
    **settings: Any,
) -> Run:
    """Next-token prediction on raw text, from `model`'s weights or from `init` (a new model config)."""
    values = dict(settings)
    if model is not None:
        values["model.name_or_path"] = model
    if data is not None:
        values["data.path"] = data
    return _run("pretrain", config, quiet, overwrite, values)


def load(path: str | Path) -> Run:
    """A run directory (what `tunelab train` printed as "run directory") as a `Run`."""
    if not (Path(path) / "config.yaml").is_file():
        what = "no such folder" if not Path(path).exists() else "not a tunelab run directory (no config.yaml)"
        raise TunelabError(f"{path}: {what}", 'pass the folder `tunelab train` printed as "run directory"')
    return Run(path)
