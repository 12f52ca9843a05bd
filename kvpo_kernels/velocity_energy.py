"""Per-branch Trajectory Velocity Energy (TVE): a fused weighted squared-distance reduction.

energy[g] = sum_s weight[g, s] * reduce_n (v_pred[g, s, n] - v_ref[g, s, n])^2, over the steps s of
branch g's trajectory and the tokens/channels n; KVPO turns it into branch probabilities
softmax_g(-energy / tau).
"""

from __future__ import annotations

import math

import torch

from . import _backend, _checks
from .reference import velocity_energy_reference

OP = "velocity_energy"


def _fwd_reference(v_pred, v_ref, weight, mean):
    acc = _backend.acc_dtype(v_pred.dtype)
    return velocity_energy_reference(
        v_pred.to(acc), v_ref.to(acc), weight, "mean" if mean else "sum"
    )


def _bwd_reference(grad, v_pred, v_ref, weight, mean, need_ref):
    acc = _backend.acc_dtype(v_pred.dtype)
    # max(N, 1): with N = 0 the gradient is empty and the coefficient unused
    coef = grad.to(acc)[:, None] * (2.0 / max(v_pred.shape[2], 1) if mean else 2.0)
    if weight is not None:
        coef = coef * weight.to(acc)
    coef = coef.expand(v_pred.shape[:2])
    d_pred = (coef[..., None] * (v_pred.to(acc) - v_ref.to(acc))).to(v_pred.dtype)
    d_ref = -d_pred if need_ref else v_ref.new_empty(0)
    return d_pred, d_ref


def _fwd_native(v_pred, v_ref, weight, mean):
    return torch.ops.kvpo.velocity_energy_fwd(v_pred, v_ref, weight, mean)


def _bwd_native(grad, v_pred, v_ref, weight, mean, need_ref):
    return torch.ops.kvpo.velocity_energy_bwd(grad, v_pred, v_ref, weight, mean, need_ref)


def _fwd_triton(v_pred, v_ref, weight, mean):
    from .triton.velocity_energy import velocity_energy_fwd

    return velocity_energy_fwd(v_pred, v_ref, weight, mean)


def _bwd_triton(grad, v_pred, v_ref, weight, mean, need_ref):
    from .triton.velocity_energy import velocity_energy_bwd

    return velocity_energy_bwd(grad, v_pred, v_ref, weight, mean, need_ref)


_KERNELS = {
    "reference": (_fwd_reference, _bwd_reference),
    "cpu": (_fwd_native, _bwd_native),
    "cuda": (_fwd_native, _bwd_native),
    "triton": (_fwd_triton, _bwd_triton),
}


# weight: [G, S] in the accumulation dtype, any strides (a [S] weight arrives expanded, stride 0
# over G: the kernels read it through its strides, so no copy), or None for ones.
@torch.library.custom_op("kvpo::velocity_energy", mutates_args=())
def _velocity_energy_op(
    v_pred: torch.Tensor,
    v_ref: torch.Tensor,
    weight: torch.Tensor | None,
    mean: bool,
    backend: str,
    backward_backend: str,
) -> torch.Tensor:
    out = _KERNELS[backend][0](v_pred.contiguous(), v_ref.contiguous(), weight, mean)
    return out.to(_backend.acc_dtype(v_pred.dtype))


@_velocity_energy_op.register_fake
def _(v_pred, v_ref, weight, mean, backend, backward_backend):
    return v_pred.new_empty((v_pred.shape[0],), dtype=_backend.acc_dtype(v_pred.dtype))


@torch.library.custom_op("kvpo::velocity_energy_backward", mutates_args=())
def _velocity_energy_backward_op(
    grad: torch.Tensor,
    v_pred: torch.Tensor,
    v_ref: torch.Tensor,
    weight: torch.Tensor | None,
    mean: bool,
    need_ref: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (grad.contiguous(), v_pred.contiguous(), v_ref.contiguous(), weight)
    d_pred, d_ref = _KERNELS[backend][1](*args, mean, need_ref)
    return d_pred.contiguous(), d_ref.contiguous()


@_velocity_energy_backward_op.register_fake
def _(grad, v_pred, v_ref, weight, mean, need_ref, backend):
    # contiguous, as the op returns them (empty_like would keep a permuted input's strides)
    return v_pred.new_empty(v_pred.shape), v_ref.new_empty(v_ref.shape if need_ref else (0,))


def _setup_context(ctx, inputs, output):
    v_pred, v_ref, weight, mean, _, backward_backend = inputs
    ctx.save_for_backward(v_pred, v_ref, weight)
    ctx.mean, ctx.backend = mean, backward_backend


def _backward(ctx, grad):
    v_pred, v_ref, weight = ctx.saved_tensors
    need_pred, need_ref, need_weight = ctx.needs_input_grad[:3]
    d_pred = d_ref = d_weight = None
    if need_pred or need_ref:
        d_pred, d_ref = _velocity_energy_backward_op(
            grad, v_pred, v_ref, weight, ctx.mean, need_ref, ctx.backend
        )
        d_pred = d_pred if need_pred else None
        d_ref = d_ref if need_ref else None
    if need_weight:
        # d energy[g] / d weight[g, s] is the per-step distance: one extra pass, only when asked.
        acc = _backend.acc_dtype(v_pred.dtype)
        diff2 = (v_pred.to(acc) - v_ref.to(acc)).pow(2)
        per_step = diff2.mean(-1) if ctx.mean else diff2.sum(-1)
        d_weight = (grad.to(acc)[:, None] * per_step).to(weight.dtype)
    return d_pred, d_ref, d_weight, None, None, None


_velocity_energy_op.register_autograd(_backward, setup_context=_setup_context)
_velocity_energy_backward_op.register_autograd(_backend.first_order_only("velocity_energy"))


def velocity_energy(
    v_pred: torch.Tensor,
    v_ref: torch.Tensor,
    weight: torch.Tensor | None = None,
    reduction: str = "sum",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-branch Trajectory Velocity Energy.

    Args:
        v_pred: [G, S, ...] float16 / bfloat16 / float32 / float64: the velocities the policy
            predicts at the recorded states (branch, step, any trailing dims).
        v_ref: [G, S, ...], shape and dtype of v_pred: the velocities the branch actually took.
        weight: [S] or [G, S] per-step weights, or None (ones).
        reduction: "sum" or "mean" over the trailing dims.
        backend: ``auto`` | ``reference`` | ``cpu`` | ``cuda`` | ``triton`` (``auto`` picks per
            direction).

    Returns:
        energy: [G] float32 (float64 for float64 inputs),
        ``energy[g] = sum_s weight[g, s] * reduce_n (v_pred[g, s, n] - v_ref[g, s, n]) ** 2``.

    Differentiable in v_pred, v_ref and weight; half inputs accumulate in float32.
    """
    _checks.check_velocity_energy(v_pred, v_ref, weight, reduction)
    G, S = v_pred.shape[:2]
    n = math.prod(v_pred.shape[2:])  # not -1: ambiguous when G or S is 0
    if weight is not None:
        weight = weight.to(_backend.acc_dtype(v_pred.dtype)).expand(G, S)
    dev, dt = v_pred.device, v_pred.dtype
    fwd = _backend.resolve(OP, dev, backend, "velocity_energy_fwd", dt, "forward")
    bwd = _backend.resolve(OP, dev, backend, "velocity_energy_bwd", dt, "backward")
    return _velocity_energy_op(
        v_pred.reshape(G, S, n), v_ref.reshape(G, S, n), weight, reduction == "mean", fwd, bwd
    )
