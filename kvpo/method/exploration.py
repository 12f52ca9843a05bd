"""Exploration by KV routing, set up: which groups a rank rolls out in an iteration, where their
perturbed window starts, the rollout spec a config asks for, and the checks, before a run starts,
that its routing can explore at all (:mod:`kvpo.method.rollout` makes the rollouts)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kvpo.generators import data
from kvpo.method.rollout import RolloutSpec, exploring_chunks, stream_of
from kvpo.run import distributed
from kvpo.run.config import ConfigError, TrainConfig, config_errors


def iteration_generator(
    cfg: TrainConfig, it: int, rank: int = 0, stream: int = 0
) -> torch.Generator:
    """Seeded per (seed, iteration, rank, stream): a resumed run draws what the original would."""
    return torch.Generator().manual_seed(((cfg.seed * 1_000_003 + it) * 131 + rank) * 7 + stream)


# Why an iteration can train no group (its row's valid_groups is 0), by advantage mode.
NO_GROUP = {
    "group": "every group's rewards tied",
    "anchor": "no branch beat its group's anchor (the protect gate)",
    "public": "no branch beat its group's anchor (the protect gate)",
}


def shifted(window: tuple[int, int], by: int) -> tuple[int, int]:
    """The perturbed window ``[w0, w1)`` started ``by`` chunks later."""
    return (window[0] + by, window[1] + by)


def window_shifts(cfg: TrainConfig, n_chunks: int) -> list[int]:
    """The shifts ``0..window_shift`` an iteration draws its window's start from: with
    ``streaming_chunk``, those whose window lies inside one streaming chunk (the public recipe's
    starts: block 0 or 1 of a streaming chunk). A ConfigError if none does."""
    shifts = list(range(cfg.window_shift + 1))
    if cfg.streaming_chunk is None:
        return shifts
    layout = tuple(cfg.streaming_chunk)
    inside = [
        s
        for s in shifts
        if shifted(cfg.window, s)[1] <= stream_of(layout, cfg.window[0] + s, n_chunks)[1]
    ]
    if not inside:
        raise ConfigError(
            f"config window={tuple(cfg.window)}, window_shift={cfg.window_shift}: no start puts "
            f"the window inside one streaming chunk of streaming_chunk={list(layout)}"
        )
    return inside


def iteration_batch(
    cfg: TrainConfig, spec: RolloutSpec, it: int, train_prompts: list[str], chunks: int
) -> tuple[list[list[str]], RolloutSpec, torch.Generator]:
    """Iteration ``it``'s groups on this rank: each group's prompt per chunk (the iteration's
    ``prompts_per_iter`` prompts are drawn alike on every rank, which takes its share), ``spec``
    with the window started as drawn for the iteration, and the rank's generator for its
    rollouts. Every draw is seeded by (seed, it, rank): a resumed run draws the same."""
    rank, world = distributed.rank_and_world()
    pick = torch.randint(
        len(train_prompts),
        (cfg.prompts_per_iter,),
        generator=iteration_generator(cfg, it, stream=1),
    ).tolist()
    gen = iteration_generator(cfg, it, rank)
    batch = [video_prompts(cfg, train_prompts[i], chunks, gen) for i in pick[rank::world]]
    shifts = window_shifts(cfg, chunks)
    pick = torch.randint(len(shifts), (), generator=iteration_generator(cfg, it, stream=2))
    shift = shifts[int(pick)]
    return batch, dataclasses.replace(spec, window=shifted(cfg.window, shift)), gen


def video_prompts(cfg: TrainConfig, prompt: str, chunks: int, gen: torch.Generator) -> list[str]:
    """A training video's prompt per chunk: ``prompt`` (its ``"A | B"`` segments spread over the
    chunks), switching direction at ``switch_chunks``, or with probability ``multi_prompt``."""
    if cfg.switch_chunks:
        return data.fixed_switches(prompt, chunks, tuple(cfg.switch_chunks), gen)
    return data.segments(data.random_prompts([prompt], chunks, cfg.multi_prompt, gen))


def rollout_spec(cfg: TrainConfig) -> RolloutSpec:
    """What the config's rollouts explore and record (the window before any shift)."""
    return RolloutSpec(
        group_size=cfg.group_size,
        window=tuple(cfg.window),
        p_keep=cfg.p_keep,
        routing=cfg.routing,
        recent_frames=cfg.recent_frames,
        route_pool=cfg.route_pool,
        routed_cache_pass=cfg.routed_cache_pass,
        score_after_window=cfg.score_after_window,
        streaming_chunk=None if cfg.streaming_chunk is None else tuple(cfg.streaming_chunk),
        score_stream=cfg.score_stream,
        score_steps=None if cfg.score_steps is None else tuple(cfg.score_steps),
        anchor=cfg.advantage != "group",
        record_prefix=cfg.kl_prefix and cfg.kl == "velocity",
        explore=cfg.explore,
        sde_noise=cfg.sde_noise,
        branches_per_pass=cfg.rollout_branches,
    )


def checked_spec(cfg: TrainConfig, model: nn.Module) -> RolloutSpec:
    """:func:`rollout_spec`, checked (:func:`check_exploration`) at every start of its window
    that ``window_shift`` allows."""
    spec = rollout_spec(cfg)
    n_chunks = model.num_frames // model.chunk_frames
    if any(a >= n_chunks for a in cfg.switch_chunks):
        raise ConfigError(
            f"config switch_chunks={list(cfg.switch_chunks)}: the video has {n_chunks} chunks, "
            f"switches lie in 1..{n_chunks - 1}"
        )
    for shift in window_shifts(cfg, n_chunks):
        at = shifted(cfg.window, shift)
        try:
            check_exploration(dataclasses.replace(spec, window=at), model)
        except ConfigError as e:
            if not shift:
                raise
            # the message names the shifted window, which the user never wrote
            raise ConfigError(
                f"window_shift={cfg.window_shift} starts window={tuple(cfg.window)} up to "
                f"{cfg.window_shift} chunks later; started {shift} later it is {at}, which fails: "
                f"{e}"
            ) from None
    return spec


def check_exploration(spec: RolloutSpec, model: nn.Module) -> None:
    """Validates ``spec`` for ``model`` and refuses a KV-routing window in which no chunk's
    branches can differ: their rewards would tie, every group would be skipped, and the run would
    train nothing while looking healthy."""
    with config_errors():
        spec.validate(model)
    if spec.explore != "routing" or spec.group_size < 2 or exploring_chunks(model, spec):
        return
    w0, w1 = spec.window
    c, sinks, lw = model.chunk_frames, model.sink_frames, model.local_window
    if spec.routing != "drop":
        why = (
            f"routing={spec.routing!r} refills the local window ({sinks} sink frames + local_window "
            f"{lw}) from older history, but chunks {w0}..{w1 - 1} have at most {(w1 - 1) * c} "
            f"history frames, which the window (less recent_frames={spec.recent_frames}) already "
            f"shows whole; perturb chunks whose history passes {sinks + lw} frames, make the video "
            "longer, or use routing='drop'"
        )
    else:
        why = (
            f"routing='drop' with p_keep={spec.p_keep}: chunks {w0}..{w1 - 1} have no history "
            f"frame besides the {sinks} sink frames and the most recent one, or p_keep is 0 or 1; "
            "perturb later chunks or set 0 < p_keep < 1"
        )
    raise ConfigError(
        f"window {spec.window}: no chunk's branches can attend to different history, so the "
        f"{spec.group_size} branches of a group would be one video and nothing would train: {why}"
    )
