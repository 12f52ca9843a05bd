"""The few-step samplers streaming generators deploy, one denoising step of a chunk at a time.

Flow convention: ``x_t = (1 - t) x_0 + t z``, velocity ``v = z - x_0``, so the clean prediction
at a state is ``x_0 = x_t - t v``. A chunk is denoised over the schedule ``t_0 = 1 > ... > t_S =
0`` of :meth:`~kvpo.generators.interface.StreamingVideoGenerator.timesteps`:

* ``euler`` integrates the ODE ``dx/dt = v``: ``x' = x + (t' - t) v`` (the built-in generator,
  trained as a flow).
* ``renoise`` predicts ``x_0 = x - t v`` and re-noises it to the next timestep with fresh Gaussian
  noise ``z_k``: ``x' = (1 - t') x_0 + t' z_k``; the last step (``t' = 0``) returns ``x_0``. This
  is the sampler Self-Forcing, CausVid and LongLive were distilled with and deploy
  (``scheduler.add_noise`` after each step), so their videos are its videos.

From the same initial noise the two give different videos on a distilled model: a generator
is sampled, explored and replayed with the sampler it deploys.
"""

from __future__ import annotations

import torch

SAMPLERS = ("euler", "renoise")


def check_sampler(kind: object, what: str = "sampler") -> str:
    """``kind`` if it names a sampler, else a ValueError naming ``what``."""
    if kind not in SAMPLERS:
        raise ValueError(f"{what}={kind!r} must be one of {', '.join(SAMPLERS)}")
    return kind


def sampler_of(model: object) -> str:
    """The sampler ``model`` deploys: its ``sampler`` attribute (``euler`` when it has none)."""
    return check_sampler(getattr(model, "sampler", "euler"), f"{type(model).__name__}.sampler")


def renoise_steps(kind: str, steps: int) -> int:
    """How many of a chunk's ``steps`` denoising steps draw fresh noise: ``steps - 1`` for
    ``renoise`` (every step but the last), 0 for ``euler``."""
    return steps - 1 if kind == "renoise" else 0


def sampler_step(
    kind: str,
    x: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    z: torch.Tensor | None = None,
) -> torch.Tensor:
    """One denoising step from ``t`` to ``t_next < t``.

    Args:
        kind: ``euler`` or ``renoise``.
        x, v: [R, L, d] states and the model's velocity there.
        t, t_next: scalar (0-dim) timesteps.
        z: [R, L, d] the re-noising noise (``renoise`` with ``t_next > 0``; ignored otherwise).

    Returns:
        [R, L, d] the next state, in the dtype of ``x``.
    """
    if kind == "euler":
        return x + (t_next - t) * v
    x0 = x - t * v
    if float(t_next) == 0.0:
        return x0
    if z is None:
        raise ValueError("the renoise sampler needs the step's noise z above t_next = 0")
    return (1 - t_next) * x0 + t_next * z.to(x.dtype)
