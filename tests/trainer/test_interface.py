"""kvpo.generators.interface.require_generator: a generator that lacks part of the protocol is refused as
a run starts, naming what it lacks, instead of failing inside the first rollout."""

import pytest
import torch
from trainer_support import tiny_model

from kvpo.generators.interface import GENERATOR_MEMBERS, require_generator
from kvpo.run.config import build_config
from kvpo.trainer import train


class Partial(torch.nn.Module):
    """Half a generator: the attributes, none of the methods but nn.Module's forward."""

    def __init__(self, num_frames: int = 8, chunk_frames: int = 2) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.num_frames, self.chunk_frames = num_frames, chunk_frames
        self.frame_tokens, self.token_dim, self.sink_frames, self.local_window = 4, 3, 1, None


def test_the_built_in_generator_has_every_member():
    model = tiny_model()
    require_generator(model)
    assert all(hasattr(model, name) for name in GENERATOR_MEMBERS)


@pytest.mark.parametrize(
    ("generator", "exc", "match"),
    [
        (
            Partial(),
            TypeError,
            "generator Partial lacks encode_prompts, new_cache, to_tokens, "
            "to_video, timesteps of kvpo.generators.interface.StreamingVideoGenerator",
        ),
        (object(), TypeError, "must be a torch.nn.Module implementing .*, got object"),
    ],
)
def test_what_a_generator_lacks_is_named(generator, exc, match):
    with pytest.raises(exc, match=match):
        require_generator(generator)


def test_train_refuses_it_before_anything_is_made(tmp_path):
    model = tiny_model()
    model.num_frames = 9  # chunks of 2 frames
    cfg = build_config({"iterations": 1, "out_dir": str(tmp_path / "run")})
    with pytest.raises(ValueError, match="num_frames=9 must be a multiple of chunk_frames=2"):
        train(
            cfg, generator=model, reward=lambda v, p: v.mean((1, 2, 3, 4)), prompts=(["a"], ["b"])
        )
    with pytest.raises(TypeError, match="lacks encode_prompts"):
        train(cfg, generator=Partial(), prompts=(["a"], ["b"]))
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_generator_beside_wan_dir_before_loading_anything(tmp_path):
    cfg = build_config({"wan_dir": str(tmp_path / "no_wan_here"), "out_dir": str(tmp_path / "r")})
    with pytest.raises(ValueError, match="wan_dir and train\\(generator=...\\) both name"):
        train(cfg, generator=tiny_model(), prompts=(["a"], ["b"]))
    assert not (tmp_path / "r").exists()
