"""The built-in generator: token layout, cache path against the teacher-forcing path, errors."""

import pytest
import torch
from trainer_support import tiny_model

from kvpo.generators.context import context_table, teacher_forcing, visible_frames
from kvpo.generators.interface import StreamingVideoGenerator
from kvpo.generators.model import ModelConfig, TinyARVideo, shifted_timesteps


def test_protocol_and_token_round_trip(model):
    assert isinstance(model, StreamingVideoGenerator)
    video = torch.rand(2, model.num_frames, 3, 8, 8) * 2 - 1
    tok = model.to_tokens(video)
    assert tok.shape == (2, model.num_frames, model.frame_tokens, model.token_dim)
    assert torch.equal(model.to_video(tok), video)
    # token 1 of frame 0 is the patch at row 0, column 1 (channels first, then pixels)
    assert torch.equal(tok[0, 0, 1].view(3, 4, 4), video[0, 0, :, 0:4, 4:8])


def test_shifted_timesteps():
    t = shifted_timesteps(4, 3.0)
    torch.testing.assert_close(t, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))


def test_streaming_cache_matches_teacher_forcing(model):
    """Chunk j's velocity through a KV cache filled chunk by chunk equals the one-shot teacher
    forcing forward with the same context."""
    torch.manual_seed(1)
    c, T, d = model.chunk_frames, model.frame_tokens, model.token_dim
    nC = model.num_frames // c
    clean = torch.randn(1, nC, c * T, d)
    cond = model.encode_prompts(["a large red circle moving left slowly"])
    xt = torch.randn(1, c * T, d)
    j = nC - 1
    with torch.no_grad():
        cache = model.new_cache(nC * c + c)
        page_map = torch.full((1, model.num_frames), -1, dtype=torch.long)
        for jj in range(j):
            own = cache.allocate(c).view(1, c)
            tab = context_table(model, page_map, torch.tensor([0]), torch.tensor([jj]), own)
            fi = (jj * c + torch.arange(c))[None]
            model(clean[:, jj], torch.zeros(1), cond, fi, tab, cache, own)
            page_map[0, jj * c : (jj + 1) * c] = own
        own = cache.allocate(c).view(1, c)
        tab = context_table(model, page_map, torch.tensor([0]), torch.tensor([j]), own)
        v_stream = model(
            xt, torch.tensor([0.5]), cond, (j * c + torch.arange(c))[None], tab, cache, own
        )

        cj = torch.arange(j)
        own_tf = cj[:, None] * c + torch.arange(c)
        pm = torch.full((1, model.num_frames), -1, dtype=torch.long)
        pm[0, : j * c] = own_tf.reshape(-1)
        clean_table = context_table(model, pm, torch.zeros(j, dtype=torch.long), cj, own_tf)
        ctx = context_table(model, pm, torch.tensor([0]), torch.tensor([j]), None)
        v_tf = teacher_forcing(
            model,
            clean[0, :j],
            cond.expand(j, -1),
            cj,
            clean_table,
            xt,
            torch.tensor([0.5]),
            cond,
            torch.tensor([j]),
            ctx,
        )
    torch.testing.assert_close(v_tf, v_stream, rtol=1e-4, atol=1e-5)


def test_context_depends_on_history(model):
    """Routing must matter: the same noisy chunk gives another velocity with another history."""
    c, T, d = model.chunk_frames, model.frame_tokens, model.token_dim
    cond = model.encode_prompts(["a large red circle moving left slowly"])
    x = torch.randn(1, c * T, d)
    pages = torch.randn(2, 1, c * T, d)

    def run(history):
        pm = torch.arange(2 * c)[None]
        own = torch.arange(c)[None] + 0
        clean_table = context_table(
            model, pm, torch.tensor([0, 0]), torch.tensor([0, 1]), torch.stack([own[0], own[0] + c])
        )
        ctx = context_table(model, pm, torch.tensor([0]), torch.tensor([2]), None)
        return teacher_forcing(
            model,
            history[:, 0],
            cond.expand(2, -1),
            torch.tensor([0, 1]),
            clean_table,
            x,
            torch.tensor([0.7]),
            cond,
            torch.tensor([2]),
            ctx,
        )

    with torch.no_grad():
        assert (run(pages) - run(pages.flip(0))).abs().max() > 1e-3


def test_local_window_and_sinks():
    m = tiny_model(num_frames=12, sink_frames=1, local_window=4)
    assert visible_frames(m, 0) == []
    assert visible_frames(m, 2) == [0, 1, 2, 3]
    assert visible_frames(m, 5) == [0, 6, 7, 8, 9]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"frame_size": 10, "patch": 4}, "multiple of patch"),
        ({"num_frames": 7}, "multiple of chunk_frames"),
        ({"heads": 3}, "divide"),
        ({"steps": 0}, "steps"),
        ({"dim": 0}, "ModelConfig.dim must be positive, got 0"),
        ({"sink_frames": 12}, r"sink_frames=12 must be in \[0, num_frames=12\)"),
        ({"sink_frames": -1}, r"sink_frames=-1 must be in \[0, num_frames=12\)"),
        ({"local_window": 0}, "local_window=0 must be >= 1 or None"),
        ({"lora_rank": -1}, "lora_rank=-1 must be an int >= 0"),
        ({"shift": 0.0}, "shift=0.0 > 0"),
    ],
)
def test_bad_model_config(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kw)


def test_forward_rejects_bad_shapes(model):
    with pytest.raises(ValueError, match="x must be"):
        model(
            torch.randn(1, 5, model.token_dim),
            torch.zeros(1),
            torch.zeros(1, 32),
            torch.zeros(1, 2, dtype=torch.long),
            torch.zeros(1, 2, dtype=torch.int32),
        )
    assert isinstance(TinyARVideo(), StreamingVideoGenerator)
