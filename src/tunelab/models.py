"""Load any HF causal LM + tokenizer (hub id, local folder, tunelab run directory, or the shipped
"world" base), pick dtype/device, wrap with LoRA, save in standard HF format."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import ConfigError, ModelLoadError

TEMPLATE_FILE = "tunelab_template.json"


def _quiet_hf() -> None:
    """transformers' own per-file bars would interleave with ours; peft 0.21 reads transformers'
    deprecated `is_gradient_checkpointing`, a warning users cannot act on."""
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()  # saved next to the weights so inference renders like training


@dataclass
class ModelSource:
    """Where weights come from once names and run directories are resolved."""

    model: str  # HF folder or hub id of the (base) model
    adapter: str | None = None  # PEFT adapter folder on top of `model`
    run_dir: Path | None = None  # the tunelab run this came from, if any


def world_base_path() -> Path:
    from tunelab.world.base import base_model_dir

    return base_model_dir()


# The model folders a run writes; a path to one of them is read with its run's settings.
RUN_MODEL_FOLDERS = ("final", "best")


def _is_run_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.yaml").exists() and not (p / "config.json").exists()


def run_of(folder: Path) -> Path | None:
    """The run directory a run's final/ or best/ folder lies in, else None."""
    return folder.parent if folder.name in RUN_MODEL_FOLDERS and _is_run_dir(folder.parent) else None


def resolve_source(name_or_path: str) -> ModelSource:
    """'world' -> the shipped base; a run dir -> its final/ (base + adapter when it holds one); a
    run's final/ or best/ -> that folder, with its run (whose config.yaml holds the settings)."""
    if name_or_path == "world":
        return ModelSource(str(world_base_path()))
    if name_or_path.startswith("world:"):
        from tunelab.world.build import resolve_world_path

        return ModelSource(resolve_world_path(name_or_path))
    p = Path(name_or_path)
    if _is_run_dir(p):
        final = p / "final"
        if not final.is_dir():
            best = p / "best"
            saved = any((best / f).exists() for f in ("config.json", "adapter_config.json"))
            resumable = any((c / "meta.json").exists() for c in (p / "checkpoints").glob("step-*"))
            then = (
                f"resume it with `tunelab train --resume {p}`"
                if resumable
                else f"train it again (it left no checkpoint to resume from; train.save_every makes some): "
                f"tunelab train {p / 'config.yaml'}"
            )
            raise ModelLoadError(
                f"run directory {p} has no final/ model (did training finish?)",
                (f"use {best}, the best model it saved so far, or " if saved else "") + then,
            )
        src = resolve_source(str(final))
        return ModelSource(src.model, src.adapter, p)
    if p.is_dir() and (p / "adapter_config.json").exists():
        cfg = json.loads((p / "adapter_config.json").read_text())
        base = cfg.get("base_model_name_or_path") or ""
        return ModelSource(str(world_base_path()) if base == "world" else base, str(p), run_of(p))
    return ModelSource(name_or_path, run_dir=run_of(p))


def _load_error(name: str, err: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    path = Path(name).expanduser()
    if path.is_dir() and not any((path / f).exists() for f in ("config.json", "adapter_config.json")):
        run = path.parent.parent
        if path.parent.name == "checkpoints" and _is_run_dir(run):
            return ModelLoadError(
                f"'{name}' is a training checkpoint (state to resume from), not a model to load",
                f"use the run's model: {run} (its final/) or {run / 'best'}; or resume it with "
                f"`tunelab train --resume {run}`",
            )
        return ModelLoadError(
            f"'{name}' is a folder with no model in it (no config.json)",
            "pass a folder written by save_pretrained or `tunelab export`, a run directory, or a hub id",
        )
    if path.exists():
        return ModelLoadError(
            f"cannot load a model from '{name}': {err}", "check the path holds config.json and weights"
        )
    # A hub id is "name" or "org/name"; a path that is not there is not a hub id to look up.
    looks_local = (
        name.startswith((".", "/", "~"))
        or len(path.parts) > 2
        or (len(path.parts) == 2 and path.parent.is_dir())
    )
    if looks_local:
        return ModelLoadError(
            f"no such model folder: '{name}'", f"check the path (relative paths start from {Path.cwd()})"
        )
    if offline:
        return ModelLoadError(
            f"model '{name}' is not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE=1)",
            f"download it where there is internet (`hf download {name} --local-dir DIR`), copy DIR here "
            "and pass its path; or, with internet here, unset HF_HUB_OFFLINE",
        )
    return ModelLoadError(
        f"cannot load model '{name}' from the hub: {type(err).__name__}: {err}",
        "check the name and your network, or pass a local folder",
    )


def check_loadable(name_or_path: str) -> None:
    """Raises the ModelLoadError that loading `name_or_path` would, reading only its config (and the
    run's or adapter's files): for a list of models checked before the first one loads."""
    from transformers import AutoConfig

    src = resolve_source(name_or_path)
    try:
        AutoConfig.from_pretrained(src.model)
    except Exception as e:  # noqa: BLE001 - whatever stops the config stops the model
        raise _load_error(src.model, e) from None


# attn_implementation -> the module it needs (transformers raises a bare ImportError deep in loading).
_ATTENTION_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
_AUTO_HINT = (
    "leave model.attn_implementation at auto: SDPA, trained with tunelab's per-example packed attention"
)


def check_attention(attn_implementation: str, device: torch.device) -> None:
    """Refuse, before a run directory or weights exist, attention backends that cannot train here."""
    import importlib.util

    package = _ATTENTION_PACKAGES.get(attn_implementation)
    if package and importlib.util.find_spec(package) is None:
        raise ModelLoadError(
            f"model.attn_implementation '{attn_implementation}' needs the '{package}' package, which is not installed",
            f"install it (it needs a CUDA GPU), or {_AUTO_HINT}",
        )
    if package and device.type != "cuda":
        raise ModelLoadError(
            f"model.attn_implementation '{attn_implementation}' needs a CUDA GPU", _AUTO_HINT
        )
    if attn_implementation == "flex_attention" and device.type == "cpu":
        raise ModelLoadError(
            "model.attn_implementation 'flex_attention' cannot train on a CPU (torch's FlexAttention has no CPU backward)",
            _AUTO_HINT,
        )


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "model.device is 'cuda' but no CUDA GPU is visible", "use --model.device=cpu or auto"
        )
    if device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ModelLoadError(
            "model.device is 'mps' but this machine has no Apple GPU (or this torch has no MPS support)",
            "use --model.device=cpu or auto",
        )
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 halves memory and uses tensor cores on GPUs that support it; fp32 on CPU is both faster
        # and exact there (CPU bf16 matmuls are slow on most chips).
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e) from None
    if tok.pad_token_id is None:
        # Needed only to pad generation batches: training is padding-free and builds labels from
        # structure, so pad == eos cannot mask the EOS the model must learn.
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str,
    dtype: str = "auto",
    device: str = "auto",
    attn_implementation: str = "auto",
    trust_remote_code: bool = False,
    init: dict[str, Any] | None = None,
    tokenizer: str | None = None,
    seed: int = 0,
    quantization: Any = None,
    adapter_trainable: bool = False,
) -> tuple[Any, Any, ModelSource]:
    """Returns (model, tokenizer, source). With `init`, a new model of that HF config (random weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _quiet_hf()
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    attn = None if attn_implementation == "auto" else attn_implementation
    if init is not None:
        init = dict(init)
        model_type = init.pop("model_type")
        tok = load_tokenizer(resolve_source(tokenizer or name_or_path).model, trust_remote_code)
        vocab_size = init.pop("vocab_size", len(tok))
        if vocab_size < len(tok):  # ids past the embeddings would fail in the first forward pass
            raise ModelLoadError(
                f"model.init vocab_size {vocab_size:,} is smaller than the tokenizer's {len(tok):,} tokens",
                f"leave vocab_size out of model.init (it is the tokenizer's) or set it to at least {len(tok):,}",
            )
        config = AutoConfig.for_model(
            model_type,
            vocab_size=vocab_size,
            **{  # the tokenizer's special ids, unless the init names its own
                "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id,
                **init,
            },
        )
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation=attn)
        return model.to(dev), tok, ModelSource("(new weights)")
    src = resolve_source(name_or_path)
    tok_src = resolve_source(tokenizer) if tokenizer else None  # `world`, `world:tokenizer`, a run
    tok = load_tokenizer(
        (tok_src.adapter or tok_src.model) if tok_src else src.adapter or src.model, trust_remote_code
    )
    # A local base is loaded by its absolute path: PEFT records it as the adapter's
    # base_model_name_or_path, which must work from any directory.
    base = str(Path(src.model).resolve()) if Path(src.model).is_dir() else src.model
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base,
            dtype=torch_dtype,
            attn_implementation=attn,
            trust_remote_code=trust_remote_code,
            quantization_config=quantization,
            device_map={"": dev} if quantization is not None else None,
        )
    except (OSError, ValueError) as e:
        raise _load_error(src.model, e) from None
    except ImportError as e:  # e.g. an attention backend or quantization package that is missing
        raise ModelLoadError(f"cannot load '{src.model}': {e}", "install the package it names") from None
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if tokenizer and isinstance(rows, int) and len(tok) > rows:
        raise ModelLoadError(
            f"model.tokenizer {tokenizer} has {len(tok):,} tokens, more than the model's {rows:,} embeddings",
            "use the tokenizer the model was trained with (leave model.tokenizer unset)",
        )
    if src.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, src.adapter, is_trainable=adapter_trainable)
    return (model if quantization is not None else model.to(dev)), tok, src


def load_template(folder: str | Path) -> dict[str, Any] | None:
    f = Path(folder) / TEMPLATE_FILE
    return json.loads(f.read_text()) if f.exists() else None


def save_model(
    model: Any,
    tokenizer: Any,
    out: Path,
    template: dict[str, Any] | None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """HF `save_pretrained` folder (or PEFT adapter) + tokenizer + generation config + the template.
    `state_dict`: the weights to write instead of the model's own (a sharded model's, gathered)."""
    _quiet_hf()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, state_dict=state_dict)
    tokenizer.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None and not (out / "generation_config.json").exists():
        gen.save_pretrained(out)
    if template is not None:
        (out / TEMPLATE_FILE).write_text(json.dumps(template, indent=2))


def count_parameters(model: Any) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The model's repeated decoder layers: HF models name their class in `_no_split_modules`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(base, "_orig_mod", base)
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in base.modules() if type(m).__name__ in names]


def apply_lora(
    model: Any,
    method: str,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: list[str] | str,
    modules_to_save: list[str],
) -> Any:
    """Wrap with a PEFT LoRA/DoRA adapter; only the adapter (and `modules_to_save`) trains."""
    _quiet_hf()
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if target_modules == ["all-linear"]:  # `--lora.target_modules=all-linear` parses as a one-item list
        target_modules = "all-linear"
    if isinstance(target_modules, str) and target_modules != "all-linear":
        # `--lora.target_modules=q_proj,v_proj`: names, as the list form (PEFT would read a string
        # as one regular expression over the whole module path).
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    _check_module_names(model, target_modules, "lora.target_modules")
    _check_module_names(model, modules_to_save, "lora.modules_to_save")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save or None,
        use_dora=method == "dora",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _check_module_names(model: Any, names: Any, key: str) -> None:
    """Every name must match a module as PEFT matches them (the full path, or its last parts)."""
    if not isinstance(names, list) or not names:
        return
    paths = [n for n, _ in model.named_modules() if n]
    missing = [t for t in names if not any(p == t or p.endswith("." + t) for p in paths)]
    if missing:
        linear = sorted(
            {p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise ConfigError(
            f"{key}: {', '.join(missing)} names no module of this model",
            f"its linear layers are named {', '.join(linear)}; or use all-linear",
        )


def quantization_config(method: str, device: torch.device) -> Any:
    """QLoRA's 4-bit NF4 base weights; only on CUDA, where bitsandbytes has kernels."""
    if method != "qlora":
        return None
    if device.type != "cuda":
        raise ModelLoadError(
            "train.method 'qlora' needs a CUDA GPU (bitsandbytes 4-bit kernels); this machine has none",
            "use --train.method=lora on CPU: same adapters, full-precision base",
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError("train.method 'qlora' needs bitsandbytes", "pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
