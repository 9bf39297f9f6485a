"""From a RunConfig to a finished run directory: data first (all bad input stops here, before any
model is loaded), then the model, then the loop. The CLI and the Python API both call this."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tunelab import progress
from tunelab.config import RunConfig, load_config, save_config
from tunelab.data import check, encodings, templates
from tunelab.data.dataset import count_trainable, encode_records, load_records, pack_documents
from tunelab.data.formats import write_rejects
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.models import (
    apply_lora,
    check_attention,
    load_model,
    load_tokenizer,
    pick_device,
    quantization_config,
    resolve_source,
)
from tunelab.training import checkpoint, distributed
from tunelab.training.logger import check_trackers
from tunelab.training.loop import TrainResult, seed_everything, train


def make_run_dir(cfg: RunConfig, overwrite: bool = False) -> Path:
    out = Path(cfg.out) if cfg.out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise TunelabError(
                f"run directory {out} already exists and is not empty",
                f"pass --overwrite to replace it, --resume {out} to continue it, or choose another --out",
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _max_positions(name_or_path: str, init: dict[str, Any] | None) -> int | None:
    from transformers import AutoConfig

    if init is not None:  # the config the init builds: its own key (GPT-2's n_positions) or default
        fields = {k: v for k, v in init.items() if k != "model_type"}
        try:
            config = AutoConfig.for_model(init["model_type"], **fields)
        except (KeyError, TypeError, ValueError):
            return None  # the model build right after says what is wrong
        return getattr(config, "max_position_embeddings", None)
    try:
        config = AutoConfig.from_pretrained(resolve_source(name_or_path).model)
    except (OSError, ValueError):
        return None  # the model load right after says what is wrong, with the full message
    return getattr(config, "max_position_embeddings", None)


DEFAULT_MAX_LENGTH = 2048  # the course's choice; most small models take at least this


def resolve_max_length(cfg: RunConfig) -> RunConfig:
    """Fill data.max_length from the model when unset; refuse lengths the model cannot take."""
    limit = _max_positions(cfg.model.name_or_path, cfg.model.init)
    d = cfg.data
    max_length = d.max_length or min(
        DEFAULT_MAX_LENGTH, limit or DEFAULT_MAX_LENGTH, cfg.train.micro_batch_tokens
    )
    for key, length in (("data.max_length", max_length), ("data.chunk_length", d.chunk_length)):
        if key == "data.chunk_length" and cfg.task != "pretrain":
            continue
        if limit is not None and length > limit:
            raise ConfigError(
                f"{key} is {length} but the model takes at most {limit} tokens", f"set {key} <= {limit}"
            )
    return dataclasses.replace(cfg, data=dataclasses.replace(d, max_length=max_length))


def _checked(
    cfg: RunConfig, loaded: Any, template: templates.Template, tokenizer: Any
) -> tuple[list[Any], list[Any]] | None:
    """The data check (data.check), and the examples it encoded when they are what this run would
    encode (the same template, tokenizer, lengths and masking): each text is tokenised once per run.
    None when the check is off: the run encodes them itself."""
    settings = check.settings_from_config(cfg)
    checked = check.preflight(cfg.data.check, loaded, template, tokenizer, settings)
    found = checked[1] if checked is not None else None
    return encodings.reuse(found, check.recipe(template, tokenizer, settings))


def _prepare_data(cfg: RunConfig, tokenizer: Any) -> tuple[Any, Any, templates.Template, list[Any]]:
    d = cfg.data
    loaded = load_records(
        d.path, d.eval_path, d.eval_ratio, d.split_seed, d.format, d.schema, d.fields, d.on_bad_row
    )
    if cfg.task == "pretrain":
        if loaded.schema != "text":
            raise DataError(
                f"pretraining reads raw text, but the rows look like '{loaded.schema}'",
                source=d.path,
                hint="give rows with a 'text' field, or a .txt file",
            )
        # Documents are cut into chunks, never truncated: no length limit in the check.
        template = templates.Template("none", schema="text")
        train_ex, eval_ex = _checked(cfg, loaded, template, tokenizer) or (
            pack_documents(
                [r.values["text"] for r in part], tokenizer, d.chunk_length, f"data: tokenising {label}"
            )
            for label, part in (("train", loaded.train), ("eval", loaded.eval))
        )
        return train_ex, eval_ex, template, loaded.rejects
    template = templates.resolve(d.template, loaded.schema, d.prompt_format, d.completion_format)
    train_ex, eval_ex = _checked(cfg, loaded, template, tokenizer) or (
        encode_records(part, template, tokenizer, d.max_length, d.truncation_side, d.train_on_prompt, label)
        for label, part in (("train", loaded.train), ("eval", loaded.eval))
    )
    if count_trainable(train_ex) == 0:
        raise DataError(
            "no example has a trained token (every label is masked)",
            source=d.path,
            hint="check the template and data.max_length: truncation may cut every completion",
        )
    return train_ex, eval_ex, template, loaded.rejects


def _build_model(cfg: RunConfig, quantization: Any) -> tuple[Any, Any, RunConfig]:
    """Load the weights and put the adapter on; returns the config with the adapter's real shape."""
    method = cfg.train.method
    src = resolve_source(cfg.model.name_or_path) if cfg.model.init is None else None
    model, tokenizer, _ = load_model(
        cfg.model.name_or_path,
        cfg.model.dtype,
        cfg.model.device,
        cfg.model.attn_implementation,
        cfg.model.trust_remote_code,
        cfg.model.init,
        cfg.model.tokenizer,
        cfg.train.seed,
        quantization=quantization,
        adapter_trainable=method != "full",
    )
    has_adapter = src is not None and src.adapter is not None
    if method == "full" and has_adapter:
        # Continuing a LoRA run as a full finetune: start from the merged weights, every one trained
        # (the base came in frozen under its adapter).
        model = model.merge_and_unload().requires_grad_(True)
    elif method != "full" and not has_adapter:
        lo = cfg.lora
        seed_everything(cfg.train.seed)  # the adapter's init draws from torch's RNG: same config, same start
        model = apply_lora(model, method, lo.r, lo.alpha, lo.dropout, lo.target_modules, lo.modules_to_save)
    elif method != "full":
        # `--from` a LoRA run: its adapter keeps training with its own shape; record that shape.
        pc = model.peft_config["default"]
        targets = pc.target_modules if isinstance(pc.target_modules, str) else sorted(pc.target_modules)
        lora = dataclasses.replace(
            cfg.lora,
            r=pc.r,
            alpha=pc.lora_alpha,
            dropout=pc.lora_dropout,
            target_modules=targets,
            modules_to_save=sorted(pc.modules_to_save or []),
        )
        asked = dataclasses.asdict(cfg.lora)  # the parent's own unless the command line changed them
        kept = dataclasses.asdict(lora)
        asked["modules_to_save"] = sorted(asked["modules_to_save"] or [])
        if isinstance(asked["target_modules"], list):
            asked["target_modules"] = sorted(asked["target_modules"])
        else:  # "all-linear" names no modules to compare: PEFT resolved it to the model's linear layers
            asked["target_modules"] = kept["target_modules"]
        changed = [
            f"lora.{k}={asked[k]!r} (the adapter has {kept[k]!r})" for k in kept if asked[k] != kept[k]
        ]
        if changed:
            raise ConfigError(
                f"--from {src.run_dir or cfg.model.name_or_path}: its LoRA adapter goes on training with its "
                f"own shape, so these are not applied: {', '.join(changed)}",
                "leave them out; for an adapter of another shape, start from the merged model "
                "(`tunelab export RUN --merge DIR`, then `tunelab train --model DIR --train.method=lora ...`)",
            )
        cfg = dataclasses.replace(cfg, lora=lora)
    return model, tokenizer, cfg


def _absolute(name: str | None) -> str | None:
    """A model or tokenizer given as a local path, made absolute (the run's config is read from other
    directories later); names (the shipped `world`, hub ids) as they are."""
    if name is None or name == "world" or name.startswith("world:"):
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def run(
    cfg: RunConfig,
    quiet: bool = False,
    overwrite: bool = False,
    resume: str | Path | None = None,
) -> TrainResult:
    """Train (sft or pretrain) as `cfg` says and return the result; the run directory holds the rest.
    Under torchrun every rank runs this; rank 0 alone writes the run directory."""
    dist = distributed.setup(cfg.train.distributed, pick_device(cfg.model.device), cfg.train.method)
    resume_from = None
    if resume is not None:
        run_dir = Path(resume)
        if dist.is_main:  # a replacement of best/ or final/ that a kill interrupted is finished
            for folder in ("best", "final"):
                checkpoint.recover(run_dir / folder)
        found = checkpoint.complete_checkpoints(run_dir / "checkpoints")
        if not found and (run_dir / "final").is_dir():
            raise TunelabError(
                f"{run_dir} finished (its final/ model is there) and wrote no checkpoint: nothing to resume",
                f"train on from its weights in a new run: tunelab train --from {run_dir}",
            )
        if not found:
            raise TunelabError(
                f"no complete checkpoint in {run_dir}/checkpoints", "set train.save_every to write them"
            )
        resume_from = found[-1]  # (its metrics.jsonl is put back once the loop accepts it)
    # Data first: every bad row or setting stops here, before weights are read.
    cfg = resolve_max_length(cfg)
    check_trackers(cfg.train.report_to)
    tok_src = resolve_source(cfg.model.tokenizer or cfg.model.name_or_path)
    tok_source = tok_src.adapter or tok_src.model
    tokenizer = load_tokenizer(tok_source, cfg.model.trust_remote_code)
    with progress.shown(not quiet and dist.is_main):  # reading and tokenising a large file takes a while
        train_ex, eval_ex, template, rejects = _prepare_data(cfg, tokenizer)
    # What `auto` picked for the data (for the model, the loop's first line says).
    if not quiet and dist.is_main:
        print(
            f"data: {len(train_ex):,} train / {len(eval_ex):,} eval examples, schema {template.schema}, "
            f"template {template.name}"
            + (f", max_length {cfg.data.max_length:,}" if cfg.task == "sft" else ""),
            file=sys.stderr,
        )
    if cfg.train.eval_every is not None and not eval_ex and dist.is_main:
        print(
            f"note: train.eval_every {cfg.train.eval_every} ignored: there is no evaluation data (no "
            f"data.eval_path, and data.eval_ratio {cfg.data.eval_ratio} split off no example), so nothing is "
            "evaluated and no best/ model is written (a data.eval_path, or an eval_ratio that splits rows off, evaluates)",
            file=sys.stderr,
        )
    method = cfg.train.method
    device = pick_device(cfg.model.device)
    quantization = quantization_config(method, device)  # QLoRA without a GPU stops before a run dir exists
    check_attention(cfg.model.attn_implementation, device)
    if resume is None:  # rank 0 names it (the default name has a timestamp) and creates it
        run_dir = distributed.broadcast_path(make_run_dir(cfg, overwrite) if dist.is_main else None, dist)
    if rejects and dist.is_main:
        write_rejects(rejects, run_dir / "rejects.jsonl")
        print(f"set aside {len(rejects)} bad rows in {run_dir / 'rejects.jsonl'}")

    try:
        model, tokenizer, cfg = _build_model(cfg, quantization)
    except BaseException:
        if resume is None and dist.is_main and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a model that failed to load or wrap leaves no empty run directory
        raise

    # The resolved config: the template is written out, so inference renders exactly like training;
    # a local base model's path is made absolute, so `eval RUN` finds it from any directory.
    resolved = dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            cfg.model,
            name_or_path=_absolute(cfg.model.name_or_path),
            tokenizer=_absolute(cfg.model.tokenizer),
        ),
        data=dataclasses.replace(
            cfg.data,
            template=template.name,
            prompt_format=template.prompt_format or None,
            completion_format=template.completion_format or None,
        ),
        out=str(run_dir),
    )
    if resume is None and dist.is_main:
        save_config(resolved, run_dir / "config.yaml")
    return train(
        model,
        tokenizer,
        train_ex,
        eval_ex,
        cfg.train,
        run_dir,
        template=dataclasses.asdict(template),
        resume_from=resume_from,
        quiet=quiet,
    )


def config_for_resume(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise TunelabError(
            f"{run_dir} is not a tunelab run directory (no config.yaml)",
            "give --resume the run directory `tunelab train` printed (runs/NAME-TIMESTAMP)",
        )
    return load_config(path)
