"""Small models and prompts shared by the trainer tests."""

import torch

from kvpo.model import ModelConfig, TinyARVideo


def tiny_model(seed: int = 0, **overrides) -> TinyARVideo:
    """A small generator whose zero-initialised output layers are randomised, so that its
    velocities depend on the context (a freshly initialised adaLN-zero model ignores it)."""
    torch.manual_seed(seed)
    cfg = dict(
        frame_size=8,
        patch=4,
        num_frames=10,
        chunk_frames=2,
        dim=32,
        depth=2,
        heads=2,
        kv_heads=1,
        steps=3,
        shift=2.0,
    )
    cfg.update(overrides)
    model = TinyARVideo(ModelConfig(**cfg))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.weight.abs().sum() == 0:
                m.weight.normal_(0, 0.3)
                m.bias.normal_(0, 0.1)
    return model.eval()


PROMPTS = ["a large red circle moving left slowly", "a small blue square moving up quickly"]


def small_rollout(model: TinyARVideo, p_keep: float, **kw):
    """Two prompts x 3 branches, window chunks [2, 4), every chunk from the window on scored."""
    from kvpo.rollout import RolloutSpec, rollout

    nC = model.num_frames // model.chunk_frames
    spec = RolloutSpec(group_size=3, window=(2, 4), p_keep=p_keep, score_after_window=True, **kw)
    return rollout(model, [[p] * nC for p in PROMPTS], spec, torch.Generator().manual_seed(0))
