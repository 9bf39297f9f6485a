"""The shipped world base model: where it lies, and a checksum check so a missing or corrupt asset
says so clearly instead of failing deep inside transformers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tunelab.errors import ModelLoadError
from tunelab.world.build import assets_dir

MANIFEST = "MANIFEST.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, extra: dict[str, object]) -> None:
    sums = {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"sha256": sums, **extra}, indent=2) + "\n")


def verify(folder: Path) -> None:
    hint = "reinstall tunelab, or rebuild the base with `tunelab pretrain configs/world-base.yaml`"
    manifest = folder / MANIFEST
    if not manifest.exists():
        raise ModelLoadError(f"the shipped world base model is missing ({manifest} not found)", hint)
    sums = json.loads(manifest.read_text())["sha256"]
    for name, expected in sums.items():
        f = folder / name
        if not f.exists():
            raise ModelLoadError(f"the shipped world base model is incomplete: {f} is missing", hint)
        if sha256(f) != expected:
            raise ModelLoadError(f"the shipped world base model is corrupt: {f} fails its checksum", hint)


def base_model_dir(check: bool = True) -> Path:
    folder = assets_dir() / "base"
    if check:
        verify(folder)
    return folder


def ship(run_dir: Path, note: dict[str, object] | None = None) -> Path:
    """Copy a finished world-base run's model into the package, with checksums and its recipe."""
    import shutil

    import yaml

    src = run_dir / "final"
    dest = base_model_dir(check=False)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("tunelab_template.json"))
    records = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    extra = {
        "recipe": "tunelab pretrain configs/world-base.yaml",
        "config": yaml.safe_load((run_dir / "config.yaml").read_text()),
        "steps": train[-1]["step"] if train else None,
        "final_train_loss": train[-1]["loss"] if train else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "pretraining_seconds": train[-1]["elapsed_s"] if train else None,
        **(note or {}),
    }
    write_manifest(dest, extra)
    return dest


if __name__ == "__main__":  # python -m tunelab.world.base RUN_DIR
    import sys

    print(ship(Path(sys.argv[1])))
