"""Branch rewards over scoped clips (local window, post-fork video, whole video), fused."""

import torch

from kvpo.rewards import CompositeReward
from kvpo.rollout import RolloutSpec, rollout
from kvpo.scoring import branch_rewards, fused_reward


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
