"""Replay under the unperturbed context and the trajectory velocity energy."""

import pytest
import torch
from trainer_support import PROMPTS, small_rollout, tiny_model

from kvpo.generators.model import Block
from kvpo.method.replay import replay_velocities, step_weights, trajectory_energy
from kvpo.method.rollout import RolloutSpec, rollout


def test_replay_reproduces_unperturbed_steps(model):
    """At the rollout policy, replay of a step taken under full context gives back its velocity:
    after the window always, and everywhere when nothing is routed out."""
    ro = small_rollout(model, p_keep=0.4)
    with torch.no_grad():
        u = replay_velocities(model, ro)
    after = ro.chunk >= ro.window[1]
    torch.testing.assert_close(u[:, :, after], ro.velocities[:, :, after], rtol=1e-4, atol=1e-5)
    inside = (u[:, :, ~after] - ro.velocities[:, :, ~after]).pow(2).mean(dim=(2, 3, 4))
    assert (inside > 1e-8).any()

    full = small_rollout(model, p_keep=1.0)
    with torch.no_grad():
        e = trajectory_energy(replay_velocities(model, full), full, step_weights(full))
    assert e.abs().max() < 1e-9


def test_replay_of_a_renoise_rollout_gives_back_its_velocities(model):
    """The renoise sampler records the states it visited (re-noised) and the velocities there:
    replay under the rollout's own context gives them back, so TVE is defined as for euler."""
    model.set_sampler("renoise")
    ro = small_rollout(model, p_keep=0.4)
    with torch.no_grad():
        u = replay_velocities(model, ro)
    after = ro.chunk >= ro.window[1]
    torch.testing.assert_close(u[:, :, after], ro.velocities[:, :, after], rtol=1e-4, atol=1e-5)
    full = small_rollout(model, p_keep=1.0)
    with torch.no_grad():
        e = trajectory_energy(replay_velocities(model, full), full, step_weights(full))
    assert e.abs().max() < 1e-9
    # the recorded states are the re-noised ones, not an Euler path's: a step's state is
    # (1 - t) x0 + t z for the x0 predicted the step before
    k = 1
    x0 = full.states[:, :, k - 1] - full.t[k - 1] * full.velocities[:, :, k - 1]
    z = (full.states[:, :, k] - (1 - full.t[k]) * x0) / full.t[k]
    euler = full.states[:, :, k - 1] + (full.t[k] - full.t[k - 1]) * full.velocities[:, :, k - 1]
    assert (full.states[:, :, k] - euler).abs().amax() > 0.1
    assert 0.8 < float(z.std()) < 1.2  # standard normal noise, not an ODE's drift


@pytest.mark.parametrize("per_pass", [1, 2])
def test_replay_in_branch_passes_is_the_whole_replay(model, per_pass, monkeypatch):
    """replay_velocities(..., branches_per_pass): the branches a few per forward (the pre-window
    context again in each) give the velocities of one forward over all of them, and no forward
    holds more rows than the branches of one pass need."""
    ro = small_rollout(model, p_keep=0.4)
    G = ro.tokens.shape[1]
    rows = []
    forward = model.forward

    def counting(x, *args, **kwargs):
        rows.append(x.shape[0])
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    with torch.no_grad():
        parts = replay_velocities(model, ro, per_pass)
        one_pass = max(rows)
        rows.clear()
        whole = replay_velocities(model, ro)
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-5)
    assert (whole - ro.velocities).abs().amax() > 1e-3  # routed branches: a real comparison
    assert len(rows) == 1 and one_pass < rows[0]
    # what a pass of per_pass branches of every group holds at most: its share of the noisy rows
    # and of the branches' context rows, plus the shared prefix's
    B, K = ro.tokens.shape[0], ro.t.shape[0]
    assert one_pass <= rows[0] - B * (G - min(per_pass, G)) * K


def test_energy_matches_float64_formula(model):
    ro = small_rollout(model, p_keep=0.3)
    u = replay_velocities(model, ro)
    w = step_weights(ro, "sigma")
    e = trajectory_energy(u, ro, w)
    diff = (u.detach().double() - ro.velocities.double()).pow(2).mean(dim=(3, 4))  # [B, G, K]
    expected = (diff * w.double()).sum(-1)
    torch.testing.assert_close(e.double(), expected, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))


def test_energy_gradient_reaches_the_policy(model):
    ro = small_rollout(model, p_keep=0.3)
    e = trajectory_energy(replay_velocities(model, ro), ro, step_weights(ro))
    e.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["head.weight"].abs().sum() > 0
    assert grads["blocks.0.kv.weight"].abs().sum() > 0  # through the routed KV pages
    assert grads["text.embed.weight"].abs().sum() > 0  # and the prompt encoder


def test_prefix_records_carry_no_energy(model):
    """Recorded pre-window steps are the same in every branch: replayed, they give back their
    velocities, and they get no TVE weight (only the KL regularizer sees them)."""
    ro = small_rollout(model, p_keep=0.3, record_prefix=True)
    pre = ~ro.scored
    assert ro.chunk[pre].tolist() == [0, 0, 0, 1, 1, 1] and ro.chunk[~pre].min() == 2
    s = ro.states[:, :, pre]
    assert torch.equal(s, s[:, :1].expand_as(s))
    with torch.no_grad():
        u = replay_velocities(model, ro)
    torch.testing.assert_close(u[:, :, pre], ro.velocities[:, :, pre], rtol=1e-4, atol=1e-5)
    w = step_weights(ro)
    assert (w[pre] == 0).all() and torch.isclose(w.sum(), torch.tensor(1.0))


def test_gradient_checkpointing_recomputes_blocks_with_equal_gradients(model, monkeypatch):
    ro = small_rollout(model, p_keep=0.3)
    calls = []
    forward = Block.forward

    def counted(self, *args):
        calls.append(1)
        return forward(self, *args)

    monkeypatch.setattr(Block, "forward", counted)
    grads = []
    for remat in (False, True):
        model.grad_checkpointing = remat
        model.zero_grad()
        calls.clear()
        e = trajectory_energy(replay_velocities(model, ro), ro, step_weights(ro))
        (e * torch.arange(1.0, e.numel() + 1).view_as(e)).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        depth = len(model.blocks)
        assert len(calls) == (2 if remat else 1) * depth  # the recompute in backward
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    model.grad_checkpointing = False


def test_replay_follows_kv_recache_at_prompt_switches():
    """With KV re-cache, the replay's context is the re-cached one: it reproduces every step made
    under full context, for a switch inside the shared prefix and one after the fork."""
    model = tiny_model(local_window=3)
    model.set_recache(True)
    left, up = PROMPTS[0], PROMPTS[0].replace("left", "up")
    prompts = [[left, up, up, up, up], [left, left, left, up, up]]  # switches at chunks 1 and 3
    for p_keep in (0.4, 1.0):
        spec = RolloutSpec(group_size=3, window=(2, 3), p_keep=p_keep, score_after_window=True)
        ro = rollout(model, prompts, spec, torch.Generator().manual_seed(0))
        with torch.no_grad():
            u = replay_velocities(model, ro)
        same = ro.chunk >= ro.window[1] if p_keep < 1 else torch.ones_like(ro.scored)
        torch.testing.assert_close(u[:, :, same], ro.velocities[:, :, same], rtol=1e-4, atol=1e-5)
    model.set_recache(False)  # a replay that ignores the re-cache does not reproduce them
    with torch.no_grad():
        u = replay_velocities(model, ro)
    assert (u[1, :, ro.chunk >= 3] - ro.velocities[1, :, ro.chunk >= 3]).abs().max() > 1e-3


def test_bf16_autocast_rollout_and_replay_agree_with_fp32(model):
    """amp=bf16: the cache holds bfloat16 pages, replay still reproduces unrouted steps, and the
    TVE of routed branches stays close to the fp32 one."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.new_cache(2).k[0].dtype == torch.bfloat16
        ro = small_rollout(model, p_keep=0.3)
        with torch.no_grad():
            u = replay_velocities(model, ro)
    assert u.dtype == torch.bfloat16 and ro.states.dtype == torch.float32
    after = ro.chunk >= ro.window[1]
    torch.testing.assert_close(
        u[:, :, after].float(), ro.velocities[:, :, after].float(), rtol=0, atol=1e-3
    )
    e16 = trajectory_energy(u, ro, step_weights(ro))
    ro32 = small_rollout(model, p_keep=0.3)
    with torch.no_grad():
        e32 = trajectory_energy(replay_velocities(model, ro32), ro32, step_weights(ro32))
    assert e16.dtype == torch.float32
    torch.testing.assert_close(e16, e32, rtol=0.1, atol=1e-5)


def _layout(seed: int) -> tuple[dict, list[list[str]], RolloutSpec]:
    """A random generator layout (chunk size, sinks, local window, KV re-cache), prompts that may
    switch direction at random chunks, and a window somewhere in the video."""
    import random

    rng = random.Random(seed)
    chunk = rng.choice([1, 2, 3])
    n_chunks = rng.choice([4, 5])
    layout = dict(
        chunk_frames=chunk,
        num_frames=chunk * n_chunks,
        sink_frames=rng.choice([0, 1, 2]),
        local_window=rng.choice([None, 2, 3, 5]),
        recache=rng.choice(["none", "longlive", "chunkwise"]),
        global_sink=rng.random() < 0.5,
    )
    prompts = []
    for p in PROMPTS:
        turn = rng.choice([None, *range(1, n_chunks)])
        other = p.replace("left", "down").replace("up", "right")
        prompts.append([p if turn is None or j < turn else other for j in range(n_chunks)])
    w0 = rng.randrange(1, n_chunks)
    spec = RolloutSpec(
        group_size=2,
        window=(w0, rng.randrange(w0 + 1, n_chunks + 1)),
        p_keep=1.0,
        score_after_window=True,
        record_prefix=True,
    )
    return layout, prompts, spec


@pytest.mark.parametrize("seed", range(16))
def test_teacher_forcing_gives_back_every_streamed_step_for_random_layouts(seed):
    """The invariant KVPO's likelihood stands on: with nothing routed out, one teacher-forcing
    forward over the clean video gives back the velocity of every step the streaming rollout
    took through its KV cache, whatever the chunk size, sinks, local window, re-cache at prompt
    switches and window position (each layout also makes a different context table)."""
    layout, prompts, spec = _layout(seed)
    model = tiny_model(seed, **layout)
    ro = rollout(model, prompts, spec, torch.Generator().manual_seed(seed))
    assert ro.chunk.unique().tolist() == list(range(model.num_frames // model.chunk_frames))
    with torch.no_grad():
        u = replay_velocities(model, ro)
    torch.testing.assert_close(
        u, ro.velocities, rtol=1e-4, atol=1e-5, msg=lambda m: f"{layout}, {spec.window}: {m}"
    )
