"""Rollouts: page sharing before the window, routing inside it, reproducibility, memory."""

import re
from dataclasses import replace

import pytest
import torch
from trainer_support import PROMPTS, tiny_model

from kvpo.generators.context import recache_chunks, visible_frames
from kvpo.method.rollout import (
    RolloutSpec,
    batch_noise,
    batch_step_noise,
    generate,
    rollout,
    rollout_pages,
)


def _prompts(model, n=2):
    nC = model.num_frames // model.chunk_frames
    return [[p] * nC for p in PROMPTS[:n]]


def assert_anchor_is(deployment: torch.Tensor, anchor: torch.Tensor) -> None:
    """The anchor branch (a row among the group's) against the deployment sample (a batch of the
    prompts alone): equal up to the BLAS, whose linear layers round a row differently in a batch of
    another size (5e-7 seen in a query projection), carried through the chunks' 4-step ODEs. A
    wrong context or noise differs by orders of magnitude more."""
    torch.testing.assert_close(deployment, anchor, rtol=0, atol=1e-5)


def _run(model, seed=0, **kw):
    spec = RolloutSpec(
        **{"group_size": 4, "window": (2, 4), "p_keep": 0.3, "score_after_window": True, **kw}
    )
    return rollout(model, _prompts(model), spec, torch.Generator().manual_seed(seed))


def test_identical_before_window_different_inside(model):
    ro = _run(model)
    c = model.chunk_frames
    w0, w1 = ro.window
    pre = ro.tokens[:, :, : w0 * c]
    assert torch.equal(pre, pre[:, :1].expand_as(pre))  # same noise, shared prefix
    win = ro.tokens[:, :, w0 * c :]
    spread = (win - win[:, :1]).abs().amax(dim=(2, 3, 4))  # [B, G]
    assert (spread[:, 1:] > 1e-4).any(dim=1).all(), "routing must give different branches"
    # the recorded velocities of the first window chunk's first step differ too
    v0 = ro.velocities[:, :, 0]
    assert (v0 - v0[:, :1]).abs().amax() > 1e-4


def test_prefix_pages_are_shared_not_copied(model):
    ro = _run(model)
    B, G = ro.tokens.shape[:2]
    w0 = ro.window[0]
    n_hist = len(visible_frames(model, w0))
    tab = ro.tables[w0].view(B, G, -1)[:, :, :n_hist]
    for b in range(B):
        kept = tab[b][tab[b] >= 0]
        # every branch lists pages of the same w0 * c physical prefix pages
        assert kept.unique().numel() <= w0 * model.chunk_frames
    shared = _run(model).cache_bytes
    copied = _run(model, share_pages=False)
    assert copied.cache_bytes > shared
    assert torch.equal(copied.tokens, _run(model).tokens)  # copying changes memory, not results


def test_routing_keeps_sinks_recent_frame_and_own_pages(model):
    ro = _run(model, p_keep=0.0)
    c = model.chunk_frames
    for j in range(*ro.window):
        n = len(visible_frames(model, j))
        tab = ro.tables[j]
        assert (tab[:, : model.sink_frames] >= 0).all()
        assert (tab[:, n - 1] >= 0).all()  # most recent frame
        assert (tab[:, -c:] >= 0).all()  # own pages (the last columns)
        if n - 1 > model.sink_frames:
            assert (tab[:, model.sink_frames : n - 1] == -1).all()  # p_keep = 0 drops the rest


def test_keep_all_gives_identical_branches(model):
    """Noise is never the source of variation: without routing all branches coincide."""
    ro = _run(model, p_keep=1.0)
    # up to float rounding: rows of a batched matmul may take different BLAS code paths
    torch.testing.assert_close(ro.tokens, ro.tokens[:, :1].expand_as(ro.tokens), rtol=0, atol=1e-5)
    torch.testing.assert_close(ro.anchor_tokens, ro.tokens[:, 0], rtol=0, atol=1e-5)


def test_branch_spread_is_the_pairwise_distance_from_the_fork(model):
    ro = _run(model)
    B, G = ro.tokens.shape[:2]
    fork = ro.window[0] * model.chunk_frames
    x = ro.tokens[:, :, fork:].flatten(2).double()
    want = torch.stack(
        [
            torch.stack(
                [(x[b, g] - x[b, h]).square().mean() for g in range(G) for h in range(G) if g != h]
            )
            .mean()
            .sqrt()
            / x[b].square().mean().sqrt()
            for b in range(B)
        ]
    )
    torch.testing.assert_close(ro.branch_spread().double(), want, rtol=1e-5, atol=0)
    assert bool((want > 0.01).all())  # routing made the branches differ
    assert float(_run(model, p_keep=1.0).branch_spread().max()) < 1e-4  # no routing: no spread
    # the frames before the fork do not count: a shared chunk more before it changes nothing
    chunk = ro.tokens[:, :, : model.chunk_frames]
    longer = replace(ro, tokens=torch.cat([chunk, ro.tokens], 2), window=(3, 5))
    torch.testing.assert_close(longer.branch_spread(), ro.branch_spread(), rtol=0, atol=0)


def test_reproducible_and_anchor_is_deployment_sample(model):
    a, b = _run(model, seed=3), _run(model, seed=3)
    assert torch.equal(a.tokens, b.tokens)
    assert all(torch.equal(a.tables[j], b.tables[j]) for j in a.tables)
    assert not torch.equal(a.tokens, _run(model, seed=4).tokens)
    video = generate(model, _prompts(model), torch.Generator().manual_seed(3))
    assert_anchor_is(model.to_tokens(video), a.anchor_tokens)


def test_records_and_shapes(model):
    ro = _run(model, score_steps=(0, 2), score_after_window=False)
    nC = model.num_frames // model.chunk_frames
    assert ro.chunk.tolist() == [2, 2, 3, 3]
    ts = model.timesteps()
    torch.testing.assert_close(ro.t, torch.stack([ts[0], ts[2], ts[0], ts[2]]))
    B, G, K, L, d = ro.states.shape
    assert (B, G, K) == (2, 4, 4) and L == model.chunk_frames * model.frame_tokens
    assert ro.tokens.shape[2] == nC * model.chunk_frames


def test_sample_routing_refills_the_local_window_from_older_history():
    model = tiny_model(local_window=3)  # sink 0 + frames j*c-3 .. j*c-1
    ro = _run(model, routing="sample", recent_frames=2, window=(2, 5), group_size=6)
    B, G = ro.tokens.shape[:2]
    c = model.chunk_frames
    for j in range(2, 5):
        n = len(visible_frames(model, j))
        tab = ro.tables[j].view(B, G, -1)
        hist = tab[..., :n]
        assert (hist >= 0).all() and (tab[..., n:-c] == -1).all()  # the deployment budget
        # sinks and the recent frames of a branch are its deployment ones
        assert (tab[..., :1] == tab[:, :1, :1]).all()  # the sink is a shared prefix page
        if j == 2:  # the recent frames are shared prefix pages too
            assert (hist[..., n - 2 :] == hist[:, :1, n - 2 :]).all()
    # chunk 3 sees sink 0 and frames 3, 4, 5; its one older slot holds frame 1, 2 or 3, all
    # prefix pages shared by the group: more than one of them is drawn, deployment draws frame 3
    drawn = ro.tables[3].view(B, G, -1)[..., 1]
    assert all(len(set(drawn[b].tolist())) > 1 for b in range(B))
    win = ro.tokens[:, :, 2 * c :]
    assert ((win - win[:, :1]).abs().amax(dim=(2, 3, 4))[:, 1:] > 1e-4).any(dim=1).all()
    video = generate(model, _prompts(model), torch.Generator().manual_seed(0))
    assert_anchor_is(model.to_tokens(video), ro.anchor_tokens)


def test_sample_routing_needs_a_local_window(model):
    with pytest.raises(ValueError, match="local_window=None"):
        _run(model, routing="sample")
    with pytest.raises(ValueError, match="recent_frames"):
        _run(tiny_model(local_window=3), routing="sample", recent_frames=0)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"window": (0, 2)}, "window"),
        ({"window": (2, 9)}, "window"),
        ({"window": (3, 3)}, "window"),
        ({"p_keep": 1.5}, "p_keep"),
        ({"score_steps": (5,)}, "score_steps"),
        ({"score_steps": (0, 0)}, r"score_steps=\(0, 0\) .* each step once"),
        ({"routing": "swap"}, "routing"),
        ({"group_size": 0}, "group_size=0 must be >= 1"),
        ({"explore": "noise"}, "explore='noise' must be 'routing' or 'sde'"),
        ({"branches_per_pass": -1}, "branches_per_pass=-1 must be an int >= 0"),
        ({"branches_per_pass": 1.5}, "branches_per_pass=1.5 must be an int >= 0"),
        ({"sde_noise": float("nan")}, "sde_noise=nan must be a finite number > 0"),
        ({"sde_noise": 0.0}, "sde_noise=0.0 must be a finite number > 0"),
    ],
)
def test_bad_spec(model, kw, match):
    with pytest.raises(ValueError, match=match):
        _run(model, **kw)


def test_kv_recache_changes_only_what_follows_the_switch():
    model = tiny_model(local_window=3)
    left, up = PROMPTS[0], PROMPTS[0].replace("left", "up")
    prompts = [[left, left, left, up, up]]
    videos = []
    for on in (False, True):
        model.set_recache(on)
        videos.append(generate(model, prompts, torch.Generator().manual_seed(0)))
    c = model.chunk_frames
    torch.testing.assert_close(videos[0][:, : 3 * c], videos[1][:, : 3 * c], rtol=0, atol=1e-6)
    assert (videos[0][:, 3 * c :] - videos[1][:, 3 * c :]).abs().max() > 1e-3
    # a video without a switch is untouched
    model.set_recache(True)
    same = generate(model, [[left] * 5], torch.Generator().manual_seed(0))
    model.set_recache(False)
    torch.testing.assert_close(
        same, generate(model, [[left] * 5], torch.Generator().manual_seed(0))
    )


def test_generate_rows_makes_those_videos_of_the_batch(model):
    """A rank making rows [2, 0] of a batch of 3 gets the videos the whole batch has there."""
    prompts = [[p] * 5 for p in (*PROMPTS, PROMPTS[0].replace("left", "up"))]
    full = generate(model, prompts, torch.Generator().manual_seed(4))
    part = generate(model, prompts, torch.Generator().manual_seed(4), rows=[2, 0])
    torch.testing.assert_close(part, full[[2, 0]], rtol=0, atol=1e-5)
    assert (full[0] - full[2]).abs().max() > 0.1  # different prompts and noises: a real check


def test_rollout_takes_the_noise_given(model):
    spec = RolloutSpec(group_size=2, window=(2, 4), p_keep=0.5)
    prompts = _prompts(model)
    c, nC = model.chunk_frames, model.num_frames // model.chunk_frames
    shape = (len(prompts), nC, c * model.frame_tokens, model.token_dim)
    drawn = rollout(model, prompts, spec, torch.Generator().manual_seed(1))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    given = rollout(model, prompts, spec, torch.Generator().manual_seed(9), noise=noise)
    # the same chunks before the window (no routing yet, the same noise), whatever the generator
    pre = 2 * c
    torch.testing.assert_close(given.tokens[:, :, :pre], drawn.tokens[:, :, :pre], rtol=0, atol=0)
    assert not torch.equal(given.tokens, rollout(model, prompts, spec, torch.Generator()).tokens)
    bad = (*shape[:-1], shape[-1] - 1)
    with pytest.raises(
        ValueError, match=re.escape(f"noise {bad} must be [{', '.join(map(str, shape))}]")
    ):
        rollout(model, prompts, spec, torch.Generator(), noise=noise[..., :-1])


def test_renoise_branches_share_every_step_noise(model):
    """Under the renoise sampler every branch of a group re-noises with the group's noise: with
    nothing routed out the branches and the anchor are one video, with routing they differ, and
    the re-noising noise is what was given (another draw of it makes another video)."""
    model.set_sampler("renoise")
    prompts = _prompts(model)
    gen = torch.Generator().manual_seed(5)
    noise, step_noise = batch_noise(model, 2, gen), batch_step_noise(model, 2, gen)
    nC, steps = model.num_frames // model.chunk_frames, len(model.timesteps()) - 1
    assert step_noise.shape == (2, nC, steps - 1, *noise.shape[2:])
    spec = RolloutSpec(group_size=4, window=(2, 4), p_keep=1.0)
    ro = rollout(model, prompts, spec, torch.Generator(), noise=noise, step_noise=step_noise)
    torch.testing.assert_close(ro.tokens, ro.tokens[:, :1].expand_as(ro.tokens), rtol=0, atol=1e-5)
    torch.testing.assert_close(ro.anchor_tokens, ro.tokens[:, 0], rtol=0, atol=1e-5)
    # drawn by the rollout itself: the initial noise first, then the step noise
    drawn = rollout(model, prompts, spec, torch.Generator().manual_seed(5))
    torch.testing.assert_close(drawn.tokens, ro.tokens, rtol=0, atol=1e-6)
    other = torch.randn(step_noise.shape, generator=torch.Generator().manual_seed(6))
    moved = rollout(model, prompts, spec, torch.Generator(), noise=noise, step_noise=other)
    assert (moved.tokens - ro.tokens).abs().amax() > 0.1
    routed = rollout(model, prompts, replace(spec, p_keep=0.3), torch.Generator().manual_seed(5))
    win = routed.tokens[:, :, 2 * model.chunk_frames :]
    assert ((win - win[:, :1]).abs().amax(dim=(2, 3, 4))[:, 1:] > 1e-4).any(dim=1).all()
    with pytest.raises(ValueError, match=r"step_noise \(2, 5, 1, "):
        rollout(model, prompts, spec, gen, noise=noise, step_noise=step_noise[:, :, :1])


def test_euler_draws_no_step_noise_and_keeps_its_videos(model):
    """The euler sampler (the built-in generator's) draws nothing but the initial noise, so its
    rollouts are those of a generator that has no sampler attribute at all."""
    assert model.sampler == "euler" and batch_step_noise(model, 2, torch.Generator()) is None
    ro = _run(model, seed=2)
    del model.sampler
    torch.testing.assert_close(_run(model, seed=2).tokens, ro.tokens, rtol=0, atol=0)
    model.set_sampler("renoise")
    assert (_run(model, seed=2).tokens - ro.tokens).abs().amax() > 0.1


def test_exploring_chunks_are_those_whose_context_can_differ(model):
    """drop: a frame besides the sinks and the most recent one, 0 < p_keep < 1; sample: more
    older frames than free window slots. Checked against rollouts: branches differ in a window
    exactly when it has an exploring chunk."""
    from kvpo.method.rollout import exploring_chunks

    c, s = model.chunk_frames, model.sink_frames
    drop = RolloutSpec(group_size=3, window=(1, model.num_frames // c), p_keep=0.5)
    assert exploring_chunks(model, drop) == [j for j in range(*drop.window) if j * c - 1 > s]
    assert exploring_chunks(model, replace(drop, p_keep=1.0)) == []
    assert exploring_chunks(model, replace(drop, p_keep=0.0)) == []
    old = model.local_window
    try:
        model.local_window = 3
        sample = replace(drop, routing="sample", recent_frames=2)
        # visible history: all of it while it fits sinks + window, then sinks + 3 frames
        want = [j for j in range(*drop.window) if j * c > s + 3]
        assert exploring_chunks(model, sample) == want
        for j in (want[0] - 1, want[0]):
            spec = replace(sample, window=(j, j + 1), group_size=8, anchor=False)
            ro = rollout(
                model,
                [["a red ball"] * (model.num_frames // c)],
                spec,
                torch.Generator().manual_seed(0),
            )
            differ = any(not torch.equal(ro.tokens[0, 0], ro.tokens[0, g]) for g in range(1, 8))
            assert differ == (j in want), j
    finally:
        model.local_window = old


@pytest.mark.parametrize(
    "make, kw",
    [
        ({}, {}),  # drop routing, anchor
        ({"local_window": 3}, {"routing": "sample", "recent_frames": 2, "window": (2, 5)}),
        ({}, {"explore": "sde", "score_steps": (0, 2)}),
        ({}, {"share_pages": False, "anchor": False, "record_prefix": True, "window": (3, 5)}),
        (
            {"local_window": 3, "recache": True},
            {"routing": "sample", "recent_frames": 1, "window": (1, 4)},
        ),
    ],
    ids=["drop", "sample", "sde", "copied-prefix", "recache"],
)
@pytest.mark.parametrize("per_pass", [1, 2])
def test_branch_passes_make_the_same_branches_in_less_memory(make, kw, per_pass):
    """branches_per_pass: the groups' branches rolled out a few at a time from the fork on give
    the branches of one pass (routing and noise drawn alike; BLAS rounds rows of smaller batches
    differently), while the cache holds the prefix and one pass's pages."""
    model = tiny_model(**make)
    c, nC = model.chunk_frames, model.num_frames // model.chunk_frames
    left = PROMPTS[1].replace("up", "left")
    prompts = [[PROMPTS[0]] * nC, [PROMPTS[1]] * 2 + [left] * (nC - 2)]  # a switch at chunk 2
    spec = RolloutSpec(
        **{"group_size": 4, "window": (2, 4), "p_keep": 0.3, "score_after_window": True, **kw}
    )
    one = rollout(model, prompts, spec, torch.Generator().manual_seed(5))
    split = rollout(
        model, prompts, replace(spec, branches_per_pass=per_pass), torch.Generator().manual_seed(5)
    )
    for name in ("tokens", "states", "velocities", "anchor_tokens"):
        a, b = getattr(one, name), getattr(split, name)
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=name)
    # the branches differ by far more than the tolerance: a real comparison
    assert (one.tokens - one.tokens[:, :1]).abs().amax(dim=(2, 3, 4))[:, 1:].amax(1).min() > 1e-3
    for name in ("t", "t_next", "chunk", "scored"):
        assert torch.equal(getattr(split, name), getattr(one, name)), name
    w0 = spec.window[0]
    B, Gt = len(prompts), spec.group_size + int(spec.anchor)
    for j, table in one.tables.items():
        assert torch.equal(split.tables[j] >= 0, table >= 0)  # the same routing (the page
        # ids differ: fewer scratch pages come first); the prefix is shared: see the page count
    # the pages of the scratch, the prefix (once) and one pass of B * per_pass rows, against
    # B * Gt rows at once
    page = model.new_cache(1).nbytes()

    def pages(rows: int) -> int:
        forked = rows * (nC - w0) * c + (0 if spec.share_pages else rows * w0 * c)
        if make.get("recache"):  # group 1's switch re-caches the chunks chunk 2 sees, per row
            forked += rows // B * len(recache_chunks(model, 2)) * c
        return max(B, rows) * c + B * w0 * c + forked

    rows = B * min(per_pass, Gt)
    assert split.cache_bytes == pages(rows) * page
    assert one.cache_bytes == pages(B * Gt) * page
    # what preflight reports before a run
    assert rollout_pages(model, prompts, replace(spec, branches_per_pass=per_pass)) == pages(rows)
    assert rollout_pages(model, prompts, spec) == pages(B * Gt)
    assert split.cache_bytes < one.cache_bytes
