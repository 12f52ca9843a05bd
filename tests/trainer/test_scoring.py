"""Branch rewards over scoped clips (local window, post-fork video, whole video), fused."""

import types

import pytest
import torch

from kvpo.method.rollout import RolloutSpec, rollout
from kvpo.method.scoring import branch_rewards, check_clips, fused_reward
from kvpo.rewards import CompositeReward


def test_scoped_rewards_score_their_clips(model):
    """local: the perturbed window; global: the post-fork video; fused with scope x reward weights."""
    nC = model.num_frames // model.chunk_frames
    prompts = [
        ["a large red circle moving left slowly"] * 2
        + ["a large red circle moving up slowly"] * (nC - 2)
    ]
    spec = RolloutSpec(group_size=3, window=(2, 4), p_keep=0.3, anchor=True)
    ro = rollout(model, prompts, spec, torch.Generator().manual_seed(0))
    reward = CompositeReward({"alignment": 1.0, "path": 0.5, "motion": 0.0})
    comps, anchor, weights = branch_rewards(model, ro, reward, {"local": 1.0, "global": 0.25})
    assert set(comps) == set(anchor) == set(weights)
    assert set(comps) == {"local/alignment", "local/path", "global/alignment", "global/path"}
    assert weights["local/path"] == 0.5 and weights["global/alignment"] == 0.25
    c = model.chunk_frames
    vids = (model.to_video(ro.tokens[0]) + 1) / 2  # [G, F, C, H, W]
    for scope, (j0, j1) in (("local", (2, 4)), ("global", (2, nC))):
        clip = vids[:, j0 * c : j1 * c]
        want = reward.components(clip, [prompts[0][j0:j1]] * 3)
        for k in ("alignment", "path"):
            torch.testing.assert_close(comps[f"{scope}/{k}"][0], want[k])
        av = (model.to_video(ro.anchor_tokens) + 1) / 2
        torch.testing.assert_close(
            anchor[f"{scope}/path"],
            reward.components(av[:, j0 * c : j1 * c], [prompts[0][j0:j1]])["path"],
        )
    fused = fused_reward(comps, weights)
    by_hand = sum(w * comps[k] for k, w in weights.items())
    torch.testing.assert_close(fused, by_hand)
    # The default scope scores every frame and logs the weight-0 components too.
    comps, _, weights = branch_rewards(model, ro, reward, {"video": 1.0})
    assert set(comps) == {"alignment", "path", "motion"} and weights["motion"] == 0.0
    torch.testing.assert_close(comps["path"][0], reward.components(vids, [prompts[0]] * 3)["path"])


def test_a_clip_too_short_for_a_reward_is_refused_naming_it(model):
    """Rewards that measure motion need several frames (motion and smoothness 3, path 2): a
    scope whose clip is shorter at any window start is refused naming the reward, the scope and
    the window; at weight 0 a clip does not score it; a user reward's ``min_frames`` counts;
    and the frames are the decoded video's (a VAE's latent frame decodes to several)."""
    c = model.chunk_frames  # 2 frames a chunk: a one-chunk local clip has 2 frames
    windows = [(2, 3), (3, 4)]
    check_clips(model, CompositeReward({"path": 1.0, "motion": 1.0}), {"global": 1.0}, windows)
    check_clips(model, CompositeReward({"path": 1.0, "motion": 0.0}), {"local": 1.0}, windows)
    for name in ("motion", "smoothness"):
        with pytest.raises(ValueError, match=rf"'{name}' .* 3 frames.* 'local' at window \(2, 3\)"):
            check_clips(model, CompositeReward({name: 1.0}), {"local": 1.0}, windows)
    with pytest.raises(ValueError, match=r"window \(3, 4\) is chunks 3..3, 2 frames"):
        check_clips(model, CompositeReward({"motion": 1.0}), {"local": 1.0}, [(2, 4), (3, 4)])

    def own(videos, prompts):
        return videos.mean(dim=(1, 2, 3, 4))

    own.min_frames = 2 * c + 1
    reward = CompositeReward({"own": 1.0}, {"own": own})
    check_clips(model, reward, {"local": 1.0}, [(1, 4)])
    with pytest.raises(ValueError, match=r"'own' scores clips of at least 5 frames"):
        check_clips(model, reward, {"local": 1.0}, [(1, 3)])
    # Over the whole video every reward is scored, weight 0 too: only leaving it out helps.
    short = types.SimpleNamespace(chunk_frames=1, num_frames=2)
    with pytest.raises(ValueError, match="'video' .* 2 frames: leave it out of reward_weights"):
        check_clips(short, CompositeReward({"path": 1.0, "motion": 0.0}), {"video": 1.0}, [(1, 2)])
    # Wan's VAE: latent frame 0 decodes to one frame, each later one to four.
    wan_like = types.SimpleNamespace(
        chunk_frames=1,
        num_frames=4,
        video_frames=lambda a, b: slice(4 * a - 3 if a else 0, 4 * b - 3),
    )
    check_clips(wan_like, CompositeReward({"motion": 1.0}), {"local": 1.0}, [(1, 2)])
