"""Replay: each branch's recorded steps under the unperturbed context, and its TVE.

One teacher-forcing forward (:func:`kvpo.generators.context.teacher_forcing`) recomputes, with the current
policy and gradients on, the clean pages of every branch's history (the pre-window chunks once per
group, shared by the branches' tables) and the velocity ``u_k`` at every recorded state ``x_k``.
``velocity_energy`` reduces ``w_k * mean_n (u_k - v_k)^2`` per branch.
"""

from __future__ import annotations

import torch

from kvpo.generators.context import chunk_conditioning, clean_context, teacher_forcing
from kvpo.generators.interface import StreamingVideoGenerator
from kvpo.method.rollout import Rollout
from kvpo_kernels import velocity_energy


def replay_velocities(
    model: StreamingVideoGenerator, ro: Rollout, branches_per_pass: int = 0
) -> torch.Tensor:
    """Policy velocities at the recorded states under full context: [B, G, K, L, d].

    ``branches_per_pass`` > 0 replays that many branches of every group per forward (the
    pre-window context again in each), so a forward holds the rows of that many branches, not G
    (``--replay_branches``)."""
    G = ro.tokens.shape[1]
    if 0 < branches_per_pass < G:
        return torch.cat(
            [
                replay_velocities(model, ro.branches(slice(g0, g0 + branches_per_pass)))
                for g0 in range(0, G, branches_per_pass)
            ],
            dim=1,
        )
    B, G, Fr, T, d = ro.tokens.shape
    c = model.chunk_frames
    K = ro.t.shape[0]
    # The pre-window chunks are clean context once per group (identical in every branch).
    cc = clean_context(model, ro.tokens, ro.prompts, ro.window[0], int(ro.chunk.max()))
    cond_bj = chunk_conditioning(model, ro.prompts)
    nb = torch.arange(B * G).repeat_interleave(K)
    nj = ro.chunk.repeat(B * G)
    ctx = cc.history(model, nb, nj)
    u = teacher_forcing(
        model,
        cc.tokens,
        cc.cond,
        cc.chunk,
        cc.table,
        ro.states.reshape(B * G * K, c * T, d),
        ro.t.to(ro.tokens.device).repeat(B * G),
        cond_bj[nb // G, nj],
        nj,
        ctx,
    )
    return u.view(B, G, K, c * T, d)


def step_weights(ro: Rollout, kind: str = "uniform") -> torch.Tensor:
    """[K] weights of the recorded steps summing to 1 over the scored records (0 on pre-window
    records): ``uniform``, or ``sigma`` (proportional to the step's t, so that noisier steps,
    whose velocities carry more of the branch, weigh more)."""
    if kind == "uniform":
        w = torch.ones_like(ro.t)
    elif kind == "sigma":
        w = ro.t.clamp_min(0.05)
    else:
        raise ValueError(f"step weighting must be 'uniform' or 'sigma', got {kind!r}")
    w = w * ro.scored.to(w.dtype)  # pre-window records carry no TVE weight
    return w / w.sum()


def trajectory_energy(u: torch.Tensor, ro: Rollout, weight: torch.Tensor) -> torch.Tensor:
    """TVE per branch, [B, G] float32: ``sum_k w_k mean_n (u_k - v_k)^2``."""
    B, G, K = u.shape[:3]
    e = velocity_energy(
        u.reshape(B * G, K, -1),
        ro.velocities.reshape(B * G, K, -1).to(u.dtype),
        weight.to(u.device),
        reduction="mean",
    )
    return e.view(B, G)


def step_energies(u: torch.Tensor, ro: Rollout) -> torch.Tensor:
    """Velocity distance of every branch at every recorded step, [B, G, K] float32:
    ``mean_n (u_k - v_k)^2`` (one ``velocity_energy`` launch over all B * G * K steps)."""
    B, G, K = u.shape[:3]
    e = velocity_energy(
        u.reshape(B * G * K, 1, -1),
        ro.velocities.reshape(B * G * K, 1, -1).to(u.dtype),
        reduction="mean",
    )
    return e.view(B, G, K)
