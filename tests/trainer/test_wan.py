"""kvpo.generators.wan against diffusers' own WanTransformer3DModel forward (float64, random weights).

The reference is the unmodified transformer: its bidirectional forward over a whole clip, and its
forward over ``[clean history, noisy chunk]`` with per-token timesteps and a block-causal (and
routed) attention mask; the adapter computes the same velocities chunk by chunk from the paged
cache.
"""

import copy
import json
import math
import random
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan, WanTransformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from trainer_support import draw  # noqa: E402

from kvpo.generators.lora import merge_lora  # noqa: E402
from kvpo.generators.streaming import patchify, unpatchify  # noqa: E402
from kvpo.generators.wan import WanStreamingGenerator  # noqa: E402
from kvpo.method.rollout import generate  # noqa: E402
from kvpo.run.config import build_config  # noqa: E402
from kvpo.trainer import train  # noqa: E402

C, H, W = 4, 4, 6  # latent frame: 2 x 3 patches of 2 x 2 -> 6 tokens of 16 features
TEXT_DIM, TEXT_LEN = 16, 5


def tiny_wan(seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    tf = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=C,
        out_channels=C,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=40,
        num_layers=2,
        rope_max_seq_len=64,
    )
    with torch.no_grad():  # diffusers zero-inits nothing we rely on; make every path matter
        for p in tf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tf.double()


def text_encoder(prompts):
    """A fixed embedding per prompt (hash-seeded), [N, TEXT_LEN, TEXT_DIM] float64."""
    out = []
    for p in prompts:
        g = torch.Generator().manual_seed(sum(map(ord, p)))
        out.append(torch.randn(TEXT_LEN, TEXT_DIM, generator=g, dtype=torch.float64))
    return torch.stack(out)


def make(num_frames=6, chunk_frames=2, **kw):
    tf = tiny_wan()
    ref = copy.deepcopy(tf)
    gen = WanStreamingGenerator(tf, text_encoder, (C, H, W), num_frames, chunk_frames, **kw)
    return gen, ref


def latents(n, frames, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, frames, C, H, W, generator=g, dtype=torch.float64)


class MaskedProcessor(WanAttnProcessor):
    """diffusers' own processor with a boolean attention mask (True = attend)."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None
    ):
        return super().__call__(attn, hidden_states, None, self.mask, rotary_emb)


def reference(ref, z, timestep, text, mask=None, patch=(2, 2)):
    """diffusers' forward: z [N, F, C, h, w], timestep [N] or [N, tokens] (0..1000) -> tokens."""
    if mask is not None:
        for block in ref.blocks:
            block.attn1.set_processor(MaskedProcessor(mask))
    out = ref(z.transpose(1, 2), timestep, text, return_dict=False)[0]
    return patchify(out.transpose(1, 2), *patch)


def test_one_chunk_over_the_whole_clip_is_the_bidirectional_forward():
    gen, ref = make(num_frames=4, chunk_frames=4)
    z = latents(2, 4)
    prompts = ["a cat", "a dog on a boat"]
    cond = gen.encode_prompts(prompts)
    t = torch.tensor([0.6, 0.25])
    fi = torch.arange(4).expand(2, 4)
    table = torch.arange(8, dtype=torch.int32).view(2, 4)  # each row its own 4 pages
    v = gen(patchify(z, 2, 2).flatten(1, 2), t, cond, fi, table)
    want = reference(ref, z, t * 1000.0, text_encoder(prompts))
    assert v.shape == (2, 4 * 6, 16) and v.dtype == torch.float64
    torch.testing.assert_close(v, want.flatten(1, 2), rtol=1e-9, atol=1e-10)


def test_streaming_with_routed_cache_is_the_block_causal_forward():
    """Clean chunks 0 and 1 go through the cache at t = 0; chunk 2 is denoised at t = 0.7, with
    row 1 routed: frame 1 dropped from its history."""
    c, nC, T = 2, 3, 6
    gen, ref = make(num_frames=c * nC, chunk_frames=c)
    z = latents(2, c * nC)
    prompts = ["a red car", "two birds"]
    cond = gen.encode_prompts(prompts)
    cache = gen.new_cache(2 * c * nC)
    tokens = patchify(z, 2, 2)  # [2, F, T, 16]
    pages = []  # [2, c] page ids of each chunk
    outs = []
    for j in range(nC):
        slots = cache.allocate(2 * c).view(2, c)
        pages.append(slots)
        table = torch.cat(pages, dim=1).to(torch.int32)
        if j == nC - 1:
            table[1, 1] = -1  # routed out
        t = torch.full((2,), 0.0 if j < nC - 1 else 0.7)
        fi = torch.arange(j * c, (j + 1) * c).expand(2, c)
        x = tokens[:, j * c : (j + 1) * c].flatten(1, 2)
        outs.append(gen(x, t, cond, fi, table, cache, slots))
    got = torch.cat(outs, dim=1)  # [2, F*T, 16]

    chunk = torch.arange(c * nC * T) // (c * T)
    frame = torch.arange(c * nC * T) // T
    timestep = torch.where(chunk == nC - 1, 700.0, 0.0).expand(2, -1)
    for row in range(2):
        mask = chunk[None, :] <= chunk[:, None]
        if row == 1:
            mask &= ~((chunk[:, None] == nC - 1) & (frame[None, :] == 1))
        want = reference(
            ref, z[row : row + 1], timestep[row : row + 1], text_encoder([prompts[row]]), mask
        )
        torch.testing.assert_close(got[row], want[0].flatten(0, 1), rtol=1e-9, atol=1e-10)
    # the dropped frame changed the routed row's chunk and nothing else
    full = reference(
        ref, z[1:], timestep[1:], text_encoder([prompts[1]]), chunk[None, :] <= chunk[:, None]
    )
    assert (got[1, -c * T :] - full[0, -c:].flatten(0, 1)).abs().max() > 1e-3
    torch.testing.assert_close(got[1, : -c * T], full[0, :-c].flatten(0, 1), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("seed", range(12))
def test_streaming_is_the_block_causal_forward_on_random_layouts(seed):
    """Random transformer shapes (heads, head dim, patch, layers, fused q/k/v projections), latent
    sizes, chunk layouts, per-chunk timesteps, cache page ids and routing (any history frame of
    any chunk dropped per row): the streamed velocities are diffusers' forward with per-token
    timesteps and that row's mask."""
    rng = random.Random(seed)
    heads, head_dim = rng.choice([1, 2, 3]), rng.choice([8, 12, 16, 20])
    ph, pw = rng.choice([1, 2]), rng.choice([1, 2])
    h, w = ph * rng.randint(1, 3), pw * rng.randint(1, 3)
    c, nC = rng.randint(1, 3), rng.randint(1, 3)
    F, T, R = c * nC, (h // ph) * (w // pw), 2
    torch.manual_seed(seed)
    tf = WanTransformer3DModel(
        patch_size=(1, ph, pw),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=C,
        out_channels=C,
        text_dim=TEXT_DIM,
        freq_dim=16,
        ffn_dim=24,
        num_layers=rng.randint(1, 2),
        rope_max_seq_len=32,
    )
    with torch.no_grad():
        for p in tf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tf = tf.double()
    ref = copy.deepcopy(tf)
    if rng.random() < 0.5:
        for block in tf.blocks:
            block.attn1.fuse_projections()
    gen = WanStreamingGenerator(tf, text_encoder, (C, h, w), F, c)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(R, F, C, h, w, generator=g, dtype=torch.float64)
    t_chunk = torch.rand(R, nC, generator=g, dtype=torch.float64)
    prompts = [f"prompt {seed} {r}" for r in range(R)]
    cond = gen.encode_prompts(prompts)
    cache = gen.new_cache(R * F + 3)
    page_of = torch.randperm(R * F + 3, generator=g)[: R * F].view(R, F)  # page of (row, frame)
    dropped = torch.rand(R, nC, F, generator=g) < 0.4  # [row, query chunk, key frame]
    tokens = patchify(z, ph, pw)
    outs = []
    for j in range(nC):
        now = slice(j * c, (j + 1) * c)
        dropped[:, j, j * c :] = False  # a chunk always sees itself
        table = page_of[:, : (j + 1) * c].masked_fill(dropped[:, j, : (j + 1) * c], -1)
        fi = torch.arange(j * c, (j + 1) * c).expand(R, c)
        x = tokens[:, now].flatten(1, 2)
        outs.append(gen(x, t_chunk[:, j], cond, fi, table.int(), cache, page_of[:, now]))
    got = torch.cat(outs, dim=1)

    chunk = torch.arange(F * T) // (c * T)
    frame = torch.arange(F * T) // T
    for row in range(R):
        mask = (chunk[None, :] <= chunk[:, None]) & ~dropped[row][chunk[:, None], frame[None, :]]
        timestep = (t_chunk[row, chunk] * 1000.0)[None]
        want = reference(
            ref, z[row : row + 1], timestep, text_encoder([prompts[row]]), mask, (ph, pw)
        )
        torch.testing.assert_close(got[row], want[0].flatten(0, 1), rtol=1e-9, atol=1e-10)


@torch.no_grad()
def self_forcing_inference(ref, noise, step_noise, text, c, denoising_steps, shift):
    """Self-Forcing's causal inference (``CausalInferencePipeline``), from its semantics, in
    float64 on diffusers' transformer: block by block, each of the few steps predicts
    ``x0 = x_t - sigma v`` with the block attending to the clean blocks before it, then re-noises
    ``x0`` to the next sigma with that step's noise; the last step's x0 is the block, whose clean
    pass at t = 0 is what later blocks attend to (the block-causal forward over the clean history).

    noise: [1, F, C, h, w] latents; step_noise: [1, F // c, S - 1, c, C, h, w]. Returns latents.
    """
    s = torch.tensor(denoising_steps, dtype=torch.float64) / 1000
    # warp_denoising_step: the shifted values, held in float32 as Self-Forcing's scheduler holds them
    sigmas = [*(shift * s / (1 + (shift - 1) * s)).float().tolist(), 0.0]
    F = noise.shape[1]
    clean = []
    for j in range(F // c):
        x = noise[:, j * c : (j + 1) * c]
        for k, sigma in enumerate(sigmas[:-1]):
            z = torch.cat([*clean, x], dim=1)
            frames = z.shape[1]
            T = z.shape[-2] * z.shape[-1] // 4
            chunk = torch.arange(frames * T) // (c * T)
            mask = chunk[None, :] <= chunk[:, None]
            timestep = torch.where(chunk == j, sigma * 1000.0, 0.0)[None]
            v = reference(ref, z, timestep, text, mask)[:, -c:]  # [1, c, T, 16] tokens
            x0 = x - sigma * unpatchify(v, C, H, W, 2, 2)
            nxt = sigmas[k + 1]
            x = (1 - nxt) * x0 + nxt * step_noise[:, j, k] if nxt > 0 else x0
        clean.append(x)
    return torch.cat(clean, dim=1)


def test_deployment_sampling_is_self_forcings_inference():
    """kvpo.method.rollout.generate of the adapter (its default renoise sampler, the schedule of
    Self-Forcing's [1000, 750, 500, 250] with shift 5) is Self-Forcing's own inference loop, noise
    for noise; an Euler ODE from the same initial noise is another video."""
    c, nC = 2, 3
    gen, ref = make(num_frames=c * nC, chunk_frames=c)
    assert gen.sampler == "renoise"
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, c * nC, C, H, W, generator=g, dtype=torch.float64)
    step_noise = torch.randn(1, nC, 3, c, C, H, W, generator=g, dtype=torch.float64)
    prompt = "a lighthouse at dusk"
    want = self_forcing_inference(
        ref, noise, step_noise, text_encoder([prompt]), c, (1000, 750, 500, 250), 5.0
    )

    def tok(z):  # [..., c, C, h, w] latents -> [..., c * T, d] tokens
        return patchify(z.flatten(0, -5), 2, 2).flatten(-3, -2).view(*z.shape[:-4], -1, 16)

    got = generate(
        gen,
        [[prompt] * nC],
        torch.Generator(),
        noise=tok(noise.unflatten(1, (nC, c))),
        step_noise=tok(step_noise),
    )
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    gen.sampler = "euler"
    ode = generate(gen, [[prompt] * nC], torch.Generator(), noise=tok(noise.unflatten(1, (nC, c))))
    assert float((ode - want).norm() / want.norm()) > 0.5


def test_gradient_checkpointing_gives_the_same_gradients():
    gen, _ = make(num_frames=4, chunk_frames=2)
    z = latents(1, 2)
    cond = gen.encode_prompts(["a fox"])
    args = (
        patchify(z, 2, 2).flatten(1, 2),
        torch.tensor([0.5]),
        cond,
        torch.tensor([[2, 3]]),
        torch.tensor([[0, 1]], dtype=torch.int32),
    )
    grads = []
    for remat in (False, True):
        gen.grad_checkpointing = remat
        gen.zero_grad()
        gen(*args).square().sum().backward()
        grads.append([p.grad.clone() for p in gen.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def tiny_vae() -> AutoencoderKLWan:
    """Wan's causal VAE (diffusers' AutoencoderKLWan: 4x temporal, 8x spatial compression) at toy
    width, with a latent normalization of its own."""
    torch.manual_seed(3)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=C,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.0, 0.3],
        latents_std=[1.5, 0.8, 1.0, 2.0],
    ).eval()


def tiny_vae_decode():
    """The tiny VAE decoding as load_wan's ``decode`` does: [N, T, C, h, w] -> [N, 4T - 3, 3,
    8h, 8w], latents de-normalized first."""
    vae = tiny_vae().double()
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float64).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float64).view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def decode(z):
        return vae.decode(z.transpose(1, 2) * std + mean).sample.transpose(1, 2).clamp(-1, 1)

    return decode


def decoding_generator(sink_frames: int) -> WanStreamingGenerator:
    """A float32 adapter for the trainer end to end: 5 chunks of 2 latent frames (the built-in
    generator's window bounds), decoded by the tiny VAE to 37 video frames."""
    vae_decode = tiny_vae_decode()
    gen, _ = make(
        num_frames=10,
        chunk_frames=2,
        sink_frames=sink_frames,
        decode=lambda z: vae_decode(z.double()).float(),
        temporal_stride=4,
    )
    return gen.float()


def redness(videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A reward of decoded videos [B, T', 3, H, W] in [0, 1]: red minus blue, [B]."""
    return videos[:, :, 0].mean(dim=(1, 2, 3)) - videos[:, :, 2].mean(dim=(1, 2, 3))


def test_tokens_schedule_and_decoded_frames():
    decode = tiny_vae_decode()
    gen, _ = make(decode=decode, temporal_stride=4)
    z = latents(1, 6)
    video = gen.to_video(gen.to_tokens(z))
    assert torch.equal(video, decode(z)) and video.shape == (1, 21, 3, 8 * H, 8 * W)
    for first, last in ((0, 6), (0, 2), (2, 4), (4, 6), (3, 4)):
        frames = gen.video_frames(first, last)
        # the VAE is causal: what latents [first, last) decode to is fixed by latents [0, last)
        want = decode(z[:, :last])[:, frames]
        assert want.shape[1] == 4 * (last - first) - 3 * (first == 0)
        torch.testing.assert_close(video[:, frames], want, rtol=1e-9, atol=1e-9)
        if first > 0:  # and those frames are the ones that change with latent `first`
            bumped = z.clone()
            bumped[:, first] += 1.0
            moved = (decode(bumped) - video).abs().amax(dim=(0, 2, 3, 4)) > 1e-6
            assert moved[: frames.start].sum() == 0 and moved[frames.start : frames.start + 4].all()
    ts = gen.timesteps()
    shift = 5.0
    want = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(
        ts.double(), shift * want / (1 + (shift - 1) * want), rtol=1e-6, atol=0
    )


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_frames=5, chunk_frames=2), "multiple of chunk_frames"),
        (dict(num_frames=100), "rotary"),
        (dict(steps=(0.8, 0.4)), "steps"),
        (dict(steps=(1.0, 0.5, 0.6)), "steps"),
        (dict(temporal_stride=0), "temporal_stride"),
    ],
)
def test_bad_arguments(kw, match):
    base = dict(num_frames=6, chunk_frames=2)
    with pytest.raises(ValueError, match=match):
        WanStreamingGenerator(tiny_wan(), text_encoder, (C, H, W), **{**base, **kw})


def test_bad_latent_shape_and_patch():
    with pytest.raises(ValueError, match="latent_shape"):
        WanStreamingGenerator(tiny_wan(), text_encoder, (C, H, 5), 6, 2)
    with pytest.raises(ValueError, match="latent_shape"):
        WanStreamingGenerator(tiny_wan(), text_encoder, (3, H, W), 6, 2)
    tf = WanTransformer3DModel(
        patch_size=(2, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=C,
        out_channels=C,
        text_dim=TEXT_DIM,
        num_layers=1,
    )
    with pytest.raises(ValueError, match="temporal patch"):
        WanStreamingGenerator(tf, text_encoder, (C, H, W), 6, 2)
    with pytest.raises(TypeError, match="WanTransformer3DModel"):
        WanStreamingGenerator(torch.nn.Linear(2, 2), text_encoder, (C, H, W), 6, 2)
    gen, _ = make()
    with pytest.raises(ValueError, match="text_encoder must return"):
        WanStreamingGenerator(
            tiny_wan(), lambda p: torch.zeros(len(p), TEXT_DIM), (C, H, W), 6, 2
        ).encode_prompts(["a"])
    with pytest.raises(ValueError, match="x must be"):
        gen(
            torch.zeros(1, 5, 16),
            torch.zeros(1),
            gen.encode_prompts(["a"]),
            torch.tensor([[0, 1]]),
            torch.tensor([[0, 1]], dtype=torch.int32),
        )


def test_kvpo_trains_the_adapter_with_lora(tmp_path):
    """The trainer end to end on the adapter: LoRA on the blocks (everything else frozen), sample
    routing in a local window, gradient checkpointing, bf16 autocast, rewards on the VAE-decoded
    video's local and global clips, branches rolled out two and replayed one at a time."""
    seen = []
    asked = []

    def seen_redness(videos, prompts):
        seen.append(videos.shape[1])
        asked.extend(prompts)
        return redness(videos, prompts)

    gen = decoding_generator(sink_frames=1)
    n = gen.add_lora(rank=2)
    assert n == 2 * (4 + 4 + 2)  # per block: attn1 and attn2 q/k/v/out, ffn in and out
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    cfg = build_config(
        dict(
            out_dir=str(tmp_path),
            iterations=2,
            prompts_per_iter=2,
            group_size=3,
            eval_prompts=1,
            eval_every=2,
            save_every=2,
            progress=False,
            threads=1,
            tau=0.05,
            window=(2, 4),
            routing="sample",
            local_window=2,
            recent_frames=1,
            reward_scopes={"local": 1.0, "global": 0.5},
            samples=False,
            grad_checkpointing=True,
            lr=1e-3,
            amp="bf16",
            recache=True,
            rollout_branches=2,
            replay_branches=1,
        )
    )
    prompts = (["a red car | a blue sea"], ["a sun"])
    res = train(cfg, generator=gen, reward=seen_redness, prompts=prompts)
    # the multi-prompt video: chunks 0-2 under one prompt, 3-4 under the other; the local clip
    # (the window, chunks 2-3) straddles the switch, the global one (chunks 2-4) too
    assert ["a red car", "a blue sea"] in asked and ["a red car"] + ["a blue sea"] * 2 in asked
    row = res.history[-1]
    assert all(torch.isfinite(torch.tensor(v)) for v in row.values() if isinstance(v, float))
    # local: chunks 2..3 -> latent frames 4..7 -> 16 video frames; global: 4..9 -> 24; video: 37
    assert set(seen) == {16, 24, 37}
    assert row["valid_groups"] > 0 and row["tve"] > 0  # the routed branches differ
    after = res.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    model = res.model
    x = torch.randn(1, 2 * 6, 16)
    args = (
        x,
        torch.tensor([0.4]),
        model.encode_prompts(["a red car"]).float(),
        torch.tensor([[4, 5]]),
        torch.tensor([[0, 1]], dtype=torch.int32),
    )
    with torch.no_grad():
        adapted = model(*args)
        assert merge_lora(model) == n
        torch.testing.assert_close(model(*args), adapted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [8, 14, 16, 31, 36])
def test_drawn_options_train_the_adapter(tmp_path, seed):
    """Options drawn together (trainer_support.draw: test_option_combinations' draws, there on the
    built-in generator) on the adapter, a multi-prompt video's reward on its decoded frames: the
    draws picked cover sample routing, the SDE baseline, LoRA, bf16 autocast, KV re-cache, per-step
    likelihood, local and global clips, rollouts and replays in slices. Found nothing in 60 draws
    when written; here so that a change that breaks a combination on the adapter fails."""
    over = draw(seed)
    lora = over.pop("lora_rank", 0)
    # the built-in prompts' direction switches (these prompts switch with " | "), and samples
    for name in ("multi_prompt", "eval_multi_prompt", "samples_at_eval"):
        over.pop(name, None)
    gen = decoding_generator(sink_frames=int(over.get("routing") == "sample"))
    if lora:
        gen.add_lora(rank=lora)
    cfg = build_config(
        dict(
            out_dir=str(tmp_path),
            iterations=2,
            eval_prompts=1,
            eval_every=1,
            save_every=2,
            progress=False,
            threads=1,
            tau=0.05,
            samples=False,
            lr=1e-3,
            eval_seeds=1,
            **over,
        )
    )
    prompts = (["a red car | a blue sea", "a cat", "a dog"], ["a sun"])
    result = train(cfg, generator=gen, reward=redness, prompts=prompts)
    what = json.dumps({k: str(v) for k, v in over.items()}) + f", lora_rank {lora}"
    assert [row["iter"] for row in result.history] == [-1, 0, 1], what
    for row in result.history[1:]:
        for key in ("reward", "tve", "ratio", "loss", "grad_norm", "eval_reward"):
            assert math.isfinite(row[key]), f"{what}: {key} = {row[key]}"
    assert (tmp_path / "checkpoint.safetensors").is_file(), what


def test_lora_export_folds_its_scale_for_diffusers(tmp_path):
    """export_lora of adapters with alpha != rank: diffusers' loader (alpha = rank unless told)
    on the base transformer computes what the adapted generator does."""
    from diffusers.loaders import WanLoraLoaderMixin

    from kvpo.generators.wan import export_lora
    from kvpo.run.checkpoint import CheckpointError, save_training

    gen, base = make()
    gen.add_lora(rank=2, alpha=6.0)
    with torch.no_grad():  # adapters as training leaves them (B starts at zero)
        for name, p in gen.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.05)
    opt = torch.optim.AdamW([p for p in gen.parameters() if p.requires_grad])
    meta = {"wan_dir": str(tmp_path), "lora_rank": 2, "lora_alpha": 6.0}
    ema = copy.deepcopy(gen)
    with torch.no_grad():
        for name, p in ema.named_parameters():
            if name.endswith("lora_b"):
                p.mul_(0.5)
    save_training(tmp_path / "checkpoint.safetensors", gen, opt, 1, meta, [], ema=ema)
    assert export_lora(tmp_path, tmp_path / "lora").name == "pytorch_lora_weights.safetensors"
    sd, info = WanLoraLoaderMixin.lora_state_dict(str(tmp_path / "lora"), return_lora_metadata=True)
    assert len(sd) == 2 * 2 * (4 + 4 + 2)  # A and B of 10 layers in each of 2 blocks
    WanLoraLoaderMixin.load_lora_into_transformer(sd, transformer=base, metadata=info)
    plain = WanStreamingGenerator(base, text_encoder, (C, H, W), gen.num_frames, gen.chunk_frames)
    g = torch.Generator().manual_seed(0)
    args = (
        torch.randn(1, 2 * gen.frame_tokens, gen.token_dim, generator=g, dtype=torch.float64),
        torch.tensor([0.6]),
        gen.encode_prompts(["a sun"]),
        torch.tensor([[2, 3]]),
        torch.tensor([[0, 1]], dtype=torch.int32),
    )
    with torch.no_grad():
        torch.testing.assert_close(plain(*args), gen(*args), rtol=1e-6, atol=1e-8)
    save_training(tmp_path / "full.safetensors", gen, opt, 1, {"wan_dir": "x"}, [])
    with pytest.raises(CheckpointError, match="without --lora_rank"):
        export_lora(tmp_path / "full.safetensors", tmp_path / "none")
    # the EMA's adapters, by name
    ema_file = load_file(export_lora(tmp_path, tmp_path / "lora_ema", ema=True))
    q = ema.transformer.blocks[1].attn2.to_q
    torch.testing.assert_close(
        ema_file["transformer.blocks.1.attn2.to_q.lora_B.weight"], 3.0 * q.lora_b
    )
    torch.testing.assert_close(ema_file["transformer.blocks.1.attn2.to_q.lora_A.weight"], q.lora_a)


def test_encoders_are_shared_not_parameters():
    encoder = torch.nn.Linear(3, TEXT_DIM)  # a module standing in for UMT5

    def encode_text(prompts):
        return encoder(torch.ones(len(prompts), TEXT_LEN, 3)).double()

    gen = WanStreamingGenerator(tiny_wan(), encode_text, (C, H, W), 6, 2)
    twin = copy.deepcopy(gen)
    assert twin.text_encoder is gen.text_encoder
    names = [n for n, _ in gen.named_parameters()]
    assert names and all(n.startswith("transformer.") for n in names)
    assert not any(p is q for p in encoder.parameters() for q in gen.parameters())
    torch.testing.assert_close(twin.encode_prompts(["a"]), encode_text(["a"]))


WORDS = "a red car blue sea sun on the road two birds".split()


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    """A diffusers-layout Wan2.1 directory of tiny random components (what load_wan reads)."""
    import transformers
    from trainer_support import word_tokenizer

    root = tmp_path_factory.mktemp("wan")
    tiny_wan().float().save_pretrained(root / "transformer")
    tiny_vae().save_pretrained(root / "vae")
    tok = word_tokenizer(WORDS)
    tok.save_pretrained(root / "tokenizer")
    torch.manual_seed(4)
    t5 = transformers.UMT5EncoderModel(
        transformers.UMT5Config(
            vocab_size=len(tok),
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            pad_token_id=0,
            decoder_start_token_id=0,
        )
    )
    t5.save_pretrained(root / "text_encoder")
    return root


def test_load_wan_reads_a_diffusers_directory(wan_dir):
    import transformers

    from kvpo.generators.wan import load_wan

    gen = load_wan(
        wan_dir,
        num_frames=6,
        chunk_frames=2,
        size=(32, 48),
        text_dtype=torch.float32,
        max_text_len=8,
    )
    assert gen.latent_shape == (C, 4, 6) and gen.temporal_stride == 4 and gen.frame_tokens == 6
    tf = tiny_wan().float()
    for (n, p), q in zip(gen.transformer.named_parameters(), tf.parameters(), strict=True):
        assert torch.equal(p, q), n
    # text: UMT5's last hidden states of 8 tokens, padding zeroed
    t5 = transformers.UMT5EncoderModel.from_pretrained(wan_dir / "text_encoder")
    emb = gen.encode_prompts(["a red car", "two birds on the road"])
    ids = torch.tensor([[2, 3, 4] + [0] * 5, [11, 12, 8, 9, 10] + [0] * 3])
    want = t5(input_ids=ids, attention_mask=(ids > 0).long()).last_hidden_state
    want = want * (ids > 0)[..., None]
    assert emb.shape == (2, 8, TEXT_DIM) and emb[0, 3:].abs().sum() == 0
    torch.testing.assert_close(emb, want, rtol=1e-5, atol=1e-6)
    # video: the VAE's decode of the de-normalized latents (one video at a time: the same as
    # the batch's); encode inverts the normalization
    z = latents(3, 6).float()
    video = gen.to_video(patchify(z, 2, 2))
    torch.testing.assert_close(video.double(), tiny_vae_decode()(z.double()), rtol=1e-4, atol=1e-4)
    back = gen.to_tokens(video)
    vae = tiny_vae()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    mode = vae.encode(video.transpose(1, 2)).latent_dist.mode()
    torch.testing.assert_close(back, patchify(((mode - mean) / std).transpose(1, 2), 2, 2))
    with pytest.raises(ValueError, match="lacks the diffusers folders"):
        load_wan(wan_dir / "transformer")
    with pytest.raises(ValueError, match="multiple of the VAE"):
        load_wan(wan_dir, size=(30, 48))


def test_train_cli_on_a_wan_directory(wan_dir, tmp_path):
    """python -m kvpo.train --wan_dir ... --prompts_file ... --clip_reward_path ...
    --reward_weights ... --lora_rank."""
    from trainer_support import tiny_clip

    from kvpo.trainer import main

    prompts = tmp_path / "prompts.txt"
    # a multi-prompt line (the prompt switches mid-video) and LongLive's KV re-cache
    prompts.write_text("a red car | two birds\ntwo birds\n\na blue sea\nthe sun on the road\n")
    clip = tiny_clip(tmp_path / "clip")
    out = tmp_path / "run"
    args = [
        "--wan_dir",
        str(wan_dir),
        "--wan_frames",
        "8",
        "--wan_chunk_frames",
        "2",
        "--wan_sink_frames",
        "1",
        "--wan_size",
        "32,48",
        "--prompts_file",
        str(prompts),
        "--clip_reward_path",
        str(clip),
        "--eval_prompts",
        "1",
        "--eval_seeds",
        "1",
        "--iterations",
        "2",
        "--prompts_per_iter",
        "2",
        "--group_size",
        "3",
        "--window",
        "1,3",
        "--lora_rank",
        "2",
        "--out_dir",
        str(out),
        "--progress",
        "false",
        "--threads",
        "1",
        "--eval_every",
        "2",
        "--save_every",
        "2",
        "--lr",
        "1e-3",
        "--reward_weights",
        "dynamic=0.5,smoothness=0.5,alignment=1",
        "--recache",
        "true",
        "--micro_batch",
        "1",
        "--eval_batch",
        "1",  # the recipes' one group at a time
    ]
    main(args)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [-1, 0, 1]  # the evaluation before training, iterations
    rows = rows[1:]
    # CLIP and the generic rewards; alignment reads the procedural shapes and is left out
    assert {"reward_clip", "reward_dynamic", "reward_smoothness"} <= set(rows[0])
    assert "reward_alignment" not in rows[0]
    assert math.isfinite(rows[-1]["eval_reward"]) and (out / "samples_after.gif").is_file()
    saved = load_file(out / "checkpoint.safetensors")
    assert any("lora_a" in k for k in saved) and any("transformer.blocks.0.ffn" in k for k in saved)
    # resuming keeps the adapters and goes on
    main(args + ["--iterations", "3", "--resume", str(out / "checkpoint.safetensors")])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["iter"] == 2
    check_sample_and_export(out / "checkpoint.safetensors", tmp_path)
    # a bfloat16 base under LoRA: the frozen weights stay bfloat16, the adapters float32
    half = tmp_path / "half"
    main(
        args + ["--wan_dtype", "bf16", "--amp", "bf16", "--iterations", "1", "--out_dir", str(half)]
    )
    saved = load_file(half / "checkpoint.safetensors")
    assert saved["model.transformer.blocks.0.attn1.to_q.base.weight"].dtype == torch.bfloat16
    assert saved["model.transformer.blocks.0.attn1.to_q.lora_a"].dtype == torch.float32
    assert saved["model.transformer.scale_shift_table"].dtype == torch.float32  # kept by diffusers
    # your own reward instead of CLIP, by import path, beside the generic ones
    (tmp_path / "my_reward.py").write_text(
        "def bright(videos, prompts):\n    return videos.mean(dim=(1, 2, 3, 4))\n"
    )
    own = tmp_path / "own"
    fns = ["--reward_fns", f"bright={tmp_path / 'my_reward.py'}:bright", "--clip_reward_path", ""]
    main(args + fns + ["--iterations", "1", "--out_dir", str(own)])
    row = json.loads((own / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"reward_bright", "reward_dynamic", "reward_smoothness"} <= set(row)
    assert "reward_clip" not in row and "reward_alignment" not in row
    assert row["reward"] == pytest.approx(
        row["reward_bright"] + 0.5 * (row["reward_dynamic"] + row["reward_smoothness"]), rel=1e-5
    )
    for bad, match in (
        (["--clip_reward_path", ""], "clip_reward_path"),
        (["--prompts_file", ""], "prompts_file"),
        (["--prompts_file", str(tmp_path / "none.txt")], "prompts_file"),
        (["--eval_prompts", "4"], "need more than"),
        (["--wan_checkpoint", str(tmp_path / "none.pt")], "none.pt' is not a file"),
        (["--wan_dtype", "bf16", "--lora_rank", "0"], "through LoRA"),
    ):
        with pytest.raises((ValueError, SystemExit), match=match):
            main(args + bad + ["--out_dir", str(tmp_path / "bad")])
    # paths checked before anything loads or is written
    for bad, match in (
        (
            ["--wan_dir", str(tmp_path / "nowhere")],
            r"error: config wan_dir='.*nowhere' lacks the diffusers folders \['transformer'",
        ),
        (
            ["--wan_checkpoint", str(tmp_path / "none.pt")],
            r"error: config wan_checkpoint='.*none.pt' is not a file",
        ),
    ):
        with pytest.raises(SystemExit, match=match):
            main(args + bad + ["--out_dir", str(tmp_path / "early")])
        assert not (tmp_path / "early").exists()


def test_original_layout_checkpoints_load(wan_dir, tmp_path):
    """Self-Forcing's {generator, generator_ema} with the model. prefix, and a bare safetensors
    with ComfyUI's model.diffusion_model. prefix, load into the directory's transformer."""
    from safetensors.torch import save_file

    from kvpo.generators.wan import load_wan, to_original_layout

    ema, raw = tiny_wan(7).float(), tiny_wan(8).float()
    sf = {
        name: {f"model.{k}": v for k, v in to_original_layout(m.state_dict()).items()}
        for name, m in (("generator_ema", ema), ("generator", raw))
    }
    assert "blocks.1.cross_attn.norm_k.weight" in to_original_layout(ema.state_dict())
    torch.save(sf, tmp_path / "self_forcing_dmd.pt")
    comfy = {
        f"model.diffusion_model.{k}": v for k, v in to_original_layout(raw.state_dict()).items()
    }
    save_file(comfy, tmp_path / "comfy.safetensors")
    kw = dict(num_frames=6, chunk_frames=2, size=(32, 48), text_dtype=torch.float32)
    for path, key, want in (
        (tmp_path / "self_forcing_dmd.pt", "generator_ema", ema),
        (tmp_path / "self_forcing_dmd.pt", "generator", raw),
        (tmp_path / "comfy.safetensors", "generator_ema", raw),
    ):
        gen = load_wan(wan_dir, transformer_checkpoint=path, checkpoint_key=key, **kw)
        got = gen.transformer.state_dict()
        for k, v in want.state_dict().items():
            assert torch.equal(got[k], v), (path.name, key, k)
    with pytest.raises(ValueError, match="no state dict under key"):
        load_wan(
            wan_dir,
            transformer_checkpoint=tmp_path / "self_forcing_dmd.pt",
            checkpoint_key="ema",
            **kw,
        )
    del comfy["model.diffusion_model.blocks.0.ffn.0.weight"]
    save_file(comfy, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="does not fit.*ffn.net.0.proj.weight"):
        load_wan(wan_dir, transformer_checkpoint=tmp_path / "broken.safetensors", **kw)


def test_a_lora_policy_shares_the_reference_weights():
    """One copy of the base weights serves the frozen reference, the LoRA policy and its EMA."""
    from kvpo.run.policy import load_policy

    gen, _ = make()
    ref = copy.deepcopy(gen).requires_grad_(False)
    cfg = build_config(dict(lora_rank=2, ema=0.9, out_dir="unused"))
    model, opt, ema, start, history = load_policy(cfg, ref, torch.device("cpu"), gen)
    ref_ptrs = {p.data_ptr() for p in ref.parameters()}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trained = [p for p in model.parameters() if p.requires_grad]
    assert frozen and trained and len(frozen) + len(trained) > len(ref_ptrs)
    assert {p.data_ptr() for p in frozen} == ref_ptrs  # every base tensor is the reference's
    assert not {p.data_ptr() for p in trained} & ref_ptrs
    for p, e in zip(model.parameters(), ema.model.parameters(), strict=True):
        assert (e is p) if not p.requires_grad else (e.data_ptr() not in ref_ptrs | {p.data_ptr()})
    assert all(p.requires_grad is False for p in ref.parameters())


def check_sample_and_export(ck, tmp_path):
    """A Wan run's checkpoint samples (python -m kvpo.sample) and exports, LoRA merged, as a
    diffusers transformer that computes what the trained generator does."""
    from diffusers.loaders import WanLoraLoaderMixin

    from kvpo.generators.wan import export, export_lora, from_checkpoint, load_original_weights
    from kvpo.generators.wan.__main__ import main as export_main
    from kvpo.run.checkpoint import CheckpointError, trainer_config
    from kvpo.sample import main as sample_main

    rows = sample_main(
        [
            "--checkpoint",
            str(ck),
            "--prompt",
            "a red car",
            "--prompt",
            "two birds",
            "--out",
            str(tmp_path / "s" / "grid"),
        ]
    )
    assert [r["prompt"] for r in rows] == ["a red car", "two birds"]
    assert {"dynamic", "smoothness"} <= set(rows[0]) and (tmp_path / "s" / "grid.gif").is_file()
    with pytest.raises(SystemExit, match="needs --prompt"):
        sample_main(["--checkpoint", str(ck), "--out", str(tmp_path / "s" / "x")])
    # the run's exploration on Wan: the deployment video and 2 branches, decoded by the VAE
    rows = sample_main(
        [
            "--checkpoint",
            str(ck),
            "--prompt",
            "a red car",
            "--branches",
            "2",
            "--out",
            str(tmp_path / "s" / "branches"),
        ]
    )
    assert [r["branch"] for r in rows] == ["anchor", 0, 1] and "smoothness" in rows[0]
    assert (tmp_path / "s" / "branches.gif").is_file()
    gen = from_checkpoint(ck)
    lora_b = [p for n, p in gen.named_parameters() if n.endswith("lora_b")]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # training moved the adapters
    export_main(["--checkpoint", str(ck), "--out", str(tmp_path / "exported")])
    assert export(ck, tmp_path / "exported2", ema=False) == tmp_path / "exported2"
    tf = WanTransformer3DModel.from_pretrained(tmp_path / "exported")
    plain = WanStreamingGenerator(
        tf, gen.text_encoder.fn, gen.latent_shape, gen.num_frames, gen.chunk_frames
    )
    assert not any("lora" in n for n, _ in tf.named_parameters())
    # in Wan's original layout: what Self-Forcing / LongLive load (either key), and bare
    for out, key in (("sf.pt", "generator"), ("sf.pt", "generator_ema"), ("bare.safetensors", "")):
        export_main(["--checkpoint", str(ck), "--out", str(tmp_path / out), "--original"])
        orig = WanTransformer3DModel.from_pretrained(
            Path(trainer_config(ck)["wan_dir"]) / "transformer"
        )
        load_original_weights(orig, tmp_path / out, key)
        for k, v in tf.state_dict().items():
            assert torch.equal(orig.state_dict()[k], v), (out, k)
    with pytest.raises(SystemExit, match="a .pt .* or .safetensors file"):
        export_main(["--checkpoint", str(ck), "--out", str(tmp_path / "x.bin"), "--original"])
    g = torch.Generator().manual_seed(0)
    args = (
        torch.randn(1, 2 * gen.frame_tokens, gen.token_dim, generator=g),
        torch.tensor([0.6]),
        gen.encode_prompts(["a sun"]),
        torch.tensor([[2, 3]]),
        torch.tensor([[0, 1]], dtype=torch.int32),
    )
    with torch.no_grad():
        torch.testing.assert_close(plain(*args), gen(*args), rtol=1e-5, atol=1e-5)
    # the LoRA alone, in diffusers' layout, on the base transformer the run trained: the same
    export_main(["--checkpoint", str(ck), "--out", str(tmp_path / "lora"), "--lora_only"])
    base_tf = WanTransformer3DModel.from_pretrained(
        Path(trainer_config(ck)["wan_dir"]) / "transformer"
    )
    adapted = WanStreamingGenerator(
        base_tf, gen.text_encoder.fn, gen.latent_shape, gen.num_frames, gen.chunk_frames
    )
    with torch.no_grad():
        untrained = adapted(*args)
        # what WanPipeline.load_lora_weights(directory) does
        sd, meta = WanLoraLoaderMixin.lora_state_dict(
            str(tmp_path / "lora"), return_lora_metadata=True
        )
        WanLoraLoaderMixin.load_lora_into_transformer(sd, transformer=base_tf, metadata=meta)
        torch.testing.assert_close(adapted(*args), gen(*args), rtol=1e-5, atol=1e-5)
        assert float((untrained - gen(*args)).abs().max()) > 1e-4  # the adapters matter
    with pytest.raises(CheckpointError, match="holds no EMA LoRA adapters"):
        export_lora(ck, tmp_path / "lora_ema", ema=True)
    with pytest.raises(SystemExit, match="does not exist"):
        export_main(["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "e")])
    from trainer_support import tiny_model

    from kvpo.run.checkpoint import save_model

    save_model(tiny_model(), tmp_path / "builtin.safetensors")
    with pytest.raises(SystemExit, match="not trained with --wan_dir"):
        export_main(
            ["--checkpoint", str(tmp_path / "builtin.safetensors"), "--out", str(tmp_path / "e")]
        )


def test_preflight_of_the_wan_adapter():
    """kvpo.preflight on Wan2.1's transformer: streaming and replay agree, routing explores, the
    LoRA adapters get the gradient."""
    from kvpo.method.rollout import RolloutSpec
    from kvpo.preflight import check_generator

    gen, _ = make(num_frames=8, chunk_frames=2, sink_frames=1)
    gen.requires_grad_(False)
    gen.add_lora(2)
    got = check_generator(gen, ["a red car"] * 4, RolloutSpec(window=(2, 4), p_keep=0.5))
    assert got.failures == {} and got.replay_error < 1e-20  # float64: the same to rounding
    assert got.routed_spread > 1e-3 and 0 < got.reached < got.trainable


# The Linear layers of a CausalWanAttentionBlock that LongLive's LoRA adapts (every one of them)
LONGLIVE_LORA_LAYERS = (
    *(f"self_attn.{p}" for p in "qkvo"),
    *(f"cross_attn.{p}" for p in "qkvo"),
    "ffn.0",
    "ffn.2",
)


def longlive_files(tmp_path, rank=3):
    """LongLive's files, written here in its layouts: the base ``{"generator": ...,
    "generator_ema": ...}`` with the wrapper's ``model.`` prefix in Wan's original names, and
    ``lora.pt`` = ``{"generator_lora": peft state dict, "critic_lora": {}, "step": 0}`` with
    ``base_model.model.blocks.N.<layer>.lora_A.weight`` [rank, in] / ``lora_B.weight`` [out, rank].
    Returns the paths, the raw generator's original state dict and the LoRA state dict."""
    from kvpo.generators.wan import to_original_layout

    raw, ema = tiny_wan(8).float(), tiny_wan(7).float()
    sd = {
        name: {f"model.{k}": v for k, v in to_original_layout(m.state_dict()).items()}
        for name, m in (("generator", raw), ("generator_ema", ema))
    }
    torch.save(sd, tmp_path / "longlive_base.pt")
    base = to_original_layout(raw.state_dict())
    g = torch.Generator().manual_seed(11)
    lora_sd = {}
    for i in range(len(raw.blocks)):
        for layer in LONGLIVE_LORA_LAYERS:
            out_f, in_f = base[f"blocks.{i}.{layer}.weight"].shape
            name = f"base_model.model.blocks.{i}.{layer}"
            lora_sd[f"{name}.lora_A.weight"] = 0.3 * torch.randn(rank, in_f, generator=g)
            lora_sd[f"{name}.lora_B.weight"] = 0.3 * torch.randn(out_f, rank, generator=g)
    torch.save({"generator_lora": lora_sd, "critic_lora": {}, "step": 0}, tmp_path / "lora.pt")
    return tmp_path / "longlive_base.pt", tmp_path / "lora.pt", base, lora_sd


def test_longlive_deploys_generator_and_its_lora(wan_dir, tmp_path):
    """LongLive's base (its raw generator, not the EMA) with its LoRA loaded is the transformer
    whose every adapted weight is W + (alpha / rank) B A, in float64 against diffusers' own
    model of those merged weights; the policy starts as that reference, and a LongLive-layout
    LoRA written back from a run's checkpoint holds the adapters with their scale folded."""
    from kvpo.generators.wan import (
        export_longlive_lora,
        load_longlive_lora,
        load_original_weights,
        load_wan,
        read_longlive_lora,
    )
    from kvpo.run.checkpoint import save_training
    from kvpo.run.policy import reference_and_policy

    base_pt, lora_pt, base, lora_sd = longlive_files(tmp_path, rank=3)
    merged = dict(base)
    for i in range(2):
        for layer in LONGLIVE_LORA_LAYERS:
            p = f"base_model.model.blocks.{i}.{layer}"
            a, b = lora_sd[f"{p}.lora_A.weight"].double(), lora_sd[f"{p}.lora_B.weight"].double()
            merged[f"blocks.{i}.{layer}.weight"] = (
                base[f"blocks.{i}.{layer}.weight"].double() + b @ a
            )
    torch.save(
        {"generator": {f"model.{k}": v.float() for k, v in merged.items()}}, tmp_path / "merged.pt"
    )
    want = copy.deepcopy(tiny_wan())
    load_original_weights(want, tmp_path / "merged.pt", "generator")
    kw = dict(num_frames=4, chunk_frames=2, size=(32, 48), text_dtype=torch.float32)
    gen = load_wan(wan_dir, transformer_checkpoint=base_pt, checkpoint_key="generator", **kw)
    gen.add_lora(3)
    assert load_longlive_lora(gen, lora_pt) == 2 * len(LONGLIVE_LORA_LAYERS)
    want_gen = WanStreamingGenerator(want.double(), gen.text_encoder.fn, gen.latent_shape, 4, 2)
    gen = gen.double()
    g = torch.Generator().manual_seed(0)
    args = (
        torch.randn(1, 2 * gen.frame_tokens, gen.token_dim, generator=g, dtype=torch.float64),
        torch.tensor([0.6]),
        gen.encode_prompts(["a red car"]).double(),
        torch.tensor([[2, 3]]),
        torch.tensor([[0, 1]], dtype=torch.int32),
    )
    with torch.no_grad():
        torch.testing.assert_close(gen(*args), want_gen(*args), rtol=1e-5, atol=1e-6)
    # the same layers, one by one, against the file (and rescaled for an adapter's own alpha)
    q = gen.transformer.blocks[1].attn2.to_q
    file_a = lora_sd["base_model.model.blocks.1.cross_attn.q.lora_A.weight"]
    torch.testing.assert_close(q.lora_a.data, file_a.double())
    gen2 = load_wan(wan_dir, transformer_checkpoint=base_pt, checkpoint_key="generator", **kw)
    gen2.add_lora(3, alpha=6.0)
    load_longlive_lora(gen2, lora_pt, alpha=1.5)  # the file's scale 0.5, the adapter's 2
    q2 = gen2.transformer.blocks[1].attn2.to_q
    torch.testing.assert_close(
        q2.scale * q2.lora_b.data,
        0.5 * lora_sd["base_model.model.blocks.1.cross_attn.q.lora_B.weight"],
    )
    # refusals: another rank, a missing layer, a key no adapter takes
    gen3 = load_wan(wan_dir, **kw)
    gen3.add_lora(2)
    with pytest.raises(ValueError, match="lora_rank must be the file's rank, 3"):
        load_longlive_lora(gen3, lora_pt)
    broken = dict(lora_sd)
    broken.pop("base_model.model.blocks.0.ffn.2.lora_B.weight")
    torch.save({"generator_lora": broken}, tmp_path / "broken.pt")
    gen3 = load_wan(wan_dir, **kw)
    gen3.add_lora(3)
    with pytest.raises(ValueError, match=r"no blocks.0.ffn.2.lora_A / lora_B"):
        load_longlive_lora(gen3, tmp_path / "broken.pt")
    torch.save(
        {**lora_sd, "base_model.model.head.head.lora_A.weight": torch.zeros(3, 2)},
        tmp_path / "extra.pt",
    )
    with pytest.raises(ValueError, match="keys no adapter takes"):
        load_longlive_lora(gen3, tmp_path / "extra.pt")
    assert set(read_longlive_lora(lora_pt)) == {
        k.removeprefix("base_model.model.") for k in lora_sd
    }

    # the run: the reference deploys base + LoRA, the policy starts there with trainable adapters
    cfg = build_config(
        dict(
            wan_dir=str(wan_dir),
            wan_checkpoint=str(base_pt),
            wan_checkpoint_key="generator",
            lora_rank=3,
            lora_init=str(lora_pt),
            out_dir=str(tmp_path / "run"),
        )
    )
    own = load_wan(wan_dir, transformer_checkpoint=base_pt, checkpoint_key="generator", **kw)
    ref, model, *_ = reference_and_policy(cfg, torch.device("cpu"), own)
    fargs = tuple(a.float() if a.is_floating_point() else a for a in args)
    with torch.no_grad():
        torch.testing.assert_close(model(*fargs), ref(*fargs), rtol=0, atol=0)
        torch.testing.assert_close(model(*fargs).double(), want_gen(*args), rtol=1e-4, atol=1e-5)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n.endswith(("lora_a", "lora_b")) for n in trained)
    assert not any(p.requires_grad for p in ref.parameters())
    # written back in LongLive's layout, scale folded: LongLive loads it with alpha = rank
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_b"):
                p.add_(0.01)
    ck = tmp_path / "ck.safetensors"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    save_training(ck, model, opt, 1, cfg.to_dict(), [])
    out = export_longlive_lora(ck, tmp_path / "back" / "lora.pt")
    back = torch.load(out, weights_only=True)["generator_lora"]
    assert set(back) == set(lora_sd)
    m = model.transformer.blocks[0].ffn.net[0].proj
    torch.testing.assert_close(back["base_model.model.blocks.0.ffn.0.lora_A.weight"], m.lora_a.data)
    torch.testing.assert_close(
        back["base_model.model.blocks.0.ffn.0.lora_B.weight"], m.scale * m.lora_b.data
    )
