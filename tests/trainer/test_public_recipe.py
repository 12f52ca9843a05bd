"""The public KVPO recipe's pieces, each against a float64 re-implementation written here from the
public trainer's semantics (Richard-Zhang-AI/KVPO, as docs/method.md states them)."""

import math
import statistics
from pathlib import Path

import pytest
import torch
from trainer_support import PROMPTS, run_overrides, tiny_model

from kvpo.generators import data
from kvpo.method.advantages import advantages, public_advantages
from kvpo.method.exploration import rollout_spec, window_shifts
from kvpo.method.likelihood import branch_log_probs
from kvpo.method.replay import replay_velocities
from kvpo.method.rollout import (
    RolloutSpec,
    _shifted_pool,
    _shifted_routes,
    rollout,
    shifted_plans,
    stream_of,
)
from kvpo.method.scoring import branch_rewards, segment_clips
from kvpo.method.update import learning_rate, ppo_objective
from kvpo.rewards import CompositeReward
from kvpo.run.checkpoint import save_model
from kvpo.run.config import ConfigError, TrainConfig, build_config, parse_args
from kvpo.run.setup import check_held_out
from kvpo.trainer import train

ROOT = Path(__file__).resolve().parents[2]


def _model(**kw):
    """16 frames of 2 (8 chunks), 1 sink, a local window of 3 frames: a pool to draw from."""
    return tiny_model(num_frames=16, local_window=3, **kw)


def _spec(**kw) -> RolloutSpec:
    base = dict(group_size=4, window=(5, 7), routing="shifted", recent_frames=1, anchor=True)
    return RolloutSpec(**{**base, **kw})


def _rollout(model, spec, seed=0, prompts=None):
    nC = model.num_frames // model.chunk_frames
    prompts = prompts or [[p] * nC for p in PROMPTS[:2]]
    return rollout(model, prompts, spec, torch.Generator().manual_seed(seed))


# Likelihood.


def _x0_log_probs64(ro, u, sigma_floor):
    """The public trajectory log-probability: per recorded step of every scored chunk,
    -mean((x0_target - x0_pred)^2) / (2 max(sigma, floor)^2) with x0 = x_t - sigma v (the rollout's
    velocity for the target, the replay's for the prediction), summed; one softmax over the branches
    at temperature 1."""
    x, v, u = ro.states.double(), ro.velocities.double(), u.double()
    B, G, K = x.shape[:3]
    out = torch.zeros(B, G, dtype=torch.float64)
    for k in range(K):
        if not ro.scored[k]:
            continue
        sigma = float(ro.t[k])
        x0_target = x[:, :, k] - sigma * v[:, :, k]
        x0_pred = x[:, :, k] - sigma * u[:, :, k]
        mse = (x0_target - x0_pred).pow(2).mean(dim=(2, 3))
        out -= mse / (2 * max(sigma, sigma_floor) ** 2)
    return out.log_softmax(1)


@pytest.mark.parametrize("sigma_floor", [1.0, 0.3])
def test_x0_likelihood_is_the_public_trajectory_log_prob(sigma_floor):
    model = _model()
    spec = _spec(score_stream=True, streaming_chunk=(3, 5))
    ro = _rollout(model, spec)
    assert sorted(set(ro.chunk.tolist())) == [5, 6, 7]  # the fork to its streaming chunk's end
    with torch.no_grad():
        u = replay_velocities(model, ro)
    cfg = TrainConfig(likelihood="x0", sigma_floor=sigma_floor)
    got = branch_log_probs(cfg, model, u, ro, None)
    want = _x0_log_probs64(ro, u, sigma_floor)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert want.std(1).max() > 0  # the branches differ


def test_log_prob_grad_steps_count_every_step_and_differentiate_the_first():
    model = _model()
    ro = _rollout(model, _spec())
    with torch.no_grad():
        u0 = replay_velocities(model, ro)
    weights = torch.randn(2, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = {}
    for n in (0, 2):
        u = u0.clone().requires_grad_()
        cfg = TrainConfig(likelihood="x0", sigma_floor=1.0, log_prob_grad_steps=n)
        logp = branch_log_probs(cfg, model, u, ro, None)
        torch.testing.assert_close(logp.double(), _x0_log_probs64(ro, u0, 1.0), rtol=1e-5, atol=0)
        (logp.double() * weights).sum().backward()
        grads[n] = u.grad.abs().amax(dim=(0, 1, 3, 4))  # per record
    first = ro.step < 2
    assert (grads[0] > 0).all() and (grads[2][first] > 0).all()
    assert (grads[2][~first] == 0).all() and (~first).any()
    torch.testing.assert_close(grads[2][first], grads[0][first])


# Advantages and the protect gate.


def _public_advantages64(comps, anchor, weights, scopes, clip):
    """Group by group with Python's statistics (stdev: n - 1; pstdev: n)."""
    B, G = next(iter(comps.values())).shape
    adv = torch.zeros(B, G, dtype=torch.float64)
    safe = []
    for b in range(B):
        fused, beats = [0.0] * G, False
        for scope, w_scope in scopes.items():
            names = [k for k in comps if k.startswith(scope + "/")]
            a_s, raw, raw_a = [0.0] * G, [0.0] * G, 0.0
            for k in names:
                w = weights[k] / w_scope
                r, ra = comps[k][b].tolist(), float(anchor[k][b])
                sd = statistics.stdev(r + [ra])
                a_s = [a + w * (x - ra) / (sd + 1e-8) for a, x in zip(a_s, r, strict=True)]
                raw = [a + w * x for a, x in zip(raw, r, strict=True)]
                raw_a += w * ra
            sd = statistics.pstdev(a_s)
            if sd > 1e-8:
                a_s = [a / (sd + 1e-8) for a in a_s]
            fused = [f + w_scope * a for f, a in zip(fused, a_s, strict=True)]
            beats = beats or any(x > raw_a for x in raw)
        adv[b] = torch.tensor([max(-clip, min(clip, f)) for f in fused], dtype=torch.float64)
        safe.append(beats)
    return adv, torch.tensor(safe)


def test_public_advantages_of_a_hand_made_table():
    # group 0: {1, 3, anchor 2}: stdev 1 -> [-1, 1], pstdev 1 -> [-1, 1]; a branch beats the anchor
    # group 1: {1, 1.5, anchor 2}: stdev 0.5 -> [-2, -1], pstdev 0.5 -> [-4, -2], clipped; gated
    comps = {"stream/x": torch.tensor([[1.0, 3.0], [1.0, 1.5]])}
    anchor = {"stream/x": torch.tensor([2.0, 2.0])}
    adv, safe = public_advantages(comps, anchor, {"stream/x": 1.0}, {"stream": 1.0}, clip=2.5)
    torch.testing.assert_close(adv, torch.tensor([[-1.0, 1.0], [-2.5, -2.0]]), atol=1e-6, rtol=0)
    assert safe.tolist() == [True, False]


@pytest.mark.parametrize("seed", range(4))
def test_public_advantages_against_float64(seed):
    gen = torch.Generator().manual_seed(seed)
    B, G = 5, 8
    scopes = {"stream": 1.0, "segments": 0.5}
    names = ["stream/a", "stream/b", "segments/a", "segments/b"]
    comps = {k: torch.rand(B, G, generator=gen) for k in names}
    anchor = {k: torch.rand(B, generator=gen) * 0.9 + 0.3 for k in names}
    comps["segments/b"][1] = 0.7  # a component without spread: its std is the anchor's alone
    comps["stream/a"][2] = anchor["stream/a"][2] - 0.5  # group 2: nothing beats the anchor
    comps["stream/b"][2] = anchor["stream/b"][2] - 0.5
    comps["segments/a"][2] = anchor["segments/a"][2] - 0.5
    comps["segments/b"][2] = anchor["segments/b"][2] - 0.5
    w_reward = {"a": 1.0, "b": 0.3}
    weights = {k: scopes[k.split("/")[0]] * w_reward[k.split("/")[1]] for k in names}
    got, safe = public_advantages(comps, anchor, weights, scopes, clip=2.5)
    want, want_safe = _public_advantages64(comps, anchor, weights, scopes, 2.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert safe.tolist() == want_safe.tolist() and not safe[2]

    cfg = TrainConfig(advantage="public", protect="halve", reward_scopes=scopes)
    adv, valid, group_w = advantages(cfg, None, comps, anchor, weights, comps)
    assert valid.all() and group_w.tolist() == [1.0 - 0.5 * (not s) for s in want_safe.tolist()]
    torch.testing.assert_close(adv.double(), want, rtol=1e-5, atol=1e-6)  # not zeroed when gated
    cfg = TrainConfig(advantage="public", protect="skip", reward_scopes=scopes)
    adv, valid, group_w = advantages(cfg, None, comps, anchor, weights, comps)
    assert valid.tolist() == want_safe.tolist() and adv[2].abs().max() == 0


@pytest.mark.parametrize("seed", range(3))
def test_ppo_objective_weights_groups_and_clamps_the_log_ratio(seed):
    gen = torch.Generator().manual_seed(seed)
    logp = torch.randn(3, 5, generator=gen, dtype=torch.float64) * 15
    old = torch.randn(3, 5, generator=gen, dtype=torch.float64) * 15
    adv = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    valid = torch.tensor([True, False, True])
    w = torch.tensor([1.0, 0.5, 0.5], dtype=torch.float64)
    loss, _ = ppo_objective(logp, old, adv, valid, 0.1, 0.2, 20.0, w)
    total, n = 0.0, 0
    for b in range(3):
        for g in range(5):
            if not valid[b]:
                continue
            r = math.exp(max(-20.0, min(20.0, float(logp[b, g] - old[b, g]))))
            a = float(adv[b, g])
            total += float(w[b]) * min(r * a, max(0.9, min(1.2, r)) * a)
            n += 1
    assert float(loss) == pytest.approx(-total / n, rel=1e-12)


# The lagged old policy and the schedule.


def test_public_learning_rate_warms_up_from_zero_once_per_sync():
    cfg = build_config(dict(lr=1e-5, lr_schedule="public", lr_warmup=5, old_policy_sync=2))
    got = [learning_rate(cfg, it) for it in range(14)]
    want = [1e-5 * min(1.0, (it // 2) / 5) for it in range(14)]
    assert got == pytest.approx(want, rel=1e-12) and got[:2] == [0.0, 0.0]


def test_the_old_policy_makes_the_rollouts_and_syncs_every_n_iterations(base, tmp_path):
    """One epoch a rollout: its ratio is 1 while the old policy is the policy (right after a
    sync) and moves off 1 for the rollout after an unsynced step."""
    over = run_overrides(
        base, tmp_path, iterations=4, epochs=1, lr=3e-3, eval_every=4, samples=False
    )
    res = train(build_config({**over, "old_policy_sync": 2}))
    ratios = [r["ratio"] for r in res.history if r["iter"] >= 0]
    assert ratios[0] == 1.0 and ratios[2] == 1.0  # the old policy is the policy
    assert abs(ratios[1] - 1.0) > 1e-6 and abs(ratios[3] - 1.0) > 1e-6  # one step behind
    assert all(r["time_old_policy"] >= 0 for r in res.history if r["iter"] >= 0)
    res = train(build_config({**over, "out_dir": str(tmp_path / "lag0")}))
    assert [r["ratio"] for r in res.history if r["iter"] >= 0] == [1.0] * 4


# Routing geometry.


@pytest.mark.parametrize("n_pool,slots,G", [(14, 5, 8), (4, 2, 8), (6, 2, 3), (3, 5, 4)])
def test_shifted_plans_are_shifted_slices_of_one_permutation(n_pool, slots, G):
    perm, plans = shifted_plans(n_pool, slots, G, torch.Generator().manual_seed(n_pool))
    assert sorted(perm.tolist()) == list(range(n_pool))
    take, shift = min(slots, n_pool), max(1, n_pool // G)
    assert plans.shape == (G, take)
    for k in range(G):
        want = sorted(int(perm[(k * shift + i) % n_pool]) for i in range(take))
        assert plans[k].tolist() == want and len(set(want)) == take
    if take + shift <= n_pool and G > 1:  # neighbours share all but `shift` frames
        assert len(set(plans[0].tolist()) & set(plans[1].tolist())) == take - shift


def test_shifted_routes_fix_one_plan_over_the_window():
    model = _model()
    spec = _spec(window=(5, 8))
    c, S = model.chunk_frames, model.sink_frames
    pool, slots = _shifted_pool(model, spec)
    # older than the fork's m = recent + chunk frames: [1, 10 - 1 - 2)
    assert pool == list(range(S, 5 * c - 1 - c)) and slots == 3 - 1
    routes = _shifted_routes(model, spec, 2, 12, torch.Generator().manual_seed(0))
    assert sorted(routes) == [5, 6, 7]
    for j, frames in routes.items():
        assert frames.shape == (2 * 5, 12)
        assert (frames[:, :S] == torch.arange(S)).all()
        drawn = frames[:, S : S + slots]
        assert torch.equal(drawn, routes[5][:, S : S + slots])  # fixed over the window
        assert set(drawn.flatten().tolist()) <= set(pool)
        assert (frames[:, S + slots] == j * c - 1).all()  # the chunk's nearest frame
        assert (frames[:, S + slots + 1 :] == -1).all()
    rows = routes[5][:5, S : S + slots]  # group 0's 4 branches and its anchor row
    assert len({tuple(r) for r in rows[:4].tolist()}) > 1
    spec = _spec(window=(5, 7), route_pool=6)
    assert _shifted_pool(model, spec)[0] == list(range(12 - 6, 7))  # from the last chunk - 6


def test_shifted_routing_explores_and_keeps_the_anchor_unrouted():
    model = _model()
    ro = _rollout(model, _spec(score_after_window=True))
    c, w0 = model.chunk_frames, ro.window[0]
    win = ro.tokens[:, :, w0 * c :]
    assert (win - win[:, :1]).abs().amax() > 1e-4
    deploy = _rollout(model, _spec(routing="sample", recent_frames=3))  # shows the whole window
    torch.testing.assert_close(ro.anchor_tokens, deploy.anchor_tokens, rtol=0, atol=1e-5)


def test_routed_cache_pass_changes_only_what_attends_to_the_window():
    """The window's first chunk is denoised alike; the chunks attending to its pages differ where
    they were written under a routed context; the anchor's context is the full one either way."""
    model = _model()
    full = _rollout(model, _spec(window=(5, 7), score_after_window=True))
    routed = _rollout(model, _spec(window=(5, 7), score_after_window=True, routed_cache_pass=True))
    c = model.chunk_frames
    torch.testing.assert_close(routed.tokens[:, :, : 6 * c], full.tokens[:, :, : 6 * c])
    assert (routed.tokens[:, :, 6 * c :] - full.tokens[:, :, 6 * c :]).abs().amax() > 1e-4
    torch.testing.assert_close(routed.anchor_tokens, full.anchor_tokens, rtol=0, atol=1e-5)


def test_streaming_chunks_and_the_window_starts_they_allow():
    assert [stream_of((7, 6), j, 49) for j in (0, 6, 7, 12, 13, 48)] == [
        (0, 7),
        (0, 7),
        (7, 13),
        (7, 13),
        (13, 19),
        (43, 49),
    ]
    assert stream_of(None, 3, 6) == (0, 6)
    cfg = parse_args(["--config", str(ROOT / "configs" / "kvpo_public.yaml")])
    starts = [(cfg.window[0] + s) * 3 for s in window_shifts(cfg, 49)]
    # the public trainer's eligible forks: block 0 or 1 of streaming chunks 1-6 (latent frames)
    assert starts == [21, 24, 39, 42, 57, 60, 75, 78, 93, 96, 111, 114]
    bad = build_config(dict(window=(2, 4), window_shift=0, streaming_chunk=(3, 3)))
    with pytest.raises(ConfigError, match="inside one streaming chunk"):
        window_shifts(bad, 6)


# Rewards over the streaming chunk and the prompt segments.


def _mean_reward(videos, prompts):
    """A reward that reads the frames and the prompt: mean pixel, scaled by the prompt's length."""
    lengths = torch.tensor([len(p if isinstance(p, str) else " ".join(p)) for p in prompts])
    return videos.double().mean(dim=(1, 2, 3, 4)) * (1 + lengths.double() / 100)


@pytest.mark.parametrize("clip", [0, 3])
def test_segment_and_stream_scopes_score_their_clips(clip):
    model = _model()
    gen = torch.Generator().manual_seed(1)
    prompts = [data.fixed_switches(p, 8, (3, 6), gen) for p in data.split_prompts()[0][:2]]
    spec = _spec(window=(5, 7), streaming_chunk=(3, 5))
    ro = _rollout(model, spec, prompts=prompts)
    reward = CompositeReward({"m": 1.0}, {"m": _mean_reward})
    comps, anchor, weights = branch_rewards(
        model, ro, reward, {"segments": 0.5, "stream": 1.0}, clip
    )
    assert weights == {"segments/m": 0.5, "stream/m": 1.0}
    videos = ((model.to_video(ro.tokens.flatten(0, 1)) + 1) / 2).double()
    for i, video in enumerate(videos):
        p = prompts[i // 4]
        segs = [(0, 6, p[0]), (6, 12, p[6 // 2]), (12, 16, p[12 // 2])]  # frames, prompt
        scores = []
        for f0, f1, prompt in segs:
            if 0 < clip < f1 - f0:
                f0 = f0 + (f1 - f0 - clip) // 2
                f1 = f0 + clip
            scores.append(video[f0:f1].mean() * (1 + len(prompt) / 100))
        want = sum(scores) / len(scores)
        assert float(comps["segments/m"].flatten()[i]) == pytest.approx(float(want), rel=1e-5)
        stream = video[3 * 2 : 8 * 2].mean() * (1 + len(" ".join(p[3:8])) / 100)
        assert float(comps["stream/m"].flatten()[i]) == pytest.approx(float(stream), rel=1e-5)
    assert anchor["segments/m"].shape == (2,)
    assert [q for q, _ in segment_clips(model, prompts[0], clip)] == [
        prompts[0][0],
        prompts[0][3],
        prompts[0][6],
    ]


def test_fixed_switches_make_segments_of_one_scene():
    gen = torch.Generator().manual_seed(0)
    for prompt in data.split_prompts()[0][:20]:
        out = data.fixed_switches(prompt, 6, (2, 4), gen)
        assert out[0] == out[1] == prompt and out[2] == out[3] and out[4] == out[5]
        scenes = [data.Scene.parse(p) for p in out]
        assert len({data.scene_key(p) for p in out}) == 1
        dirs = [scenes[0].direction, scenes[2].direction, scenes[4].direction]
        assert dirs[0] != dirs[1] and dirs[1] != dirs[2]
    with pytest.raises(ValueError, match="switch chunks"):
        data.fixed_switches(prompt, 6, (6,), gen)


def test_held_out_prompts_that_train_are_refused():
    check_held_out(["a b", "c d | e f"], ["g h"])
    with pytest.raises(ConfigError, match="held-out prompt"):
        check_held_out(["a b", "c d | e f"], ["e f"])
    with pytest.raises(ConfigError, match="held-out prompt"):
        check_held_out(["a b"], ["x y | a b"])


# The presets.


def test_the_public_preset_is_the_public_config():
    """configs/kvpo_public.yaml against the values of the public train_kvpo_longlive.yaml."""
    cfg = parse_args(["--config", str(ROOT / "configs" / "kvpo_public.yaml")])
    assert (cfg.group_size, cfg.recent_frames + cfg.wan_chunk_frames) == (8, 4)  # K, m_nearest
    assert cfg.wan_sink_frames + cfg.local_window + cfg.wan_chunk_frames == 12  # local_attn_size
    assert (cfg.wan_frames, cfg.wan_chunk_frames, cfg.window[1] - cfg.window[0]) == (147, 3, 5)
    assert tuple(cfg.streaming_chunk) == (7, 6) and cfg.route_pool == 30
    assert (cfg.routing, cfg.routed_cache_pass, cfg.score_stream) == ("shifted", True, True)
    assert (cfg.likelihood, cfg.sigma_floor, cfg.log_prob_grad_steps) == ("x0", 1.0, 2)
    assert (cfg.advantage, cfg.protect, cfg.adv_clip) == ("public", "halve", 2.5)
    assert cfg.reward_scopes == {"stream": 1.0, "segments": 0.5} and cfg.segment_clip == 36
    assert (cfg.old_policy_sync, cfg.log_ratio_clamp, cfg.epochs) == (2, 20.0, 1)
    assert (cfg.clip_low, cfg.clip_high, cfg.kl, cfg.kl_coef) == (0.1, 0.2, "softmax", 10.0)
    assert (cfg.lr, cfg.lr_schedule, cfg.lr_warmup) == (1e-5, "public", 5)
    assert (cfg.weight_decay, cfg.grad_clip, cfg.ema, cfg.lora_rank) == (0.01, 1.0, 0.999, 256)
    assert (cfg.recache, cfg.global_sink, cfg.sampler) == ("longlive", True, "renoise")
    # "A | B | C | D" over 49 chunks switches at latent frames 39, 75, 111
    segs = data.segments(["A | B | C | D"] * 49)
    assert [3 * j for j in range(1, 49) if segs[j] != segs[j - 1]] == [39, 75, 111]
    spec = rollout_spec(cfg)
    assert spec.anchor and spec.routing == "shifted"


def test_the_builtin_public_preset_trains(tmp_path):
    path = tmp_path / "base12.safetensors"
    save_model(tiny_model(num_frames=12), path)
    argv = ["--config", str(ROOT / "configs" / "kvpo_public_builtin.yaml")]
    over = run_overrides(
        str(path), tmp_path / "run", samples=False, window=(4, 6), group_size=3, iterations=3
    )
    for k, v in over.items():
        argv += [f"--{k}", ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
    cfg = parse_args(argv)
    assert (cfg.likelihood, cfg.advantage, cfg.routing, cfg.old_policy_sync) == (
        "x0",
        "public",
        "shifted",
        2,
    )
    res = train(cfg)
    rows = [r for r in res.history if r["iter"] >= 0]
    assert [r["lr"] for r in rows] == pytest.approx([0.0, 0.0, 2e-6], rel=1e-12, abs=0)
    for row in rows:
        assert "reward_stream/alignment" in row and "reward_segments/path" in row
        assert row["valid_groups"] == 2 and row["window_start"] == 4 and "halved_groups" in row
        assert all(map(math.isfinite, (row["loss"], row["ratio"], row["kl"], row["grad_norm"])))
