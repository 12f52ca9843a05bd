"""KVPO on Wan2.1-T2V-1.3B's shape: the streaming adapter's chunk forward and one training iteration.

    python -m benchmarks.wan_bench [--group_size 4] [--rollout_branches 0] [--out wan.md]  # a GPU
    python -m benchmarks.wan_bench --smoke --device cpu              # tiny: checks the bench runs

The transformer has Wan2.1-1.3B's configuration (30 blocks, 12 heads of 128, FFN 8960, UMT5 width
4096) with random weights (nothing is downloaded: speed and memory do not depend on the values);
text embeddings are random, 512 tokens; the reward reads the latents (no VAE, no reward model:
their cost is the user's choice). Three tables:

* one denoising step of the last chunk (3 latent frames, 4680 tokens, 18 frames of history) in
  bfloat16: :class:`kvpo.generators.wan.WanStreamingGenerator` over the paged cache against
  diffusers' own forward over all 21 frames with a block-causal mask (what streaming costs
  without a KV cache);
* one KVPO iteration (LoRA rank 256 on a bfloat16 base, gradient checkpointing, the replay's
  backward one branch at a time, bf16 autocast, drop routing with p_keep 0.5 in chunks 2-4 as
  configs/wan_self_forcing.yaml does): seconds of rollout, replay and update, and peak memory;
* kvpo.preflight's checks of the adapter at this shape under bf16 autocast (replay against
  streaming, routing, the gradient).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

WAN_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
)
SMOKE = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=32,
    ffn_dim=32,
    num_layers=2,
)


def _shape(smoke: bool) -> dict:
    """Latent frame, frames, chunk, text length of the run."""
    if smoke:
        return dict(latent=(4, 4, 6), frames=8, chunk=2, text_len=5, sinks=1, window=2)
    return dict(latent=(16, 60, 104), frames=21, chunk=3, text_len=512, sinks=3, window=12)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _ms(fn, device: torch.device, reps: int) -> tuple[float, float]:
    """Median milliseconds of fn() after a warm call, and the GiB it allocated at its peak
    beyond what was allocated before (CUDA; NaN elsewhere)."""
    fn()
    _sync(device)
    peak = float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return sorted(times)[len(times) // 2], peak


def make_generator(smoke: bool, device: torch.device, dtype: torch.dtype):
    from diffusers import WanTransformer3DModel

    from kvpo.generators.wan import WanStreamingGenerator

    s = _shape(smoke)
    torch.manual_seed(0)
    tf = WanTransformer3DModel(**(SMOKE if smoke else WAN_1_3B), rope_max_seq_len=1024)
    tf = tf.to(device, dtype)
    for name, m in tf.named_modules():  # as from_pretrained(torch_dtype=...) keeps them
        if set(name.split(".")) & set(tf._keep_in_fp32_modules):
            m.float()
    text_dim = tf.config.text_dim

    def text_encoder(prompts):
        g = torch.Generator().manual_seed(len(prompts))
        emb = torch.randn(len(prompts), s["text_len"], text_dim, generator=g)
        return emb.to(device, dtype)

    gen = WanStreamingGenerator(
        tf, text_encoder, s["latent"], s["frames"], s["chunk"], s["sinks"], s["window"]
    )
    return gen, s


def chunk_step(smoke: bool, device: torch.device, reps: int) -> list[dict]:
    """One denoising step of the last chunk: the adapter over the cache vs diffusers' forward."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from kvpo.generators.streaming import patchify

    dtype = torch.float32 if smoke else torch.bfloat16
    gen, s = make_generator(smoke, device, dtype)
    ref = copy.deepcopy(gen.transformer)
    for block in ref.blocks:
        block.attn1.set_processor(WanAttnProcessor())
    C, h, w = s["latent"]
    F, c = s["frames"], s["chunk"]
    T = gen.frame_tokens
    z = torch.randn(1, F, C, h, w, device=device, dtype=dtype)
    cond = gen.encode_prompts(["a prompt"])
    cache = gen.new_cache(F, device)
    pages = cache.allocate(F).view(1, F).to(device)
    with torch.no_grad():  # the history: clean chunks written at t = 0
        for j in range(F // c - 1):
            fr = slice(j * c, (j + 1) * c)
            gen(
                patchify(z[:, fr], 2, 2).flatten(1, 2),
                torch.zeros(1, device=device),
                cond,
                torch.arange(fr.start, fr.stop, device=device)[None],
                pages[:, : fr.stop].int(),
                cache,
                pages[:, fr],
            )
    last = slice(F - c, F)
    x = patchify(z[:, last], 2, 2).flatten(1, 2)
    t = torch.full((1,), 0.75, device=device)
    fi = torch.arange(F - c, F, device=device)[None]
    table = pages.int()

    def adapter():
        with torch.no_grad():
            return gen(x, t, cond, fi, table, cache, pages[:, last])

    chunk_of = torch.arange(F * T, device=device) // (c * T)
    mask = chunk_of[None, :] <= chunk_of[:, None]
    timestep = torch.where(chunk_of == F // c - 1, 750.0, 0.0)[None].to(device)

    class Masked(WanAttnProcessor):
        def __call__(self, attn, hs, enc=None, am=None, rotary_emb=None):
            return super().__call__(attn, hs, None, mask, rotary_emb)

    for block in ref.blocks:
        block.attn1.set_processor(Masked())

    def recompute():
        with torch.no_grad():
            return ref(z.transpose(1, 2), timestep, cond, return_dict=False)[0]

    rows, outs = [], {}
    for name, fn in (
        ("kvpo adapter, paged cache", adapter),
        ("diffusers forward, 21 frames, block-causal mask", recompute),
    ):
        try:
            ms, peak = _ms(fn, device, reps)
            outs[fn] = fn().float()
            rows.append({"method": name, "ms": ms, "peak_gib": peak, "error": ""})
        except Exception as e:  # a baseline that does not fit still gets its row
            err = f"{type(e).__name__}: {e}"[:120]
            rows.append(
                {"method": name, "ms": float("nan"), "peak_gib": float("nan"), "error": err}
            )
    if len(outs) == 2:  # the adapter's velocity against diffusers' on the last chunk
        want = patchify(outs[recompute].transpose(1, 2)[:, last], 2, 2).flatten(1, 2)
        err = (outs[adapter] - want).norm() / want.norm()
        rows[0]["error"] = f"relative error vs diffusers {err:.1e}"
    return rows


def iteration(
    smoke: bool, device: torch.device, group_size: int, out_dir: str, rollout_branches: int = 0
) -> dict:
    """One KVPO iteration of the public recipe's shape (tau_auto, as the Wan recipes set it),
    timed by the trainer's own log (``rollout_branches``: branches per group rolled out at a
    time, 0: all)."""
    from kvpo.run.config import build_config
    from kvpo.trainer import train

    gen, s = make_generator(smoke, device, torch.bfloat16)  # the frozen base, as --wan_dtype bf16
    gen.add_lora(rank=2 if smoke else 256)
    nC = s["frames"] // s["chunk"]

    def reward(videos, prompts):  # latents: the mean of channel 0 (a stand-in)
        return videos[:, :, 0].mean(dim=(1, 2, 3))

    cfg = build_config(
        dict(
            out_dir=out_dir,
            device=device.type,
            iterations=2,
            prompts_per_iter=1,
            group_size=group_size,
            rollout_branches=rollout_branches,
            window=(2, min(5, nC)),
            routing="drop",
            p_keep=0.5,
            tau_auto=1.0,
            grad_checkpointing=True,
            amp="bf16",
            replay_branches=1,
            eval_prompts=1,
            eval_seeds=1,
            eval_every=100,
            save_every=100,
            samples=False,
            progress=False,
        )
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = train(cfg, generator=gen, reward=reward, prompts=(["a prompt"], ["another"]))
    row = dict(res.history[-1])  # the second iteration: compiled and autotuned
    row["wall_s"] = time.perf_counter() - t0
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def preflight(smoke: bool, device: torch.device):
    """kvpo.preflight's checks of the adapter at this shape, as configs/wan_self_forcing.yaml
    trains it (a bfloat16 base, LoRA, gradient checkpointing, bf16 autocast, drop routing with
    p_keep 0.5 in chunks 2-4): how far bfloat16 leaves replay from streaming on the real shape."""
    from kvpo.method.rollout import RolloutSpec
    from kvpo.preflight import check_generator

    gen, s = make_generator(smoke, device, torch.bfloat16)
    gen.add_lora(rank=2 if smoke else 256)
    gen.grad_checkpointing = True
    nC = s["frames"] // s["chunk"]
    spec = RolloutSpec(window=(2, min(5, nC)), p_keep=0.5)

    def bf16() -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16)

    return check_generator(gen, ["a prompt"] * nC, spec, None, device, bf16)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model: check the bench runs")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--group_size", type=int, default=4)
    ap.add_argument("--rollout_branches", type=int, default=0, help="0: all at once")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--run_dir", default="runs/wan_bench")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [f"# KVPO on Wan2.1-1.3B's shape ({'smoke' if args.smoke else 'full'}), {name}", ""]
    lines += ["| last chunk, one step | ms | peak GiB | note |", "|---|---:|---:|---|"]
    for r in chunk_step(args.smoke, device, args.reps):
        lines.append(f"| {r['method']} | {r['ms']:.2f} | {r['peak_gib']:.2f} | {r['error']} |")
    print("\n".join(lines), flush=True)
    _write(args.out, lines)  # the first table survives whatever the iteration does
    first = len(lines)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    title = f"one iteration, G = {args.group_size}, rollout_branches = {args.rollout_branches}"
    lines += ["", f"| {title} | value |", "|---|---:|"]
    try:
        it = iteration(args.smoke, device, args.group_size, args.run_dir, args.rollout_branches)
        keys = (
            "time_rollout",
            "time_reward",
            "time_reference",
            "time_tau",
            "time_replay",
            "time_update",
            "wall_s",
            "peak_gib",
            "rollout_cache_mib",
            "tau",
        )
        lines += [f"| {k} | {it[k]:{'.2e' if k == 'tau' else '.2f'}} |" for k in keys if k in it]
    except Exception as e:  # out of memory at this G, say: the row says so, the table stays
        lines.append(f"| error | {type(e).__name__}: {str(e)[:160]} |")
    print("\n".join(lines[first:]))
    _write(args.out, lines)
    first = len(lines)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    lines += ["", "| preflight (kvpo.preflight) | value |", "|---|---:|"]
    try:
        pf = preflight(args.smoke, device)
        lines += [
            f"| replay error, relative (bf16) | {pf.replay_error:.2e} |",
            f"| routed branches' TVE, relative (fails if the error passes 1 % of it) "
            f"| {pf.routed_tve:.2e} |",
            f"| branch spread, one noise one context | {pf.same_spread:.2e} |",
            f"| branch spread, routed | {pf.routed_spread:.4f} |",
            f"| trainable tensors the gradient reaches | {pf.reached} of {pf.trainable} |",
            f"| failures | {'; '.join(pf.failures) or 'none'} |",
            f"| seconds | {pf.seconds:.1f} |",
        ]
    except Exception as e:  # out of memory, say: the row says so
        lines.append(f"| error | {type(e).__name__}: {str(e)[:160]} |")
    print("\n".join(lines[first:]))
    _write(args.out, lines)


def _write(path: str | None, lines: list[str]) -> None:
    if path:
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
