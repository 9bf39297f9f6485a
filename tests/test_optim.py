"""training/optim.py: AdamW with stochastic rounding into bf16 weights. torch's AdamW exactly on fp32
weights; on bf16 weights an unbiased rounding, so updates below bf16's spacing still add up (with
round-to-nearest they vanish); deterministic in (seed, step), so replicas agree and a resumed run is
the same run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl
from test_resume import assert_same_run
from tunelab import cli
from tunelab.training.optim import AdamW


def pairs(shapes, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return [torch.randn(s, dtype=dtype).requires_grad_() for s in shapes]


SHAPES = [(37, 11), (5,), (300,), (2, 3, 4)]


def test_fp32_weights_get_torch_adamw_exactly():
    """Two groups (weight decay on one), slices smaller than some weights: bit for bit torch's."""
    ours, ref = pairs(SHAPES), pairs(SHAPES)
    opt = AdamW([{"params": ours[:2], "weight_decay": 0.1}, {"params": ours[2:]}], lr=1e-2, chunk=100)
    torch_opt = torch.optim.AdamW(
        [{"params": ref[:2], "weight_decay": 0.1}, {"params": ref[2:], "weight_decay": 0.0}],
        lr=1e-2,
        foreach=False,
    )
    for step in range(6):
        grads = pairs(SHAPES, seed=100 + step)
        for a, b, g in zip(ours, ref, grads):
            a.grad, b.grad = g.detach().clone(), g.detach().clone()
        opt.step()
        torch_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))


def test_bf16_rounding_is_unbiased_and_lands_on_a_neighbour():
    """lr 1e-5 on weights of ±0.02, where bf16's spacing is 2^-13 = 1.2e-4: torch's round-to-nearest
    leaves every weight where it was; stochastic rounding moves each to one of the two bf16 values
    around the exact result, on average to the exact result."""
    start = torch.tensor([0.02] * 100_000 + [-0.02] * 100_000, dtype=torch.bfloat16)
    weight = start.clone().requires_grad_()
    weight.grad = torch.ones_like(weight)  # Adam's first step: every weight moves by lr, downwards
    AdamW([weight], lr=1e-5).step()
    exact = start.double() - 1e-5
    got = weight.detach().double()
    assert torch.all((got == start.double()) | (got == start.double() - 2.0**-13))
    for half in (slice(0, 100_000), slice(100_000, None)):
        mean_error = float((got[half] - exact[half]).mean())
        assert abs(mean_error) < 1e-6, mean_error  # sampling noise: ~1e-7 for 100k weights
    nearest = start.clone().requires_grad_()
    nearest.grad = torch.ones_like(nearest)
    torch.optim.AdamW([nearest], lr=1e-5).step()
    assert torch.equal(nearest.detach(), start)  # torch's rounding: not one weight moved


def test_small_updates_add_up_in_bf16_as_in_fp32():
    """Push 4,096 weights towards a target with lr 1e-5 for 2,000 steps: fp32 covers two thirds of
    the way (measured: 0.0227 -> 0.0080 mean distance), bf16 with stochastic rounding as far (0.0073),
    bf16 with torch's round-to-nearest 3 % of it (0.0221)."""
    torch.manual_seed(0)
    target = torch.randn(4096) * 0.02
    start = torch.randn(4096) * 0.02

    def fit(dtype, optimizer):
        w = start.detach().to(dtype).clone().requires_grad_()
        opt = optimizer([w])
        for _ in range(2000):
            w.grad = (w.detach().float() - target).sign().to(dtype)  # a fixed-size push towards the target
            opt.step()
        return float((w.detach().float() - target).abs().mean())

    fp32 = fit(torch.float32, lambda ps: torch.optim.AdamW(ps, lr=1e-5))
    stochastic = fit(torch.bfloat16, lambda ps: AdamW(ps, lr=1e-5))
    nearest = fit(torch.bfloat16, lambda ps: torch.optim.AdamW(ps, lr=1e-5))
    before = float((start - target).abs().mean())
    assert fp32 < 0.4 * before
    assert stochastic < fp32 + 0.1 * (before - fp32)  # within a tenth of the way fp32 went
    assert nearest > 0.9 * before  # torch's rounding: nearly all of the way still to go


def test_same_seed_and_step_round_the_same_way_and_resume_exactly():
    def run(steps, resume_at=None, seed=0):
        weights = pairs(SHAPES, dtype=torch.bfloat16)
        opt = AdamW(weights, lr=1e-3, seed=seed)
        for step in range(steps):
            if step == resume_at:  # a fresh optimizer and weights, loaded from a state dict
                state, values = opt.state_dict(), [w.detach().clone() for w in weights]
                weights = [v.clone().requires_grad_() for v in values]
                opt = AdamW(weights, lr=1e-3, seed=seed)
                opt.load_state_dict(state)
            for w, g in zip(weights, pairs(SHAPES, dtype=torch.bfloat16, seed=100 + step)):
                w.grad = g.detach()
            opt.step()
        return weights

    whole = run(8)
    assert all(torch.equal(a, b) for a, b in zip(whole, run(8)))
    assert all(torch.equal(a, b) for a, b in zip(whole, run(8, resume_at=3)))
    assert not all(torch.equal(a, b) for a, b in zip(whole, run(8, seed=1)))


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_the_loop_picks_the_update_by_dtype_and_a_bf16_run_resumes_exactly(
    rounding, llama_dir, tmp_path, capsys
):
    rows = [
        {"question": f"What is {a} times {b}?", "answer": f"{a * b}"}
        for a in range(1, 7)
        for b in range(1, 7)
    ]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    run = tmp_path / "run"
    args = ["train", "--model", str(llama_dir), "--data", str(data), "--train.method=full",
            "--model.dtype=bfloat16", "--model.device=cpu", f"--train.bf16_rounding={rounding}", "--train.max_steps=12",
            "--train.batch_size=4", "--train.lr=1e-4", "--train.save_every=6", "--train.eval_every=6",
            "--train.log_every=1"]  # fmt: skip
    assert cli.main([*args, "--out", str(run)]) == 0
    first = capsys.readouterr().err
    said = "stochastic rounding" in " ".join(first.split())
    assert said is (rounding == "stochastic"), first
    if rounding == "nearest":
        return
    # As if killed after the last step: the checkpoint of step 6 carries it to the same end.
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "final")
    assert cli.main(["train", "--resume", str(resumed), "--quiet"]) == 0
    assert_same_run(resumed, run)


def test_the_fused_kernel_takes_the_same_update():
    """sr_kernel's one-kernel update (used for bf16 weights on a GPU with Triton): the moments as the
    list path computes them (to their bf16 rounding), the new weight on one of the two bf16 values
    around the exact AdamW result and unbiased, the same bits for the same seed. On a GPU for real;
    elsewhere under Triton's interpreter, in a process of its own (the interpreter must be chosen
    before Triton is first imported)."""
    pytest.importorskip("triton", reason="Triton is the GPU's kernel language (it ships with CUDA torch)")
    if torch.cuda.is_available():
        check_fused_kernel("cuda")
        check_one_launch_kernel("cuda")
        return
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_optim; test_optim.check_fused_kernel('cpu'); "
        "test_optim.check_one_launch_kernel('cpu')"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def check_fused_kernel(device: str) -> None:
    from tunelab.training import optim, sr_kernel

    update = sr_kernel.update_fn()
    assert update is not None
    torch.manual_seed(0)
    n = 50_000
    start = [(torch.randn(n) * 0.02), torch.randn(n), torch.randn(n) * 0.1, torch.rand(n) * 1e-2]
    start = [t.to(torch.bfloat16).to(device) for t in start]
    hyper = dict(beta1=0.9, beta2=0.999, lr=1e-3, decay=0.1, eps=1e-8, step=3)

    fused = [t.clone() for t in start]
    update(*fused, **hyper, seed=7)
    again = [t.clone() for t in start]
    update(*again, **hyper, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(fused, again))

    listed = [t.clone() for t in start]
    group = {"betas": (0.9, 0.999), "lr": 1e-3, "weight_decay": 0.1, "eps": 1e-8}
    optim._update([tuple(listed)], group, 3, torch.Generator(device=device).manual_seed(7))
    for a, b in zip(fused[2:], listed[2:]):  # the moments: equal to within a bf16 rounding or two
        assert bool(((a.double() - b.double()).abs() <= 2**-7 * b.double().abs() + 1e-6).all())

    w, g, m, v = (t.double() for t in start)  # the exact update, in float64
    m = m + 0.1 * (g - m)
    v = v * 0.999 + 0.001 * g * g
    exact = w * (1 - 1e-3 * 0.1) - 1e-3 / (1 - 0.9**3) * m / (v.sqrt() / (1 - 0.999**3) ** 0.5 + 1e-8)
    spacing = torch.pow(2.0, torch.frexp(exact)[1].double() - 8)  # bf16: 8 significant bits
    error = fused[0].double() - exact
    assert bool((error.abs() < spacing).all())  # one of the two neighbours
    # Unbiased, measured along each weight's sign (a rounding biased towards zero cancels in a plain
    # mean over weights of both signs): within 10 standard errors.
    assert abs(float((error * exact.sign()).mean())) < 5 * float(spacing.mean()) / n**0.5


def check_one_launch_kernel(device: str) -> None:
    """sr_kernel.update_many_fn: a list of bf16 weights of assorted sizes (one element, a block, a
    block and one, ...) in one launch gets exactly the per-weight kernel's update, bits included,
    also on a second step with the same sizes (its block table kept) and with other sizes; it
    refuses tensors it cannot read as flat bf16."""
    from tunelab.training import sr_kernel

    one, many = sr_kernel.update_fn(), sr_kernel.update_many_fn()
    assert one is not None and many is not None
    block = sr_kernel.BLOCK

    def weights(sizes: list[int]) -> list[tuple[torch.Tensor, ...]]:
        torch.manual_seed(len(sizes))
        return [
            tuple(t.to(torch.bfloat16).to(device) for t in (torch.randn(n) * 0.02, torch.randn(n), torch.randn(n) * 0.1, torch.rand(n) * 1e-2))
            for n in sizes
        ]  # fmt: skip

    for sizes in ([3 * block + 5, 1, block, block + 1, 2000], [7, block - 1]):
        seeds = [100 + i for i in range(len(sizes))]
        ref, got = weights(sizes), weights(sizes)
        for step in (1, 2):
            hyper = dict(beta1=0.9, beta2=0.999, lr=1e-3, decay=0.1, eps=1e-8, step=step)
            for quad, seed in zip(ref, seeds):
                one(*quad, **hyper, seed=seed)
            many(got, seeds, **hyper)
            assert all(torch.equal(a, b) for qr, qg in zip(ref, got) for a, b in zip(qr, qg)), (sizes, step)
        assert not torch.equal(got[0][0], weights(sizes)[0][0])  # it did update
    odd = weights([8])[0]
    with pytest.raises(ValueError, match="contiguous bf16"):
        many([(odd[0].float(), *odd[1:])], [1], beta1=0.9, beta2=0.999, lr=1e-3, decay=0.0, eps=1e-8, step=1)


def test_both_kernels_compile_for_an_h100_without_one():
    """Triton compiles ahead for a GPU it does not have: both kernels (the one-launch one casts
    integers from a table into pointers, which Triton's CPU interpreter takes on trust) build to
    Hopper machine code (sm_90) on a machine with no GPU, so the GPU run does not find out first."""
    pytest.importorskip("triton", reason="Triton is the GPU's kernel language (it ships with CUDA torch)")
    code = "import sys; sys.path.insert(0, sys.argv[1]); import test_optim; test_optim.compile_for_hopper()"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    if "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("this Triton has no ptxas to build GPU code with")
    assert done.returncode == 0, done.stderr[-3000:]


def compile_for_hopper() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tunelab.training import sr_kernel

    floats = dict.fromkeys(["beta1", "beta2", "keep", "step_size", "bc2_sqrt", "eps"], "fp32")
    one = {
        **dict.fromkeys(["w_ptr", "g_ptr", "m_ptr", "v_ptr"], "*bf16"),
        "n": "i32",
        **floats,
        "seed": "i32",
    }
    many = {"blocks_ptr": "*i32", "rows_ptr": "*i64", **floats}
    for launcher, signature in ((sr_kernel.update_fn(), one), (sr_kernel.update_many_fn(), many)):
        src = ASTSource(
            fn=launcher.kernel, signature={**signature, "BLOCK": "constexpr"}, constexprs={"BLOCK": 1024}
        )
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"]


def test_bf16_weights_go_to_one_launch_and_the_rest_one_at_a_time(caplog):
    """The dispatch around sr_kernel's one-launch update, with stand-in kernels: every weight whose
    four tensors are contiguous bf16 goes to it, with its per-weight seed; one with fp32 moments goes
    to the per-weight kernel, a non-contiguous one to the list path. A failing one-launch kernel
    hands its weights to the per-weight kernel, said in the log, for good."""
    weights = pairs(SHAPES, dtype=torch.bfloat16)
    opt = AdamW(weights, lr=1e-3)
    quads = [(w, w, w, w) for w in weights]
    fp32_moments = (weights[0], weights[0], weights[0].float(), weights[0].float())
    odd = torch.zeros(4, 6, dtype=torch.bfloat16).t()
    quads[1:1] = [fp32_moments, (odd, odd, odd, odd)]
    batched, single = [], []
    opt._kernel = lambda weight, *rest, seed, **hyper: single.append((weight, seed))
    opt._many = lambda qs, seeds, **hyper: batched.append(([q[0] for q in qs], seeds))
    key = (0, 1, 0, 0)
    left = opt._fused(quads, opt.param_groups[0], 1, key)
    ((got, seeds),) = batched
    expected = [i for i in range(len(quads)) if i not in (1, 2)]
    assert [id(w) for w in got] == [id(quads[i][0]) for i in expected]
    assert seeds == [hash((*key, i)) % 2**31 for i in expected]
    assert single == [(fp32_moments[0], hash((*key, 1)) % 2**31)] and [q[0] for q in left] == [odd]

    def broken(qs, seeds, **hyper):
        raise RuntimeError("no kernel image for this GPU")

    opt._many, single[:] = broken, []
    left = opt._fused(quads, opt.param_groups[0], 2, key)
    assert "launching it per weight" in caplog.text and opt._many is None
    assert [id(w) for w, _ in single] == [id(q[0]) for q in quads if q[0] is not odd] and len(left) == 1


def test_a_kernel_launch_that_fails_leaves_the_rest_to_the_list_path(caplog):
    """The dispatch around sr_kernel (a GPU's path), with a stand-in kernel: weights it updated stay
    updated, the failing one and those after it go to the list path, and so does every later step;
    a weight whose memory is not contiguous never reaches the kernel."""
    weights = pairs(SHAPES, dtype=torch.bfloat16)
    opt = AdamW(weights, lr=1e-3)
    quads = [(w, w, w, w) for w in weights]
    odd = torch.zeros(4, 6, dtype=torch.bfloat16).t()  # not contiguous
    quads.insert(1, (odd, odd, odd, odd))
    seen = []

    def kernel(weight, *rest, **hyper):
        if len(seen) == 2:
            raise RuntimeError("no kernel image for this GPU")
        seen.append(weight)

    opt._kernel = kernel
    group = opt.param_groups[0]
    left = opt._fused(quads, group, 1, (0, 1, 0, 0))
    assert [w is q[0] for w, q in zip(seen, [quads[0], quads[2]])] == [True, True]
    assert [q[0] for q in left] == [odd] + [q[0] for q in quads[3:]]
    assert opt._kernel is False and "using the list path" in caplog.text
    assert opt._fused(quads, group, 2, (0, 2, 0, 0)) is quads  # for good
