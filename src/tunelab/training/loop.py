"""The training loop: plain PyTorch over an HF causal LM, read top to bottom.

Pretraining and finetuning both come here; they differ only in how examples became tokens and labels.
Every optimizer step takes `batch_size` examples, packed padding-free into micro-batches; the loss is
the mean over the step's trained tokens (summed per micro-batch, divided once), so accumulation gives
exactly the loss of one big batch.

Under `torchrun` the same loop runs on every rank; the few lines that differ are marked "several
processes" and the machinery is in training/distributed.py: the step's micro-batches are dealt to
the ranks, gradients are averaged by DDP or FSDP, and rank 0 alone logs and writes the run directory.
"""

from __future__ import annotations

import functools
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import get_scheduler

from tunelab.config import TrainConfig
from tunelab.data.packing import PackedBatch, collate, plan_epoch, plan_eval
from tunelab.data.tokenize import Encoded
from tunelab.errors import TunelabError
from tunelab.models import count_parameters, save_model
from tunelab.training import attention, checkpoint, compiling, distributed, lora, optim
from tunelab.training.distributed import Dist
from tunelab.training.logger import MetricsLogger, SilentLogger
from tunelab.training.loss import describe as describe_loss
from tunelab.training.loss import fused_head, loss_sum

# Where training first runs its largest micro-batch once, to fail fast on memory: GPUs, whose memory
# is the hard limit (elsewhere the extra pass would only cost time).
FAIL_FAST_DEVICES = {"cuda"}
# Dense bf16 peak, for MFU. MFU is reported on GPUs we know; elsewhere it is left out, not guessed.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


class TrainingDiverged(TunelabError):
    pass


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    eval_loss: float | None
    best_eval_loss: float | None
    best_step: int | None
    tokens_per_s: float  # over the last logged window of steps
    mean_tokens_per_s: float = 0.0  # over every step this process ran
    peak_mem_gib: float | None = None
    compiled: bool = False  # the layers ran compiled (train.compile, and compiling worked)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak memory so far: CUDA tensors on a GPU; on a CPU the process's peak resident set (model,
    optimizer, activations and the Python runtime; Linux/macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


def memory_text(device: torch.device) -> str:
    peak = peak_memory_gib(device)
    if peak is None:
        return "peak memory unknown"
    if device.type == "cuda":
        return f"peak {peak:.1f} of {torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB"
    return f"peak {peak:.1f} GiB"


def _optimizer(model: Any, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    # No weight decay on biases and norm weights (1-D tensors), as in GPT-2/LLaMA recipes.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.bf16_rounding == "stochastic" and any(p.dtype == torch.bfloat16 for p in decay + no_decay):
        # bf16 weights: the update rounded stochastically, or small updates are lost (training/optim.py).
        return optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), seed=cfg.seed)
    # One fused kernel for the whole update (CUDA, and CPU since torch 2.4: 9 -> 2 ms/step on the
    # world model); single-tensor Adam is the slow default on CPU.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), fused=fused)


def checkpoint_activations(model: Any) -> None:
    """Activation checkpointing on: each decoder layer's activations recomputed in the backward pass."""
    # transformers 5.24 renamed it (the old name warns); the GPU image's 5.17 has only the old one.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compiles(cfg: TrainConfig, device: torch.device, world_size: int = 1) -> bool:
    """train.compile: true, or auto on CUDA except over bitsandbytes' 4-bit layers (QLoRA: untested
    compiled), and auto on a CPU in one process (where a timed pass decides: `_uncompiled_seconds`)."""
    if cfg.compile is True:
        return True
    if cfg.compile != "auto" or cfg.method == "qlora":
        return False
    return device.type == "cuda" or (device.type == "cpu" and world_size == 1)


def _uncompiled_seconds(
    one_pass: Callable[[], None], model: Any, n_tokens: int, tokens_left: float, device: torch.device
) -> float | None:
    """The rest of the run's steps uncompiled, in seconds, from one timed pass (forward and backward)
    of `n_tokens` after an untimed one; None where the uncompiled pass does not fit (compiled code
    may need less memory: the probe after this decides)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        with compiling.paused(model):
            one_pass()  # the first pass pays for kernel selection and allocation
            sync()
            start = time.perf_counter()
            one_pass()
            sync()
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None
    return (time.perf_counter() - start) / max(n_tokens, 1) * tokens_left


@contextmanager
def _explain_out_of_memory(
    cfg: TrainConfig, device: torch.device, run_dir: Path, log: Any, where: str, optimizer: bool = False
):
    """Out of memory says which knob to turn. In a forward/backward pass `micro_batch_tokens` is the
    first: a step's micro-batches add up to exactly the same step whatever their size, so a run may
    resume with a lower budget. In the optimizer update only fewer trained parameters help."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        log.close()
        if optimizer:  # the first update allocates AdamW's two moments per trained parameter
            knobs = "the weights, their gradients and AdamW's two moments per trained weight do not fit: "
            knobs += (
                "train an adapter (--train.method=lora)" if cfg.method == "full" else "use a smaller model"
            )
        else:
            knobs = f"lower train.micro_batch_tokens (now {cfg.micro_batch_tokens:,})"
            if not cfg.gradient_checkpointing:
                knobs += " or set train.gradient_checkpointing: true"
            if (
                checkpoint.complete_checkpoints(run_dir / "checkpoints")
                and (run_dir / "config.yaml").exists()
            ):
                knobs += f" in {run_dir / 'config.yaml'}, then continue: tunelab train --resume {run_dir}"
            else:
                knobs += ", then start the run again"
            if cfg.method == "full":
                knobs += "; or start over with an adapter (--train.method=lora)"
        raise TunelabError(f"out of memory {where} ({memory_text(device)} so far)", knobs) from e


@torch.no_grad()
def evaluate(
    model: Any,
    examples: list[Encoded],
    micro_batch_tokens: int,
    device: torch.device,
    varlen: bool | None = None,
    dist: Dist = distributed.SINGLE,
    apart: bool | None = None,
) -> float:
    """Mean loss per trained token over `examples` (`varlen`: the model takes one packed row with
    boundaries, see training/attention.py; `apart`: each example in a pass of its own, for models
    that mix tokens outside attention; None = ask `model`).
    Several processes: each rank evaluates its share and every rank returns the same mean."""
    varlen = attention.is_varlen(model) if varlen is None else varlen
    apart = not attention.keeps_examples_apart(model, varlen) if apart is None else apart
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    plan = one_per_pass(plan_eval([len(e.input_ids) for e in examples], micro_batch_tokens), apart)
    batches = [collate([examples[i] for i in mb], varlen) for mb in plan]
    for batch, counts in distributed.deal(batches, dist):
        loss = loss_sum(model, batch.to(device))
        if counts:
            total += loss
            count += batch.n_targets
    total, count = distributed.all_sum([float(total), count], dist)  # the one wait for the device
    model.train(was_training)
    return total / max(count, 1)


def one_per_pass(micro_batches: list[list[int]], apart: bool) -> list[list[int]]:
    """Each example a micro-batch of its own where the model mixes tokens outside attention
    (`attention.keeps_examples_apart`): a packed row would carry one example into the next."""
    return [[i] for mb in micro_batches for i in mb] if apart else micro_batches


@contextmanager
def fast_paths(model: Any) -> Iterator[bool]:
    """While tunelab trains or evaluates: the output head computes the loss itself (training/loss.py),
    an SDPA model runs per-example packed attention (training/attention.py) and LoRA layers add their
    adapter inside one matmul (training/lora.py); all are undone afterwards, also when the block fails.
    Yields whether the model takes packed rows with boundaries. (LoRA first: it finds sibling
    adapters in a forward of the model as it is.)"""
    with lora.fused_lora(model), fused_head(model), attention.packed(model) as varlen:
        yield varlen


def _with_fast_paths(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def run(model: Any, *args: Any, **kwargs: Any) -> Any:
        with fast_paths(model), compiling.scope(model):
            return fn(model, *args, **kwargs)

    return run


@_with_fast_paths
def train(
    model: Any,
    tokenizer: Any,
    train_examples: list[Encoded],
    eval_examples: list[Encoded],
    cfg: TrainConfig,
    run_dir: Path,
    template: dict[str, Any] | None = None,
    resume_from: Path | None = None,
    quiet: bool = False,
    save: bool = True,
) -> TrainResult:
    """Train `model` in place; `save=False` writes only metrics.jsonl (benchmarks)."""
    # ---- setup
    device = next(model.parameters()).device
    dist = distributed.setup(cfg.distributed, device, cfg.method)  # one process: distributed.SINGLE
    lengths = [len(e.input_ids) for e in train_examples]
    steps_per_epoch = len(
        plan_epoch(lengths, cfg.batch_size, cfg.micro_batch_tokens, cfg.seed, 0, shuffle=False)
    )
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    eval_every = cfg.eval_every if cfg.eval_every is not None else max(1, total_steps // 10)
    if save and cfg.save_every and cfg.save_every >= total_steps and dist.is_main:
        # A checkpoint is written before the last step only (final/ holds the end): none at all here.
        print(
            f"note: train.save_every is {cfg.save_every} and the run has {total_steps} steps: no "
            "checkpoint is written, so an interrupted run cannot be resumed "
            f"(--train.save_every below {total_steps} writes them)",
            file=sys.stderr,
        )
    # Warmup starts at lr 0 (step 1, as in transformers' schedules): a warmup as long as the run would
    # train every step below the peak and a 1-step run at 0, so the last step always comes after it.
    warmup = min(round(cfg.warmup_ratio * total_steps), total_steps - 1)
    if warmup < round(cfg.warmup_ratio * total_steps) and dist.is_main:
        print(
            f"note: train.warmup_ratio {cfg.warmup_ratio} of {total_steps} steps warms up to the end of "
            "the run (step 1 at lr 0, no step at train.lr): warming up over "
            f"{warmup} steps instead, so the last step trains at train.lr (a lower warmup_ratio sets a shorter warmup)",
            file=sys.stderr,
        )
    seed_everything(cfg.seed)
    if cfg.gradient_checkpointing:
        checkpoint_activations(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise TunelabError(
            "no weight of the model is trainable: the run would change nothing",
            "a bug in how the model was prepared (every weight frozen); please report it with the command",
        )
    varlen = attention.is_varlen(model)  # one packed row per micro-batch, no mask
    # Convolutions, state-space layers, linear attention: a packed row would carry one example into
    # the next, so there each example goes through the model on its own.
    # Several processes: every rank must plan alike (one split where any rank's probe says so).
    apart = distributed.all_sum([float(not attention.keeps_examples_apart(model, varlen))], dist)[0] > 0
    model.train()
    # Several processes: `wrapped` is DDP around `model`, or `model` sharded in place by FSDP.
    wrapped = distributed.wrap(model, dist)
    # Compiled: each decoder layer in place (training/compiling.py); optimise and save `model`, run
    # `forward`.
    compiled = compiles(cfg, device, dist.world_size)
    forward = compiling.for_training(wrapped, model) if compiled else wrapped
    # auto: compile only a run long enough to pay for the warm-up, timed in the probe below (one
    # process: ranks timing apart could decide apart).
    short_run_rule = compiled and cfg.compile == "auto" and dist.world_size == 1
    optimizer = _optimizer(model, cfg, device)
    schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
    scheduler = get_scheduler(schedule, optimizer, warmup, total_steps)
    trainable, total_params = count_parameters(model)
    flops_per_token = 6 * total_params  # forward + backward, as in BENCH.md's MFU
    peak = peak_flops(device)
    if peak:
        peak *= dist.world_size  # tokens/s counts every rank's tokens
    log = MetricsLogger(run_dir, total_steps, quiet, cfg.report_to) if dist.is_main else SilentLogger()
    where = f"{dist.world_size} x {device} ({dist.mode})" if dist.world_size > 1 else str(device)
    dtypes = sorted(
        {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()}
    )
    log.print(
        f"training {trainable:,} of {total_params:,} parameters ({100 * trainable / total_params:.2f}%) on {where} "
        f"in {'/'.join(dtypes)}; "
        f"{len(train_examples):,} examples, {steps_per_epoch} steps/epoch, {total_steps} steps; "
        + ", ".join(
            x
            for x in (
                f"attention {attention.describe(model)}"
                + (", one example per pass (the model mixes tokens outside attention)" if apart else ""),
                describe_loss(model),
                lora.describe(model),
                optim.describe(optimizer),
                compiling.describe(compiled, model, auto=short_run_rule),
            )
            if x
        )
    )

    start_step, best_eval, best_step, last_eval = 0, math.inf, None, None
    ran_compiled = None  # resumed: whether the run trained compiled (compile: auto goes on as it began)
    # The logged loss is the mean over the steps since the last log line, per trained token: the
    # window's summed loss and its trained tokens (a checkpoint keeps them, so a resumed run logs
    # what the uninterrupted one does).
    window_loss, window_targets = 0.0, 0
    resumed_tokens = 0  # the real tokens of the window's steps before the checkpoint (its record counts them)
    data_id = checkpoint.fingerprint(train_examples)
    eval_id = checkpoint.fingerprint(eval_examples)  # the evaluations and best/ depend on it
    distributed.check_same_data(data_id, dist)
    if resume_from is not None:
        # Weights/adapter, optimizer, scheduler and the RNG states (after seed_everything, so they win).
        meta = distributed.load_checkpoint(resume_from, model, optimizer, scheduler, dist)
        changed = checkpoint.changes(
            meta,
            data_id,
            total_steps,
            checkpoint.trajectory(cfg),
            checkpoint.adapter_settings(model),
            eval_id,
        )
        if changed:
            log.close()
            raise TunelabError(
                f"cannot resume from {resume_from}: the run would not be the run it was; changed since: "
                + "; ".join(changed),
                "put the values back in the run's config.yaml (a resumed run must equal an uninterrupted "
                "one); to train with new ones, let this run finish (resume it as it was), then start a new "
                "run from it with `tunelab train --from RUN`",
            )
        skipped = checkpoint.unchecked(meta, checkpoint.adapter_settings(model) is not None)
        if skipped and dist.is_main:
            print(
                f"note: {resume_from} was written by an older tunelab and does not record "
                f"{', '.join(skipped)}: resuming without checking that they are unchanged (keep the "
                "run's config.yaml and data as they were)",
                file=sys.stderr,
            )
        if log.path is not None:  # only now: a refused resume leaves the run as it was
            # metrics.jsonl as it was at the checkpoint (the logger appends to it from here).
            checkpoint.restore_metrics(resume_from, log.path)
        start_step = meta["step"]
        best_eval = meta.get("best_eval_loss") or math.inf
        best_step = meta.get("best_step")
        ran_compiled = meta.get("compiled")
        window_loss, window_targets, *rest = meta.get("loss_window", (0.0, 0))
        resumed_tokens = rest[0] if rest else 0  # (checkpoints before it was kept: not known)
        log.print(f"resumed from {resume_from} at step {start_step}")
        log.advance(start_step)

    def run_eval(step: int) -> None:
        nonlocal best_eval, best_step, last_eval
        if not eval_examples:
            return
        # The bar stands still meanwhile (a large eval set takes a while): it says why.
        log.advance(step, f"evaluating {len(eval_examples):,} examples")
        eval_start = time.perf_counter()
        with _explain_out_of_memory(cfg, device, run_dir, log, f"evaluating at step {step}"):
            with compiling.paused(model):  # eagerly: a forward-only graph is not worth its warm-up
                last_eval = evaluate(
                    wrapped, eval_examples, cfg.micro_batch_tokens, device, varlen, dist, apart
                )
        log.log(
            {
                "step": step,
                "eval_loss": last_eval,
                "eval_ppl": math.exp(min(last_eval, 50)),
                "eval_examples": len(eval_examples),
                "eval_s": round(time.perf_counter() - eval_start, 3),
            }
        )
        log.advance(step)
        if step > 0 and last_eval < best_eval:
            best_eval, best_step = last_eval, step
            if not save:
                return
            weights = distributed.full_model_state(model, dist)  # FSDP: every rank helps gather
            if dist.is_main:
                with checkpoint.atomic_dir(run_dir / "best") as tmp:  # never half-written, even if killed
                    save_model(model, tokenizer, tmp, template, weights)

    def replicas_agree(when: str) -> None:
        """Several processes (DDP): every replica holds the same weights, or the run stops."""
        try:
            distributed.check_replicas(model, dist, when)
        except TunelabError:
            log.close()
            raise

    plans: dict[int, list[list[list[int]]]] = {}  # the current epoch's only

    def epoch_plan(epoch: int) -> list[list[list[int]]]:
        nonlocal plans
        if epoch not in plans:
            plan = plan_epoch(lengths, cfg.batch_size, cfg.micro_batch_tokens, cfg.seed, epoch)
            plans = {epoch: [one_per_pass(step, apart) for step in plan]}
        return plans[epoch]

    def packed_step(step: int) -> list[PackedBatch]:
        """The step's micro-batches, packed."""
        epoch, index = divmod(step, steps_per_epoch)
        return [collate([train_examples[i] for i in mb], varlen) for mb in epoch_plan(epoch)[index]]

    checks_memory = device.type in FAIL_FAST_DEVICES
    warmed = False  # the layers were compiled in the probe below, before the first step
    if (checks_memory or short_run_rule) and start_step < total_steps:
        # Fail fast (a GPU): the largest micro-batch goes forward and backward once before anything
        # else, so a budget that does not fit stops the run in its first seconds, not hours in. There
        # too, compile: auto times it uncompiled (on a CPU that is all this does) and compiles it first.
        plan = epoch_plan(start_step // steps_per_epoch)
        largest = max((mb for mbs in plan for mb in mbs), key=lambda mb: sum(lengths[i] for i in mb))
        # Its passes draw no random numbers from the run (dropout): a resumed run, which probes
        # again, goes on from the very state the uninterrupted one had.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            batch = collate([train_examples[i] for i in largest], varlen).to(device)
            probe_start = time.perf_counter()

            def one_pass(run: Callable[..., Any]) -> None:
                with distributed.gradient_sync(wrapped, dist, sync=True):
                    loss = loss_sum(run, batch)
                    if loss.requires_grad:
                        loss.backward()
                optimizer.zero_grad(set_to_none=True)

            def fits(run: Callable[..., Any]) -> None:
                where = f"on the largest micro-batch ({batch.n_tokens:,} tokens)"
                with _explain_out_of_memory(cfg, device, run_dir, log, where):
                    one_pass(run)

            if checks_memory:  # (elsewhere the line on what auto decided follows in a second)
                log.print(
                    f"checking that the largest micro-batch ({batch.n_tokens:,} tokens) fits"
                    + (" (compiling the model first)" if compiled and not short_run_rule else "")
                )
            probed = False  # the largest micro-batch went forward and backward as the run will train
            if short_run_rule and ran_compiled is not None:
                # Resumed: as the run began, or it would go on with other arithmetic than the
                # uninterrupted run (compiled code rounds differently), timed shorter now.
                if not ran_compiled:
                    forward, compiled = compiling.eager(wrapped, model), False
                    probed = not checks_memory  # nothing to try on a CPU
                log.print(
                    f"resumed {'compiled' if ran_compiled else 'uncompiled'}, as the run began (compile: auto)"
                )
            elif short_run_rule:
                tokens_left = sum(lengths) / steps_per_epoch * (total_steps - start_step)
                eager_s = _uncompiled_seconds(
                    lambda: one_pass(wrapped), model, batch.n_tokens, tokens_left, device
                )
                if eager_s is not None and eager_s < compiling.WORTH_S[device.type]:
                    forward, compiled, probed = compiling.eager(wrapped, model), False, True
                    log.print(
                        f"a short run (about {eager_s:.0f} s of steps uncompiled): training without "
                        "torch.compile, whose warm-up would take longer (--train.compile=true compiles anyway)"
                    )
                elif eager_s is not None:
                    log.print(
                        f"about {eager_s / 60:.0f} min of steps uncompiled: compiling the model, its warm-up pays"
                    )
            try:
                if not probed:
                    fits(forward)
            except compiling.BackendCompilerFailed as e:
                if not (compiled and cfg.compile == "auto"):
                    raise  # train.compile: true: compiling.scope says what to do
                # auto: compiling only makes training faster; where it fails here, train without it.
                optimizer.zero_grad(set_to_none=True)
                forward, compiled = compiling.eager(wrapped, model), False
                log.print(f"torch.compile failed ({compiling.failed(e)}); training without it")
                fits(forward)
            took = time.perf_counter() - probe_start
            if checks_memory:
                compiling_too = ", compiling included" if compiled else ""
                log.print(f"it fits: {memory_text(device)}; {took:.0f} s{compiling_too}")
            elif compiled:
                log.print(f"compiled in {took:.0f} s")
            warmed = compiled

    if start_step == 0:
        run_eval(0)  # the starting point, so every later number has something to be compared with

    if compiled and not warmed and start_step < total_steps:
        # Else the bar stands at the first step, with no word, for as long as compiling takes.
        log.print(
            "the first step compiles the model (torch.compile's warm-up): it takes longer than the rest"
        )
        log.advance(start_step, "compiling")

    # ---- train
    t0 = time.perf_counter()
    first_step_s = 0.0  # this process's first step (compiling, on a CPU): left out of the ETA
    window_tokens, window_time, loss_value, tokens_per_s = 0, 0.0, math.nan, 0.0
    run_tokens, run_time = 0, 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    upcoming = packed_step(start_step) if start_step < total_steps else []
    for step in range(start_step, total_steps):
        tick = time.perf_counter()
        micro_batches = upcoming
        n_targets = sum(b.n_targets for b in micro_batches)  # the whole step's, known on every rank
        distributed.fail_for_test(step + 1, dist)
        step_loss = torch.zeros((), device=device)  # summed on the device: no wait per micro-batch
        # Several processes: this rank's share of the micro-batches, gradients synced after the last.
        share = distributed.deal(micro_batches, dist)
        largest = max(b.n_tokens for b in micro_batches)
        with _explain_out_of_memory(
            cfg, device, run_dir, log, f"at step {step + 1}, in a {largest:,}-token micro-batch"
        ):
            for i, (batch, counts) in enumerate(share):
                batch = batch.to(device)
                with distributed.gradient_sync(wrapped, dist, sync=i == len(share) - 1):
                    loss = loss_sum(forward, batch) / max(n_targets, 1)
                    if not counts:
                        loss = loss * 0.0  # a stand-in pass: it keeps this rank in step and adds nothing
                    if loss.requires_grad:
                        # DDP/FSDP average gradients over ranks; times world_size, that average is the
                        # step's sum / n_targets, as on one process (where this multiplies by 1, exactly).
                        (loss * dist.world_size).backward()
                step_loss += loss.detach()
        # The update is queued behind the backward pass with no wait: the clipping norm stays on
        # the device until after it.
        norm = None
        if cfg.grad_clip:
            params = [p for p in model.parameters() if p.requires_grad]
            norm = distributed.local_value(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        with _explain_out_of_memory(
            cfg, device, run_dir, log, f"in the update at step {step + 1}", optimizer=True
        ):
            optimizer.step()
        step_lr = scheduler.get_last_lr()[0]  # the rate this step trained with (logged below)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # Pack the next step while the GPU still works on this one (counted in this step's time).
        upcoming = packed_step(step + 1) if step + 1 < total_steps else []
        # The step's loss and the norm, read together: the host waits for the device here, once per
        # step, for the whole step's work (the update included: it is queued before).
        read = torch.stack([step_loss.float(), *([] if norm is None else [norm.float()])]).tolist()
        step_loss = distributed.all_sum(read[:1], dist)[0]  # equal on every rank
        grad_norm = read[1] if norm is not None else None
        if not math.isfinite(step_loss):
            # This loss came from the weights after `step` updates, so a checkpoint of that step holds
            # the very weights that diverged; the good ones are older.
            saved = checkpoint.complete_checkpoints(run_dir / "checkpoints")
            last = [c for c in saved if checkpoint.step_of(c) < step]
            log.close()
            raise TrainingDiverged(
                f"loss became {step_loss} at step {step + 1}",
                f"lower train.lr or check the data; last good checkpoint: {last[-1] if last else 'none'}",
            )
        window_time += time.perf_counter() - tick
        window_tokens += sum(b.n_tokens for b in micro_batches)
        run_time += time.perf_counter() - tick
        run_tokens += sum(b.n_tokens for b in micro_batches)
        if step == start_step:
            first_step_s = time.perf_counter() - t0
        window_loss += step_loss * n_targets
        window_targets += n_targets
        done = step + 1

        if done % cfg.log_every == 0 or done == total_steps:
            loss_value = window_loss / window_targets if window_targets else step_loss
            tokens_per_s = window_tokens / max(window_time, 1e-9)
            elapsed = time.perf_counter() - t0
            record = {
                "step": done,
                "epoch": round(done / steps_per_epoch, 4),
                "loss": loss_value,
                "lr": step_lr,  # the logged step's own (the scheduler has moved on to the next's)
                "grad_norm": grad_norm,
                "tokens": resumed_tokens + window_tokens,  # real tokens since the last log line
                "targets": window_targets,  # of which trained (with a label): the loss's weights
                "tokens_per_s": tokens_per_s,
                "elapsed_s": elapsed,
                "eta_s": (elapsed - first_step_s) / (done - start_step - 1) * (total_steps - done)
                if done - start_step > 1
                else elapsed * (total_steps - done),
                "mfu": flops_per_token * tokens_per_s / peak if peak else None,
                "peak_mem_gib": peak_memory_gib(device),
            }
            log.log(record)
            window_tokens, window_time, resumed_tokens = 0, 0.0, 0
            window_loss, window_targets = 0.0, 0
        log.advance(done, f"loss {step_loss:.4f}")
        if eval_every and done % eval_every == 0 and done != total_steps:
            run_eval(done)
        if cfg.save_every and done % cfg.save_every == 0 and done != total_steps:
            meta = {
                "epoch": round(done / steps_per_epoch, 4),
                "total_steps": total_steps,
                "data": data_id,
                "eval_data": eval_id,
                "best_eval_loss": best_eval if best_step else None,
                "best_step": best_step,
                "compiled": compiled,  # what compile: auto decided, for a resumed run to go on alike
                # steps not logged yet: their loss, trained and real tokens
                "loss_window": [window_loss, window_targets, resumed_tokens + window_tokens],
                "train": checkpoint.trajectory(cfg),  # the settings a resume must not change
                "lora": checkpoint.adapter_settings(model),  # and the adapter's (None: no adapter)
            }
            # Several processes: every rank helps gather the state (FSDP), rank 0 alone writes it.
            replicas_agree(f"at step {done}")
            state = distributed.training_state(model, optimizer, dist)
            if dist.is_main:
                checkpoint.save(
                    run_dir / "checkpoints", done, state, scheduler, meta, cfg.keep_last, log.path
                )

    # ---- finish
    replicas_agree("at the end of training")
    run_eval(total_steps)
    if save:
        weights = distributed.full_model_state(model, dist)
        if dist.is_main:
            with checkpoint.atomic_dir(run_dir / "final") as tmp:
                save_model(model, tokenizer, tmp, template, weights)
    distributed.barrier(dist)  # no rank returns before final/ is whole
    log.close()
    return TrainResult(
        run_dir=run_dir,
        steps=total_steps,
        final_loss=loss_value,
        eval_loss=last_eval,
        best_eval_loss=best_eval if best_step else None,
        best_step=best_step,
        tokens_per_s=tokens_per_s,
        mean_tokens_per_s=run_tokens / max(run_time, 1e-9),
        peak_mem_gib=peak_memory_gib(device),
        compiled=compiled,
    )
