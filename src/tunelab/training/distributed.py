"""Several processes, one run: the same config under `torchrun` or `accelerate launch`, on PyTorch's
own engines — `DistributedDataParallel` (replicas) or FSDP2 `fully_shard` (weights, gradients and
optimizer state sharded per decoder layer).

How a step is shared. Every rank holds the whole (seeded) epoch plan, so every rank knows the step's
micro-batches and its count of trained tokens without asking the others. The micro-batches are dealt
round-robin (rank r runs r, r+W, r+2W, ...) and each rank's loss is `sum / global_count * W`: DDP and
FSDP average gradients over the W ranks, which turns that into the step's `sum / global_count`, the
gradient one process gets with the same global batch. Every rank runs the same number of passes,
because FSDP gathers weights in every forward and DDP syncs in the last backward: a rank short of
work runs a stand-in pass counted as zero. Gradients are synced once per step, after the last pass.

A checkpoint is the single-process one, whole: FSDP shards are gathered to rank 0 (`torch.distributed.
checkpoint.state_dict`, full_state_dict + cpu_offload), which alone writes; on resume every rank reads
the file and keeps its own shard. So a run resumes under any world size, one process included.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import math
import os
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch
import torch.distributed as tdist

from tunelab.data.packing import PackedBatch
from tunelab.errors import ConfigError, TunelabError
from tunelab.models import decoder_layers
from tunelab.training import checkpoint

# A collective that waits longer than this raises instead of hanging (a rank died without its
# process exiting, or rank 0 spends that long writing best/ or a checkpoint while the others wait).
TIMEOUT_ENV = "TUNELAB_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300
# Tests only: `TUNELAB_TEST_FAIL_RANK=RANK:STEP` raises on that rank when that step starts.
FAIL_ENV = "TUNELAB_TEST_FAIL_RANK"
# How long a rank whose collective broke because a peer died waits for the launcher to stop it.
PEER_GRACE_S = 5


@dataclass(frozen=True)
class Dist:
    """Where this process stands: `mode` "none" is the plain single-process loop."""

    mode: Literal["none", "ddp", "fsdp"] = "none"
    rank: int = 0
    world_size: int = 1
    # Where collectives put their tensors: the GPU for nccl, the CPU for gloo.
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def launched_world_size() -> int:
    """The number of processes the launcher started (torchrun and accelerate set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(requested: str, device: torch.device, method: str = "full") -> Dist:
    """Join the launcher's process group (once per process) and say which engine wraps the model.

    One process trains plainly whatever `requested` says: DDP or FSDP over one rank would only add
    overhead, and this keeps single-process resume bit-exact."""
    world = launched_world_size()
    if world == 1:
        return SINGLE
    if requested == "fsdp" and method == "qlora":
        raise ConfigError(
            "train.distributed 'fsdp' cannot shard QLoRA's 4-bit weights",
            "use --train.distributed=ddp with qlora, or --train.method=lora",
        )
    if not tdist.is_initialized():
        if device.type == "cuda":
            # Before the model loads, so `.to("cuda")` puts each rank on its own GPU.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        # MASTER_ADDR/MASTER_PORT (or torchrun's rendezvous) come from the environment (env://).
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        atexit.register(tdist.destroy_process_group)
    comm = torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else torch.device("cpu")
    mode = "ddp" if requested == "auto" else requested
    return Dist(mode, tdist.get_rank(), tdist.get_world_size(), comm)  # type: ignore[arg-type]


def wrap(model: Any, dist: Dist) -> Any:
    """The module to run forward and backward through: DDP around `model`, or `model` itself sharded
    in place by FSDP2 (each decoder layer, then the root: embeddings, final norm and head)."""
    if dist.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist.device.index] if dist.device.type == "cuda" else None
        # Buffers (rotary tables) are equal on every rank: not syncing them in every forward saves a
        # broadcast per micro-batch. torch 2.13 renamed the switch; the GPU image has torch 2.11.
        params = inspect.signature(DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
        return DistributedDataParallel(model, device_ids=ids, **no_sync)
    if dist.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
    return model


def deal(micro_batches: list[PackedBatch], dist: Dist) -> list[tuple[PackedBatch, bool]]:
    """This rank's passes for one step (or one evaluation), as (batch, counts) pairs.

    Round-robin: rank r takes micro-batches r, r+W, ... Every rank makes the same number of passes;
    where a rank has no micro-batch left, or one without a trained token (which would skip the
    forward), it runs the step's richest micro-batch as a stand-in that counts for nothing."""
    if dist.world_size == 1 or not micro_batches:
        return [(b, True) for b in micro_batches]
    stand_in = max(micro_batches, key=lambda b: b.n_targets)
    mine = micro_batches[dist.rank :: dist.world_size]
    passes = math.ceil(len(micro_batches) / dist.world_size)
    share = [(b, True) if b.n_targets else (stand_in, False) for b in mine]
    return share + [(stand_in, False)] * (passes - len(mine))


@contextlib.contextmanager
def gradient_sync(module: Any, dist: Dist, sync: bool) -> Iterator[None]:
    """Let the backward inside reduce gradients across ranks only when `sync` (the step's last pass):
    until then they accumulate locally."""
    if dist.mode == "ddp" and not sync:
        with module.no_sync():
            yield
        return
    if dist.mode == "fsdp":
        module.set_requires_gradient_sync(sync)
    yield


def all_sum(values: list[float], dist: Dist) -> list[float]:
    """Element-wise sums over ranks (in float64), the same on every rank; one process: `values`."""
    if dist.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    tdist.all_reduce(t)
    return t.tolist()


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor for a DTensor result (e.g. FSDP's clipped grad norm, replicated on all ranks)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def barrier(dist: Dist) -> None:
    if dist.world_size > 1:
        tdist.barrier()


def broadcast_path(path: Path | None, dist: Dist) -> Path:
    """Rank 0's choice of a path (e.g. the timestamped run directory), on every rank."""
    if dist.world_size == 1:
        assert path is not None
        return path
    box = [str(path) if dist.is_main else None]
    tdist.broadcast_object_list(box, src=0)
    return Path(box[0])  # type: ignore[arg-type]


def check_same_data(fingerprint: str, dist: Dist) -> None:
    """Every rank must have encoded the same examples (the same files on every node), or the dealt
    micro-batches would not be the ones the plan names."""
    if dist.world_size == 1:
        return
    seen: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(seen, fingerprint)
    if len(set(seen)) > 1:
        raise TunelabError(
            f"the ranks read different training data (fingerprints {seen})",
            "give every node the same data files at the same paths",
        )


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def weights_checksum(model: Any) -> int:
    """The trained weights' bits summed as integers (wrapping): equal weights, equal sums, whatever
    the order of the additions."""
    total = None
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                bits = p.detach().contiguous().view(-1).view(_BITS[p.element_size()])
                part = bits.sum(dtype=torch.int64)
                total = part if total is None else total + part
    return 0 if total is None else int(total)


def check_replicas(model: Any, dist: Dist, when: str) -> None:
    """DDP's replicas must hold the same weights: the same averaged gradients and a deterministic update
    (the stochastic rounding into bf16 weights draws the same bits on every rank). Ranks that differ
    trained different models, and the one rank 0 saves would be only one of them: stop, loudly."""
    if dist.mode != "ddp" or dist.world_size == 1:
        return
    sums: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(sums, weights_checksum(model))
    if len(set(sums)) > 1:
        raise TunelabError(
            f"the data-parallel replicas hold different weights {when} (checksums by rank: {sums})",
            "this is a tunelab bug: please report it with RUN/config.yaml; meanwhile train on one "
            "process or with --train.distributed=fsdp",
        )


def fail_for_test(step: int, dist: Dist) -> None:
    """The test hook behind FAIL_ENV: a rank that raises mid-run must stop the launch, not hang it."""
    spec = os.environ.get(FAIL_ENV)
    if spec and spec == f"{dist.rank}:{step}":
        raise RuntimeError(f"{FAIL_ENV}: simulated failure on rank {dist.rank} at step {step}")


def exit_failed(e: BaseException, code: int, record: bool = True) -> NoReturn:
    """End a rank that failed (its error already printed): written where torchrun looks for it
    (TORCHELASTIC_ERROR_FILE, so its summary shows this error as the root cause), then exit at once.
    Python's own shutdown with a process group alive took 6-9 s here, while the other ranks waited."""
    if record:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(e)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def report_failure(e: Exception, rank: int) -> NoReturn:
    """Print a rank's unexpected error with its rank and traceback, and exit (called by the CLI).

    A rank whose collective broke because another rank died reports in one line and waits: torchrun
    then sees the rank that failed first exit first, stops this one, and names the right root cause
    (its summary picks the earliest failure, to the second, the lowest rank on a tie)."""
    if _peer_died(e):
        print(
            f"error (rank {rank}): stopped because another rank failed: {type(e).__name__}: {e}",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(PEER_GRACE_S)
        exit_failed(e, 1, record=False)
    traceback.print_exc()
    print(f"error (rank {rank}): {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    exit_failed(e, 1)


def _peer_died(e: Exception) -> bool:
    # gloo raises RuntimeError("... Connection closed by peer ... remote worker crashing"); NCCL's
    # watchdog raises DistBackendError (or aborts the process).
    text = str(e)
    return isinstance(e, tdist.DistError) or any(s in text for s in ("closed by peer", "reset by peer"))


# ---------------------------------------------------------------- state: whole on disk, any world size

_FULL = dict(full_state_dict=True, cpu_offload=True)


def full_model_state(model: Any, dist: Dist) -> dict[str, torch.Tensor] | None:
    """The unsharded weights for `save_pretrained` on rank 0 (None elsewhere, and when the model is
    not sharded: it then saves its own). Under FSDP every rank must call it: it gathers."""
    if dist.mode != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # An adapter's folder holds only the adapter: the frozen base is not gathered at all.
    frozen = hasattr(model, "peft_config")
    state = get_model_state_dict(model, options=StateDictOptions(**_FULL, ignore_frozen_params=frozen))
    if not dist.is_main:
        return None
    # A tied head is gathered as a tensor of its own; saved unshared it would be written twice.
    return {k: v for k, v in state.items() if k not in _tied_aliases(model)}


def training_state(model: Any, optimizer: torch.optim.Optimizer, dist: Dist) -> dict[str, Any]:
    """What `checkpoint.save` writes, whole and in the single-process layout, on rank 0 ({} on the
    others). Every rank must call it: FSDP shards are gathered and every rank's RNG state is kept."""
    if dist.world_size == 1:
        return checkpoint.training_state(model, optimizer)
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(**_FULL, ignore_frozen_params=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    rngs: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(rngs, checkpoint.rng_state())
    if not dist.is_main:
        return {}
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # tied weights: one name
    return {
        "model": {n: weights[n] for n in names},
        "optimizer": _by_index(optim),
        "rng": rngs[0],  # what one process resumes with
        "rank_rng": rngs,  # what each rank resumes with, under the same world size
    }


def load_checkpoint(
    path: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, dist: Dist
) -> dict[str, Any]:
    """`checkpoint.load` for any world size: every rank reads the whole checkpoint (the run directory
    must be visible to every node) and keeps what it holds: all of it under DDP, its shard under FSDP."""
    if dist.world_size == 1:
        return checkpoint.load(path, model, optimizer, scheduler)
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state, meta = checkpoint.read(path)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    checkpoint.check_fits(path, state["model"], params)
    weights = dict(state["model"])
    for alias, owner in _tied_aliases(model).items():  # a tied head is loaded under both names
        if owner in weights:
            weights[alias] = weights[owner]
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(
        model, optimizer, _by_name(state["optimizer"], model, optimizer), options=options
    )
    scheduler.load_state_dict(state["scheduler"])
    rngs = state.get("rank_rng")
    checkpoint.set_rng_state(rngs[dist.rank] if rngs and len(rngs) == dist.world_size else state["rng"])
    return meta


def _tied_aliases(model: Any) -> dict[str, str]:
    """Second names of shared parameters, e.g. a tied head: {"lm_head.weight": "model.embed_tokens.weight"}."""
    owner = {id(p): n for n, p in model.named_parameters()}  # which names each shared tensor once
    return {
        n: owner[id(v)]
        for n, v in model.state_dict(keep_vars=True).items()
        if id(v) in owner and owner[id(v)] != n
    }


def _by_index(optim: dict[str, Any]) -> dict[str, Any]:
    """A parameter-name-keyed optimizer state (torch.distributed.checkpoint's) in `Optimizer.state_dict`'s
    layout: parameters numbered in param-group order."""
    order = [name for group in optim["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    return {
        "state": {index[name]: s for name, s in optim["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim["param_groups"]],
    }


def _by_name(optim: dict[str, Any], model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The inverse of `_by_index`, with this optimizer's parameters."""
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {order[i]: s for i, s in optim["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in optim["param_groups"]],
    }
