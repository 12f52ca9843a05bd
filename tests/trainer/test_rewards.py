"""Built-in rewards on rendered ground truth and on corrupted videos; the reward interface."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from trainer_support import tiny_clip

from kvpo.generators import data
from kvpo.rewards import (
    BUILTIN,
    GENERIC,
    ClipReward,
    CompositeReward,
    NonFiniteVideoError,
    RewardOutputError,
    alignment_reward,
    alignment_scores,
    dynamic_reward,
    load_reward,
    motion_reward,
    path_reward,
    smoothness_reward,
    visual_reward,
)


@pytest.fixture(scope="module")
def truth():
    _, prompts = data.split_prompts()
    prompts = prompts[:8]
    g = torch.Generator().manual_seed(5)
    videos = torch.stack([data.sample_video(p, 12, 2, 24, g) for p in prompts])
    return (videos + 1) / 2, prompts


def test_ground_truth_scores_high(truth):
    videos, prompts = truth
    for name, fn in BUILTIN.items():
        if name in GENERIC:  # they measure any video's motion, not the prompt's shapes
            continue
        r = fn(videos, prompts)
        assert r.shape == (8,) and r.dtype == torch.float32
        assert r.min() > 0.6 and r.mean() > 0.85, name


def test_wrong_prompt_lowers_alignment(truth):
    videos, prompts = truth
    wrong = prompts[1:] + prompts[:1]
    assert (alignment_reward(videos, wrong) < alignment_reward(videos, prompts) - 0.2).all()


def test_reversed_motion_lowers_alignment(truth):
    videos, prompts = truth
    assert (alignment_reward(videos.flip(1), prompts) < alignment_reward(videos, prompts)).all()


def test_path_scores_the_asked_direction_and_speed(truth):
    videos, prompts = truth
    torch.testing.assert_close(
        alignment_reward(videos, prompts), alignment_scores(videos, prompts).mean(1)
    )
    good = path_reward(videos, prompts)
    # A still object, a reversed one, and one asked to go the other speed all miss the path.
    still = videos[:, :1].expand_as(videos)
    assert (path_reward(still, prompts) < good - 0.3).all()
    assert (path_reward(videos.flip(1), prompts) < good - 0.3).all()
    swap = {"slowly": "quickly", "quickly": "slowly"}
    other = [" ".join(swap.get(w, w) for w in p.split()) for p in prompts]
    assert (path_reward(videos, other) < good - 0.1).all()


def test_blur_lowers_visual_and_jitter_lowers_motion(truth):
    videos, prompts = truth
    blurred = F.avg_pool2d(videos.flatten(0, 1), 3, 1, 1).view_as(videos)
    assert (visual_reward(blurred, prompts) < visual_reward(videos, prompts) - 0.3).all()
    perm = torch.tensor([0, 6, 2, 9, 4, 11, 1, 7, 3, 10, 5, 8])
    assert (motion_reward(videos[:, perm], prompts) < motion_reward(videos, prompts) - 0.2).all()


def test_multi_prompt_direction(truth):
    g = torch.Generator().manual_seed(0)
    p = ["a large red circle moving right slowly"] * 3 + [
        "a large red circle moving down slowly"
    ] * 3
    video = (data.sample_video(p, 12, 2, 24, g)[None] + 1) / 2
    assert alignment_reward(video, [p]) > alignment_reward(video, [p[0]]) + 0.05


def test_composite_weights_and_user_reward(truth):
    videos, prompts = truth

    def brightness(v, ps):
        return v.mean(dim=(1, 2, 3, 4))

    comp = CompositeReward({"alignment": 2.0, "brightness": 0.5}, {"brightness": brightness})
    parts = comp.components(videos, prompts)
    torch.testing.assert_close(
        comp(videos, prompts),
        2.0 * alignment_reward(videos, prompts) + 0.5 * brightness(videos, prompts),
    )
    assert set(parts) == {"alignment", "brightness"}
    with pytest.raises(ValueError, match="unknown reward"):
        CompositeReward({"nope": 1.0})
    for weights in ({}, {"alignment": float("nan")}, {"alignment": 1.0, "path": float("inf")}):
        with pytest.raises(ValueError, match="non-empty dict of finite floats"):
            CompositeReward(weights)
    with pytest.raises(ValueError, match="all 0"):
        CompositeReward({"alignment": 0.0})
    with pytest.raises(ValueError, match="videos must be"):
        comp(videos[0], prompts)
    with pytest.raises(ValueError, match="prompts"):
        comp(videos, prompts[:3])
    with pytest.raises(ValueError, match="returned"):
        CompositeReward({"bad": 1.0}, {"bad": lambda v, p: torch.zeros(3)})(videos, prompts)

    def nan_on_third(v, ps):
        r = v.mean(dim=(1, 2, 3, 4)).double()
        r[2] = float("nan")
        return r

    with pytest.raises(
        RewardOutputError, match=r"'odd' returned 1 non-finite value\(s\) of .* video 2"
    ):
        CompositeReward({"odd": 1.0}, {"odd": nan_on_third})(videos, prompts)
    with pytest.raises(ValueError, match="first inf"):
        CompositeReward(
            {"odd": 1.0}, {"odd": lambda v, p: torch.full((len(p),), 1e300, dtype=torch.float64)}
        )(videos, prompts)  # finite in float64, inf once read as float32
    # NaN videos are the generator's doing: named as such, before any reward reads them
    broken = videos.clone()
    broken[1, 2, 0, 3, 3] = float("nan")
    turning = [prompts[0], [prompts[1]] * 2 + ["a small red circle moving up slowly"], *prompts[2:]]
    with pytest.raises(
        NonFiniteVideoError,
        match=r"1 of 8 hold NaN .* video 1 \(prompt '.* \| a small red circle moving up slowly'\)"
        r": the generator made them",
    ):
        comp(broken, turning)
    only = comp.components(videos, prompts, names=["brightness"])
    assert set(only) == {"brightness"} and torch.equal(only["brightness"], parts["brightness"])


USER_REWARDS = """
from __future__ import annotations

import dataclasses

import torch

SCALE = 3.0  # not callable


def brightness(videos, prompts):
    return videos.mean(dim=(1, 2, 3, 4))


@dataclasses.dataclass  # string annotations: dataclass looks its module up in sys.modules
class Contrast:
    power: float = 2.0

    def __call__(self, videos, prompts):
        return videos.std(dim=(1, 2, 3, 4)) ** self.power


class Scorers:
    red = staticmethod(lambda videos, prompts: videos[:, :, 0].mean(dim=(1, 2, 3)))
"""


def test_load_reward_from_a_module_or_a_file(truth, tmp_path, monkeypatch):
    videos, prompts = truth
    (tmp_path / "kvpo_test_user_rewards.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    as_f64 = videos.double()
    mean = as_f64.flatten(1).mean(1)
    std = as_f64.flatten(1).std(1)
    red = as_f64[:, :, 0].flatten(1).mean(1)
    for where in ("kvpo_test_user_rewards", str(tmp_path / "kvpo_test_user_rewards.py")):
        for name, want in (("brightness", mean), ("Contrast", std**2), ("Scorers.red", red)):
            fn = load_reward(f"{where}:{name}")
            torch.testing.assert_close(fn(videos, prompts).double(), want, rtol=1e-5, atol=1e-6)
    comp = CompositeReward(
        {"alignment": 1.0, "bright": 0.5},
        {"bright": load_reward(str(tmp_path / "kvpo_test_user_rewards.py:brightness"))},
    )
    torch.testing.assert_close(
        comp(videos, prompts).double(), alignment_reward(videos, prompts).double() + 0.5 * mean
    )


def test_load_reward_errors_name_the_spec(tmp_path, monkeypatch):
    (tmp_path / "kvpo_test_user_rewards.py").write_text(USER_REWARDS)
    (tmp_path / "kvpo_test_broken.py").write_text("raise RuntimeError('needs a GPU')\n")
    (tmp_path / "kvpo_test_ctor.py").write_text(
        "class Model:\n    def __init__(self):\n        raise OSError('no weights here')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec, match in (
        ("kvpo_test_user_rewards", "expected 'package.module:name'"),
        ("a:b:c", "expected"),
        (":brightness", "expected"),
        ("kvpo_test_user_rewards:", "expected"),
        ("kvpo_test_no_such_module:fn", "cannot import 'kvpo_test_no_such_module'"),
        (str(tmp_path / "none.py") + ":fn", "no file"),
        ("kvpo_test_broken:fn", "cannot import.*RuntimeError: needs a GPU"),
        ("kvpo_test_user_rewards:darkness", "has no attribute 'darkness'"),
        ("kvpo_test_user_rewards:Scorers.blue", "has no attribute 'Scorers.blue'"),
        ("kvpo_test_user_rewards:SCALE", "float is not callable"),
        ("kvpo_test_ctor:Model", r"constructing Model\(\) failed: OSError: no weights here"),
    ):
        with pytest.raises(ValueError, match=f"reward {re.escape(repr(spec))}: .*{match}"):
            load_reward(spec)


def test_rewards_run_without_autograd(truth):
    """A reward model with trainable weights keeps no graph: rewards are scores, not losses."""
    videos, prompts = truth
    head = torch.nn.Linear(3, 1)
    seen = []

    def learned(v, ps):
        seen.append(torch.is_grad_enabled())
        return head(v.mean(dim=(1, 3, 4))).squeeze(-1)

    r = CompositeReward({"learned": 1.0}, {"learned": learned}).components(videos, prompts)
    assert seen == [False] and not r["learned"].requires_grad
    with torch.no_grad():
        want = head(videos.mean(dim=(1, 3, 4))).squeeze(-1)
    torch.testing.assert_close(r["learned"], want)


@pytest.mark.parametrize(
    "name, frames",
    [("motion", 2), ("alignment", 1), ("path", 1), ("dynamic", 1), ("smoothness", 2)],
)
def test_too_short_clips_are_refused_not_nan(truth, name, frames):
    videos, prompts = truth
    with pytest.raises(ValueError, match=f"at least {frames + 1} frames"):
        CompositeReward({name: 1.0})(videos[:, :frames], prompts)
    r = CompositeReward({name: 1.0})(videos[:, : frames + 1], prompts)
    assert torch.isfinite(r).all()


def test_clip_reward_from_local_tiny_model(tmp_path, truth):
    videos, prompts = truth
    reward = ClipReward(tiny_clip(tmp_path), frames=3)
    r = reward(videos, prompts)
    assert r.shape == (8,) and torch.isfinite(r).all() and (r.abs() <= 1 + 1e-5).all()
    torch.testing.assert_close(reward(videos, prompts), r)
    assert not torch.allclose(reward(videos.flip(-1) * 0.5, prompts), r)  # depends on the frames
    comp = CompositeReward({"visual": 1.0, "clip": 1.0}, {"clip": reward})
    torch.testing.assert_close(comp(videos, prompts), visual_reward(videos, prompts) + r)


def test_clip_reward_scores_each_frame_against_its_chunks_prompt(tmp_path, truth):
    videos, prompts = truth  # 12 frames; 4 sampled: 0, 4, 7, 11; two chunks of 6 frames
    reward = ClipReward(tiny_clip(tmp_path), frames=4)
    a, b = prompts[0], "green circle"
    both = reward(videos[:1], [[a, b]])
    first = ClipReward.__call__(reward, videos[:1, [0, 4]], [a])  # frames=4 > 2: both frames
    second = reward(videos[:1, [7, 11]], [b])
    torch.testing.assert_close(both, (first + second) / 2)
    assert not torch.allclose(both, reward(videos[:1], [a]))


def test_clip_reward_bad_path(tmp_path):
    with pytest.raises(ValueError, match="CLIP config"):
        ClipReward(tmp_path / "missing")


def test_empty_video_is_not_visually_good(truth):
    videos, prompts = truth
    empty = videos[:, :, :, :1, :1].expand_as(videos).contiguous()  # background colour only
    assert (visual_reward(empty, prompts) < 0.05).all()
    assert (alignment_reward(empty, prompts) < 0.5).all()


def test_generic_rewards_against_their_formulas():
    g = torch.Generator().manual_seed(2)
    videos = torch.rand(3, 6, 3, 8, 8, generator=g, dtype=torch.float64)
    prompts = ["anything"] * 3
    d = torch.stack([(v[1:] - v[:-1]).abs().mean() for v in videos])
    torch.testing.assert_close(dynamic_reward(videos, prompts), d / (d + 0.02))
    e = torch.stack([(v[1:-1] - (v[:-2] + v[2:]) / 2).abs().mean() for v in videos])
    torch.testing.assert_close(smoothness_reward(videos, prompts), 1 - e)


def test_generic_rewards_rank_motion():
    g = torch.Generator().manual_seed(3)
    base, step = torch.rand(1, 3, 8, 8, generator=g) * 0.5, torch.rand(1, 3, 8, 8, generator=g)
    t = torch.arange(7.0).view(7, 1, 1, 1)
    still = base.expand(7, -1, -1, -1)[None]
    slow, fast = (base + 0.01 * t * step)[None], (base + 0.05 * t * step)[None]
    flicker = fast + 0.05 * (t % 2)[None] * torch.rand(1, 7, 3, 8, 8, generator=g)
    dyn = [dynamic_reward(v, ["p"]).item() for v in (still, slow, fast)]
    assert dyn[0] == 0 and dyn[0] < dyn[1] < dyn[2] < 1
    smooth = [smoothness_reward(v, ["p"]).item() for v in (still, slow, fast, flicker)]
    assert smooth[:3] == pytest.approx([1.0, 1.0, 1.0], abs=1e-6) and smooth[3] < 0.99


def test_the_example_rewards(truth):
    """examples/rewards.py, loaded as the README's command line loads it, against per-frame
    float64 formulas."""
    root = Path(__file__).resolve().parents[2]
    videos, prompts = truth
    colorful = load_reward(f"{root}/examples/rewards.py:colorfulness")(videos, prompts)
    contrast = load_reward(f"{root}/examples/rewards.py:Contrast")(videos, prompts)
    want_colorful, want_contrast = [], []
    for video in videos.double():
        c, k = [], []
        for r, g, b in video:  # each frame [C, H, W]
            rg, yb = (r - g).flatten(), ((r + g) / 2 - b).flatten()
            c.append(
                (rg.var(False) + yb.var(False)).sqrt()
                + 0.3 * (rg.mean() ** 2 + yb.mean() ** 2).sqrt()
            )
            k.append((0.299 * r + 0.587 * g + 0.114 * b).flatten().std(False))
        want_colorful.append(torch.stack(c).mean())
        want_contrast.append(torch.stack(k).mean())
    torch.testing.assert_close(colorful.double(), torch.stack(want_colorful), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(contrast.double(), torch.stack(want_contrast), rtol=1e-5, atol=1e-6)
    grey = videos.mean(2, keepdim=True).expand_as(videos)  # no colour left
    assert (load_reward(f"{root}/examples/rewards.py:colorfulness")(grey, prompts) < 1e-6).all()
    assert (colorful > 0.05).all()


def test_prompts_the_scene_rewards_cannot_read_are_named_before_scoring():
    from kvpo.rewards import CompositeReward

    scenes = [s.prompt for s in data.all_scenes()[:3]]
    CompositeReward({"alignment": 1.0, "path": 1.0}).check_prompts(scenes)
    for weights in ({"alignment": 1.0}, {"visual": 1.0, "path": 0.0}):
        with pytest.raises(ValueError, match=r"reward '(alignment|path)' .*'a cat' must name"):
            CompositeReward(weights).check_prompts([*scenes, "a cat"])
    # rewards that read no prompt take any, yours included (a name of your own)
    mine = {"bright": lambda videos, prompts: videos.mean(dim=(1, 2, 3, 4))}
    CompositeReward({"dynamic": 1.0, "bright": 1.0}, mine).check_prompts(["a cat"])


def test_reward_batch_calls_each_reward_on_slices_with_the_same_scores(truth):
    videos, prompts = truth  # 8 videos
    calls = []

    def bright(v, p):
        calls.append((v.shape[0], list(p)))
        return v.mean(dim=(1, 2, 3, 4))

    weights = {"alignment": 1.0, "motion": 0.5, "bright": 1.0}
    whole = CompositeReward(weights, {"bright": bright}).components(videos, prompts)
    assert [n for n, _ in calls] == [8]
    calls.clear()
    parts = CompositeReward(weights, {"bright": bright}, batch=3).components(videos, prompts)
    assert [n for n, _ in calls] == [3, 3, 2]  # and each slice with its own prompts
    assert [q for _, p in calls for q in p] == prompts
    for k, v in whole.items():
        torch.testing.assert_close(parts[k], v, rtol=0, atol=1e-6)
    first = {"short": lambda v, p: v.mean(dim=(1, 2, 3, 4))[:1]}  # one score for any slice
    short = CompositeReward({"short": 1.0}, first, batch=3)
    with pytest.raises(
        RewardOutputError, match=r"'short' returned 1 value\(s\) for 3 videos: .*\[B\]"
    ):
        short.components(videos, prompts)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="batch=.*videos per reward call"):
            CompositeReward(weights, {"bright": bright}, batch=bad)
