"""Both ops on randomly drawn inputs, on every backend this machine runs (the GPU ones on CUDA
tensors where there is a GPU), against float64 truths written here from their definitions (not
kvpo_kernels.reference): shapes the fixed cases do not reach (head dims 1 to 256, one-token pages,
empty batches and queries, rows of only routed-out or empty pages), every dtype, non-contiguous
views, and gradients of both outputs.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from helpers import permuted_copy

import kvpo_kernels
from kvpo_kernels import _backend

SEEDS = range(24)
INTERPRETED = _backend.triton_available() and _backend.triton_interpreted()
if INTERPRETED:  # and an interpreter that runs with this Triton and NumPy (test_triton.py: why not)
    from kvpo_kernels.triton._common import interpreter_problem

    INTERPRETED = interpreter_problem() is None
GPU = torch.cuda.is_available()
GPU_TRITON = GPU and _backend.triton_available() and not _backend.triton_interpreted()
GPU_TMA = GPU_TRITON and _backend._tma_capable(torch.device("cuda"))
# velocity_energy: float64 truth -> tolerance of each dtype's result (the gradients get 10x)
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 6e-3, torch.bfloat16: 5e-2}
# routed_attention: error allowed beyond twice PyTorch's own in the dtype (flash-attn's rule), as
# a fraction of the result's size: rounding, far below what a wrong index or an unwritten value
# gives. The gradients get more: the FlashAttention-2 backward takes delta = rowsum(dout * out)
# from out rounded to the dtype, and a softmax over few tokens with large logits cancels.
FLOOR = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GRAD_FLOOR = {k: 10 * v for k, v in FLOOR.items()}


def _runs(native_cuda_op: str) -> list:
    """(backend, device) pairs: every CPU backend here; on a GPU machine the GPU backends on CUDA
    tensors (TRITON_INTERPRET=0, as scripts/gpu_session.sh sets it)."""
    cuda = GPU and _backend.native_available() and _backend.native_cuda_available(native_cuda_op)
    return [
        ("cpu", "cpu"),
        ("reference", "cpu"),
        pytest.param(
            "triton", "cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="TRITON_INTERPRET=1")
        ),
        pytest.param(
            "triton", "cuda", marks=pytest.mark.skipif(not GPU_TRITON, reason="a GPU and Triton")
        ),
        pytest.param(
            "cuda", "cuda", marks=pytest.mark.skipif(not cuda, reason="the CUDA kernels built")
        ),
    ]


def _attention_runs() -> list:
    """:func:`_runs` and triton_tma (interpreted, and on a GPU of compute capability 9.x, 10.x)."""
    return [
        *_runs("routed_attn_fwd"),
        pytest.param(
            "triton_tma",
            "cpu",
            marks=pytest.mark.skipif(not INTERPRETED, reason="TRITON_INTERPRET=1"),
        ),
        pytest.param(
            "triton_tma", "cuda", marks=pytest.mark.skipif(not GPU_TMA, reason="sm 9.x or 10.x")
        ),
    ]


def _say(what: str):
    """assert_close's message, prefixed with what was drawn."""
    return lambda message: f"{what}: {message}"


def _layout(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """t's values as drawn: contiguous, every other element of a wider buffer, or dims 0 and 1
    swapped in memory."""
    pick = rng.random()
    if pick < 0.3:
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if pick < 0.6 and t.dim() >= 2:
        return permuted_copy(t, 0, 1)
    return t


def _attention_truth(q, k, v, table, lens, scale):
    """Softmax attention of each row over the tokens of the pages its table lists, in q's dtype:
    float64, the truth; a lower one, what PyTorch itself gets in it."""
    B, H, Lq, D = q.shape
    Hkv = k.shape[1]
    out = torch.zeros(B, H, Lq, D, dtype=q.dtype)
    lse = torch.full((B, H, Lq), -math.inf, dtype=q.dtype)
    for b in range(B):
        pages = [p for p in table[b].tolist() if p >= 0]
        n = [k.shape[2] if lens is None else int(lens[p]) for p in pages]
        if sum(n) == 0:
            continue
        keys = torch.cat([k[p, :, :m] for p, m in zip(pages, n, strict=True)], 1)
        vals = torch.cat([v[p, :, :m] for p, m in zip(pages, n, strict=True)], 1)
        keys, vals = (x.repeat_interleave(H // Hkv, 0) for x in (keys, vals))
        s = q[b] @ keys.transpose(-1, -2) * scale
        lse[b] = torch.logsumexp(s, -1)
        out[b] = torch.softmax(s, -1) @ vals
    return out, lse


def _dtypes(backend: str, device: str) -> list[torch.dtype]:
    if backend == "triton_tma":  # 16-bit operands (and the interpreter mishandles bfloat16)
        return [torch.float16, torch.bfloat16] if device == "cuda" else [torch.float16]
    if device == "cuda":  # the GPU kernels take 16- and 32-bit floats
        return [torch.float32, torch.float16, torch.bfloat16]
    # the interpreter mishandles bfloat16
    return [torch.float32, torch.float16] if backend == "triton" else list(TOL)


def _draw_attention(seed: int, backend: str, device: str = "cpu"):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    small = backend.startswith("triton") and device == "cpu"  # the interpreter: a program at a time
    dtype = rng.choice(_dtypes(backend, device))
    Hkv = rng.choice([1, 2, 3])
    H = Hkv * rng.choice([1, 2, 4])
    D = rng.choice([8, 16, 32, 64] if small else [1, 3, 16, 33, 64, 80, 128, 256])
    if backend == "cuda":  # the CUDA forward: tensor cores, head dim 64 or 128
        dtype, D = rng.choice([torch.float16, torch.bfloat16]), rng.choice([64, 128])
    if backend == "triton_tma":  # TMA: 16-byte rows
        D = rng.choice([8, 16, 32, 64] if small else [8, 16, 64, 80, 128])
    B = rng.choice([0, 1, 3, 5]) if rng.random() < 0.15 else rng.choice([1, 2, 3])
    Lq = rng.choice([0, 1, 5, 17] if small else [0, 1, 2, 17, 64, 130])
    P, page_size = rng.choice([1, 2, 5, 9]), rng.choice([1, 3, 16] if small else [1, 3, 16, 36])
    q, k, v = (
        torch.randn(*shape, generator=gen, dtype=torch.float64)
        for shape in ((B, H, Lq, D), (P, Hkv, page_size, D), (P, Hkv, page_size, D))
    )
    table = torch.randint(-1, P, (B, rng.choice([1, 3, 6])), generator=gen, dtype=torch.int32)
    lens = None
    if rng.random() < 0.5:  # partial pages, some empty
        lens = torch.randint(0, page_size + 1, (P,), generator=gen, dtype=torch.int32)
    scale = rng.choice([None, 0.3, 1.7])
    return rng, gen, dtype, (q, k, v, table, lens, scale)


def _grads_of(out, lse, inputs, dout, dlse):
    finite = torch.isfinite(lse)
    loss = (out.double() * dout).sum() + (lse.double()[finite] * dlse[finite]).sum()
    if not loss.requires_grad:  # no row kept a token: every gradient is zero
        return [torch.zeros(x.shape, dtype=torch.float64) for x in inputs]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [
        (torch.zeros_like(x) if g is None else g).cpu() for g, x in zip(grads, inputs, strict=True)
    ]


@pytest.mark.parametrize(("backend", "device"), _attention_runs())
@pytest.mark.parametrize("seed", SEEDS)
def test_routed_attention_on_random_inputs(backend, device, seed):
    rng, gen, dtype, (q, k, v, table, lens, scale) = _draw_attention(seed, backend, device)
    deterministic = random.Random(seed + 1000).random() < 0.5  # else dq by atomics (GPU backends)
    what = (
        f"seed {seed}, {backend} on {device}, {dtype}, q {tuple(q.shape)}, pages {tuple(k.shape)}, "
        f"deterministic {deterministic}"
    )
    # the truth of what the kernel is given (inputs and output gradient rounded to dtype, the
    # lse gradient to float32), and what PyTorch gets in dtype
    scale_ = scale or q.shape[-1] ** -0.5
    truth_in = [x.to(dtype).double().requires_grad_() for x in (q, k, v)]
    want_out, want_lse = _attention_truth(*truth_in, table, lens, scale_)
    dout = torch.randn(want_out.shape, generator=gen).to(dtype).double()
    dlse = torch.randn(want_lse.shape, generator=gen, dtype=torch.float64).float().double()
    want = _grads_of(want_out, want_lse, truth_in, dout, dlse)
    torch_in = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    torch_out, torch_lse = _attention_truth(*torch_in, table, lens, scale_)
    torch_grads = _grads_of(torch_out, torch_lse, torch_in, dout, dlse)

    args = [_layout(x.to(device, dtype), rng).requires_grad_() for x in (q, k, v)]
    lens = None if lens is None else lens.to(device)
    table = _layout(table.to(device), rng)
    out, lse = kvpo_kernels.routed_attention(
        *args, table, lens, scale=scale, backend=backend, deterministic=deterministic
    )
    out, lse = out.cpu(), lse.cpu()
    assert out.dtype == dtype and out.shape == want_out.shape, what
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite), what
    got = [out, lse[finite], *_grads_of(out, lse, args, dout, dlse)]
    ref = [want_out, want_lse[finite], *want]
    pt = [torch_out, torch_lse[finite], *torch_grads]
    for name, g, w, t in zip(("out", "lse", "dq", "dk", "dv"), got, ref, pt, strict=True):
        if not w.numel():
            continue
        w = w.detach()
        size = max(1.0, w.abs().max().item())
        err = (g.double() - w).abs().max().item()
        err_torch = (t.detach().double() - w).abs().max().item()
        floor = (FLOOR if name in ("out", "lse") else GRAD_FLOOR)[dtype]
        assert err <= 2 * err_torch + floor * size, (
            f"{what}: {name} error {err:.3e} > 2 x PyTorch's {err_torch:.3e} + "
            f"{floor:.0e} x {size:.3g}"
        )


@pytest.mark.parametrize(("backend", "device"), _runs("velocity_energy_fwd"))
@pytest.mark.parametrize("seed", SEEDS)
def test_velocity_energy_on_random_inputs(backend, device, seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    small = backend == "triton" and device == "cpu"
    dtype = rng.choice(_dtypes(backend, device))
    G, S = rng.choice([1, 2, 3, 8]), rng.choice([1, 2, 5])
    rest = rng.choice(
        [(), (7,), (3, 5), (300,)] if small else [(), (1,), (3, 5), (4100,), (33, 65)]
    )
    pred = torch.randn(G, S, *rest, generator=gen, dtype=torch.float64)
    ref = pred + torch.randn(G, S, *rest, generator=gen, dtype=torch.float64)
    kind = rng.choice(["none", "[S]", "[G, S]", "[S] expanded", "[S, G] transposed"])
    # the float32 weight the op is given, in the layout drawn (read in place, never copied)
    w = {
        "none": lambda: None,
        "[S]": lambda: torch.rand(S, generator=gen).to(device),
        "[G, S]": lambda: torch.rand(G, S, generator=gen).to(device),
        "[S] expanded": lambda: torch.rand(S, generator=gen).to(device).expand(G, S),
        "[S, G] transposed": lambda: torch.rand(S, G, generator=gen).to(device).t(),
    }[kind]()
    reduction = rng.choice(["sum", "mean"])
    what = (
        f"seed {seed}, {backend} on {device}, {dtype}, {(G, S, *rest)}, weight {kind}, {reduction}"
    )

    # the truth of what the op is given: the velocities rounded to dtype
    truth_in = [x.to(dtype).double().requires_grad_() for x in (pred, ref)]
    sq = (truth_in[0] - truth_in[1]).square().reshape(G, S, -1)
    per_step = sq.mean(-1) if reduction == "mean" and sq.shape[-1] else sq.sum(-1)
    want = (per_step * (1.0 if w is None else w.cpu().double())).sum(1)
    grad = torch.randn(G, generator=gen, dtype=torch.float64)
    want_grads = torch.autograd.grad((want * grad).sum(), truth_in)

    args = [_layout(x.to(device, dtype), rng).requires_grad_() for x in (pred, ref)]
    got = kvpo_kernels.velocity_energy(*args, w, reduction, backend=backend)
    assert got.shape == (G,) and got.dtype == _backend.acc_dtype(dtype), what
    torch.testing.assert_close(
        got.cpu().double(), want.detach(), atol=1e-6, rtol=1e-5, msg=_say(what)
    )
    got_grads = torch.autograd.grad((got.double() * grad.to(device)).sum(), args)
    for name, g, w_ in zip(("d_pred", "d_ref"), got_grads, want_grads, strict=True):
        assert g.dtype == dtype, what
        size = max(1e-6, w_.abs().max().item()) if w_.numel() else 1.0
        tol = 10 * TOL[dtype]
        torch.testing.assert_close(
            g.cpu().double(), w_, atol=tol * size, rtol=tol, msg=_say(f"{what}: {name}")
        )
