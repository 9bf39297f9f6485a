"""Typed run configuration: dataclasses loaded from YAML, overridden with `--section.key=value`.

Every value is checked on load; a bad one stops with the key, what was given and what is accepted.
Library functions never see these objects: only the CLI, the Python API and recipes do.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tunelab.errors import ConfigError

DEFAULT_MODEL = "world"  # the tiny base model that ships with tunelab (see tunelab.world)


@dataclass
class ModelConfig:
    # A hub id, a local HF folder, a tunelab run directory, or "world" for the shipped base model.
    name_or_path: str = DEFAULT_MODEL
    # Pretraining from scratch: HF config fields (must include model_type); weights start random.
    init: dict[str, Any] | None = None
    # Tokenizer to use when it differs from the model's (required with `init`).
    tokenizer: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = "auto"
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    # A file (.jsonl/.json/.csv/.parquet/.txt) or a folder saved with `datasets`.
    path: str = ""
    # A separate held-out file; when empty, `eval_ratio` of `path` is split off with `split_seed`.
    eval_path: str | None = None
    eval_ratio: float = 0.1
    split_seed: int = 42
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "text", "datasets"] = "auto"
    # Which schema the rows follow; "auto" detects it from the field names.
    schema: Literal["auto", "qa", "alpaca", "prompt_completion", "input_output", "messages", "text"] = "auto"
    # Explicit field mapping, schema role -> column name, e.g. {question: q, answer: a}.
    fields: dict[str, str] = field(default_factory=dict)
    # qa: ### Question/### Answer; alpaca; raw: prompt then completion as-is; chat: the tokenizer's chat
    # template; custom: the two formats below; none: raw text, every token trained.
    template: Literal["auto", "qa", "alpaca", "raw", "chat", "custom", "none"] = "auto"
    prompt_format: str | None = None  # custom: e.g. "Q: {question}\nA: "
    completion_format: str | None = None  # custom: e.g. "{answer}"
    train_on_prompt: bool = False
    # Longest example in tokens; None = 2048, or less when the model's context is shorter.
    max_length: int | None = None
    # Which end of an over-long example is cut: "right" drops its tail, "left" its head.
    truncation_side: Literal["right", "left"] = "right"
    on_bad_row: Literal["error", "skip"] = "error"
    # The pre-flight data check (`tunelab data check`) before training: "block" refuses blocking
    # problems (no EOS, every label masked, eval leaked into train), "warn" only prints them.
    check: Literal["block", "warn", "off"] = "block"
    # Share of eval rows whose prompt may also be in train before the check blocks (0 = any overlap).
    max_leakage: float = 0.01
    # Pretraining: documents are joined with EOS and cut into chunks of this many tokens.
    chunk_length: int = 256


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0  # > 0 draws a mask per adapted layer: slower, more memory (docs/configs.md)
    # "all-linear" = every linear layer of attention and MLP (not the output head).
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    method: Literal["full", "lora", "dora", "qlora"] = "full"
    epochs: float = 3.0
    max_steps: int | None = None
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    # Examples per optimizer step; split into micro-batches of at most `micro_batch_tokens`.
    batch_size: int = 16
    micro_batch_tokens: int = 8192
    grad_clip: float | None = 1.0
    # In optimizer steps; None = about 10 evaluations over the run, 0 = only at the end.
    eval_every: int | None = None
    save_every: int | None = None
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    gradient_checkpointing: bool = False
    # torch.compile each decoder layer (training/compiling.py): "auto" = for a run whose steps would
    # take at least compiling.WORTH_S uncompiled (1 minute on CUDA, 5 on a CPU), timed on the largest
    # micro-batch; several processes compile on CUDA without timing and stay eager on a CPU; never
    # over QLoRA's 4-bit layers (untested compiled). Compiled, norms, rotary and activations are fused.
    compile: bool | Literal["auto"] = "auto"
    # How bf16 weights take AdamW's update: "stochastic" (computed in fp32, rounded up or down with
    # probability by distance, so updates smaller than bf16's spacing add up) or "nearest" (torch's
    # fused AdamW: at lr 1e-5 most updates round away). Weights in other dtypes: the plain update.
    bf16_rounding: Literal["stochastic", "nearest"] = "stochastic"
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = field(default_factory=list)
    # Under torchrun / accelerate launch (WORLD_SIZE > 1): "auto" = ddp; "fsdp" shards weights,
    # gradients and optimizer state per decoder layer. One process ignores it (docs/distributed.md).
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"


@dataclass
class RunConfig:
    task: Literal["sft", "pretrain"] = "sft"
    name: str = "run"
    # The run directory; empty = runs/<name>-<timestamp>.
    out: str = ""
    # The run this one continued from (`tunelab train --from RUN`), recorded for lineage.
    parent: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting the harmless cases (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if type(value) in args:  # an exact type match wins over a conversion (str before list[str])
            return value
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        accepted = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{key}: got {value!r}, expected {accepted}")
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in args:
            value = "on" if value else "off"  # YAML reads a bare off/on as false/true
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f"did you mean {close[0]!r}?" if close else None
        raise ConfigError(f"{key}: got {value!r}, accepted values: {', '.join(map(repr, args))}", hint)
    if origin is list:
        if isinstance(value, str):  # `--train.report_to=tensorboard,wandb`
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: got {value!r}, expected a list")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}, expected a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: got {value!r}, expected true or false")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. a model name that YAML read as a number
    if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}), expected {_type_name(tp)}")


def _build(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else None
            raise ConfigError(f"unknown key '{full}'; valid keys here: {', '.join(names)}", hint)
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _text_key(keys: list[str]) -> Any:
    """The annotation of this RunConfig key if it holds free text (str or str | None), else None."""
    cls: Any = RunConfig
    for key in keys:
        if not dataclasses.is_dataclass(cls) or key not in {f.name for f in dataclasses.fields(cls)}:
            return None
        cls = typing.get_type_hints(cls)[key]
    return cls if cls is str or cls == str | None else None


def parse_override(arg: str) -> tuple[list[str], Any]:
    """`--train.lr=1e-4` -> (["train", "lr"], 1e-4). Values are read as YAML scalars, except for
    keys that hold free text (paths, names, template formats), which keep the text as typed; a
    template format's `\\n` and `\\t` become a newline and a tab, as in a double-quoted YAML string."""
    body = arg[2:] if arg.startswith("--") else arg
    if "=" not in body:
        raise ConfigError(f"override '{arg}' has no value", "write it as --section.key=value")
    dotted, raw = body.split("=", 1)
    keys = dotted.replace("-", "_").split(".")
    text = _text_key(keys)
    if text is not None:
        if text is not str and raw.strip() in ("", "~", "null", "Null", "NULL"):
            return keys, None  # unset, as YAML's null
        if keys[-1].endswith("_format"):
            raw = re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m[1]], raw)
        return keys, raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
        raise ConfigError(
            f"{dotted}: cannot read {raw!r} ({problem})",
            "quote it for the shell; a list is written [a, b], a mapping {key: value}",
        ) from None
    # YAML reads "1e-4" as a string (it wants "1.0e-4"); people write 1e-4.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") and value[0] in "0123456789.-+" else value
        except ValueError:
            pass
    return keys, value


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{'.'.join(path)}': '{part}' is not a section")
    node[path[-1]] = value


def _fix_yaml_floats(tree: Any) -> Any:
    """PyYAML reads `lr: 1e-4` as the string '1e-4'; turn such strings back into floats."""
    if isinstance(tree, dict):
        return {k: _fix_yaml_floats(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_fix_yaml_floats(v) for v in tree]
    if isinstance(tree, str):
        try:
            return float(tree) if tree.strip() and tree.strip()[0] in "0123456789.-+" else tree
        except ValueError:
            return tree
    return tree


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> RunConfig:
    """Read a YAML file (optional), apply `values` (nested dict) then `--a.b=c` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            shipped = packaged_config(p.name)
            if shipped.is_file():  # a shipped recipe, named from outside the repository's root
                hint = f"tunelab ships {p.name}: give its path, {shipped}"
            else:
                names = ", ".join(sorted(x.name for x in shipped.parent.glob("*.yaml")))
                hint = f"give the path to a YAML file; tunelab ships {names} in {shipped.parent}"
            raise ConfigError(f"config file not found: {p}", hint)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        tree = _fix_yaml_floats(loaded or {})
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (model, data, train, ...)")
    given: list[str] = []  # the keys set here, not by the file
    for dotted, value in (values or {}).items():
        _set_path(tree, dotted.split("."), value)
        given.append(dotted)
    for arg in overrides or []:
        keys, value = parse_override(arg)
        _set_path(tree, keys, value)
        given.append(".".join(keys))
    cfg = _build(RunConfig, tree, "")
    validate(cfg)
    _refuse_other_task(cfg, given)
    unused = [k for k in given if k.split(".")[0] == "lora"]
    if unused and cfg.train.method == "full":
        # Said, not refused: one set of arguments swept over methods is fine. A file's lora section
        # may outlive a switch to method full without a word; a key given here was meant to count.
        print(
            f"note: {', '.join(dict.fromkeys(unused))} ignored: train.method is full (every weight "
            "trains, no adapter); --train.method=lora (or dora, qlora) trains an adapter",
            file=sys.stderr,
        )
    if "train.keep_last" in given and not cfg.train.save_every:
        print(
            f"note: train.keep_last {cfg.train.keep_last} ignored: train.save_every is "
            f"{cfg.train.save_every}, so no checkpoint is written (--train.save_every=N writes one every N steps)",
            file=sys.stderr,
        )
    return cfg


# Data keys only one task reads: pretraining cuts documents into chunks and trains every token.
_SFT_ONLY = (
    "data.template",
    "data.prompt_format",
    "data.completion_format",
    "data.train_on_prompt",
    "data.max_length",
    "data.truncation_side",
)
_PRETRAIN_ONLY = ("data.chunk_length",)


def _refuse_other_task(cfg: RunConfig, given: list[str]) -> None:
    """A data key given here (not a file's) that only the other task reads would change nothing;
    its default (what `--from` across tasks sets) and pretraining's own template `none` are fine."""
    default, data = dataclasses.asdict(DataConfig()), dataclasses.asdict(cfg.data)
    other = _SFT_ONLY if cfg.task == "pretrain" else _PRETRAIN_ONLY
    harmless = {"template": "none"}
    unused = [
        k
        for k in dict.fromkeys(given)
        if k in other and data[k[5:]] not in (default[k[5:]], harmless.get(k[5:], default[k[5:]]))
    ]
    if not unused:
        return
    if cfg.task == "pretrain":
        raise ConfigError(
            f"{', '.join(unused)}: a finetuning setting, and this pretrains: documents are joined, cut "
            "into data.chunk_length-token chunks, and every token is trained",
            "leave it out; for shorter sequences set --data.chunk_length, to finetune run `tunelab train`",
        )
    raise ConfigError(
        f"{', '.join(unused)}: a pretraining setting, and this finetunes: each example is its own "
        "sequence, cut at data.max_length",
        "leave it out; to bound the examples set --data.max_length, to pretrain run `tunelab pretrain`",
    )


def check_task(path: str | Path | None, task: str) -> None:
    """A config file whose `task` is not the one asked (`tunelab train` with a pretraining recipe, or
    the reverse) is refused: run as the other task, its data would be cut and trained otherwise."""
    if path is None or not Path(path).is_file():
        return  # load_config says what is missing
    try:
        written = (yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).get("task")
    except (yaml.YAMLError, AttributeError):
        return  # load_config says what is wrong with it
    if written is not None and written != task:
        command = {"sft": "train", "pretrain": "pretrain"}
        raise ConfigError(
            f"{path} is a {written} config (task: {written}), and this runs {task}",
            f"run it with `tunelab {command.get(written, written)}` "
            f"(tunelab.{command.get(written, written)} from Python), or set its task to {task}",
        )


def validate(cfg: RunConfig) -> None:
    """Checks across keys that types alone cannot express."""
    d, t = cfg.data, cfg.train
    if not 0.0 <= d.eval_ratio < 1.0:
        raise ConfigError(f"data.eval_ratio: got {d.eval_ratio}, expected 0 <= ratio < 1")
    if not 0.0 <= d.max_leakage <= 1.0:
        raise ConfigError(f"data.max_leakage: got {d.max_leakage}, expected a share between 0 and 1")
    if d.max_length is not None and d.max_length < 2:
        raise ConfigError(f"data.max_length: got {d.max_length}, expected at least 2")
    if d.template == "custom" and not (d.prompt_format and d.completion_format):
        raise ConfigError(
            "data.template is 'custom' but data.prompt_format / data.completion_format are not both set",
            'e.g. --data.prompt_format="Q: {question}\\nA: " --data.completion_format="{answer}"',
        )
    if t.lr <= 0:
        raise ConfigError(f"train.lr: got {t.lr}, expected a positive number")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(
            f"train.max_steps: got {t.max_steps}, expected >= 1", "or null, to train for train.epochs"
        )
    if t.epochs <= 0 and not t.max_steps:
        raise ConfigError("train.epochs must be positive (or set train.max_steps)")
    if t.batch_size < 1:
        raise ConfigError(f"train.batch_size: got {t.batch_size}, expected >= 1")
    if t.micro_batch_tokens < 2:
        raise ConfigError(f"train.micro_batch_tokens: got {t.micro_batch_tokens}, expected at least 2")
    if t.grad_clip is not None and t.grad_clip < 0:
        # clip_grad_norm_ would scale every gradient by a negative factor: gradient ascent.
        raise ConfigError(
            f"train.grad_clip: got {t.grad_clip}, expected a positive norm", "0 or null: no clipping"
        )
    if t.weight_decay < 0:
        raise ConfigError(f"train.weight_decay: got {t.weight_decay}, expected >= 0")
    for key, value, least in (("log_every", t.log_every, 1), ("keep_last", t.keep_last, 0)):
        if value < least:
            raise ConfigError(f"train.{key}: got {value}, expected >= {least}")
    for key, value in (("eval_every", t.eval_every), ("save_every", t.save_every)):
        if value is not None and value < 0:
            raise ConfigError(f"train.{key}: got {value}, expected >= 0 (or null)")
    lo = cfg.lora
    if lo.r < 1 or lo.alpha <= 0:
        raise ConfigError(f"lora.r and lora.alpha: got {lo.r} and {lo.alpha}, expected positive numbers")
    if not 0.0 <= lo.dropout < 1.0:
        raise ConfigError(f"lora.dropout: got {lo.dropout}, expected 0 <= dropout < 1")
    if d.max_length is not None and t.micro_batch_tokens < d.max_length and cfg.task == "sft":
        raise ConfigError(
            f"train.micro_batch_tokens ({t.micro_batch_tokens}) is smaller than data.max_length ({d.max_length})",
            "a micro-batch must hold the longest example: raise micro_batch_tokens or lower max_length",
        )
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"train.warmup_ratio: got {t.warmup_ratio}, expected 0 <= ratio < 1")
    if len(t.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in t.adam_betas):
        raise ConfigError(f"train.adam_betas: got {t.adam_betas}, expected two numbers in [0, 1)")
    if cfg.model.dtype == "float16" and t.method == "full":
        # tunelab keeps no fp32 master weights and scales no loss: in fp16 small gradients underflow to
        # zero and small updates round away, without a word.
        raise ConfigError(
            "model.dtype float16 with train.method full: fp16 weights would train with no fp32 master "
            "copy and no loss scaling, so small gradients and updates would be lost",
            "use model.dtype bfloat16 (GPUs since Ampere) or float32 (`auto` picks one), "
            "or train an adapter over the fp16 base (train.method lora)",
        )
    if cfg.model.init is not None and t.method != "full":
        raise ConfigError(
            f"model.init builds new random weights, and train.method {t.method} would train only an "
            "adapter over them: the random base is never saved, so the adapter could not be used",
            "train new weights with train.method full, then adapt them in a new run (--from)",
        )
    if cfg.model.init is not None and "model_type" not in cfg.model.init:
        raise ConfigError("model.init must name a model_type (e.g. llama) next to the shape fields")
    if cfg.model.init is not None and not cfg.model.tokenizer:
        raise ConfigError(
            "model.init builds new weights and needs model.tokenizer (a tokenizer folder or hub id)"
        )
    if cfg.task == "pretrain" and d.chunk_length < 2:
        raise ConfigError(f"data.chunk_length: got {d.chunk_length}, expected at least 2")
    if cfg.task == "pretrain" and t.micro_batch_tokens < d.chunk_length:
        raise ConfigError(
            f"train.micro_batch_tokens ({t.micro_batch_tokens}) is smaller than data.chunk_length ({d.chunk_length})",
            "a micro-batch must hold a whole chunk: raise micro_batch_tokens or lower chunk_length",
        )


def packaged_config(name: str) -> Path:
    """A config shipped inside the package (src/tunelab/configs, also linked as ./configs)."""
    from importlib.resources import files

    return Path(str(files("tunelab") / "configs" / name))


def save_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
