"""GPU benchmark suite: routed_attention and velocity_energy against the baselines, one run.

    python -m benchmarks.gpu_suite [--quick] [--out results.md]

Shapes of the real target, Self-Forcing on Wan2.1-T2V-1.3B: 12 heads of dim 128, 1560 tokens per
latent frame, a chunk of 3 frames (4680 queries), 21 frames of cache, G = 8 branches keeping each
window frame with probability 0.5; plus a sweep over cache length and G. Times are medians of
``triton.testing.do_bench`` (CUDA events, L2 flushed between runs). TFLOP/s count only kept work.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util

import torch
import triton

import kvpo_kernels
from benchmarks.routed_methods import Setup, flops, gather_sdpa, make_inputs
from benchmarks.routed_methods import flex as flex_method

WAN = Setup(
    branches=8, pages=21, page_size=1560, heads=12, kv_heads=12, head_dim=128, queries=4680,
    p_keep=0.5, sinks=3, recent=3, dtype=torch.bfloat16, device="cuda",
)  # fmt: skip


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _peak(fn) -> float:
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _sdpa_flash(q, k, v, table):
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        return gather_sdpa(q, k, v, table)


def _flash_attn_paged(q, k, v, table, block=256):
    """flash_attn_with_kvcache over a block table: a page of the cache is page_size / 256 blocks."""
    from flash_attn import flash_attn_with_kvcache

    P, Hkv, ps, D = k.shape
    per = ps // block
    kc = k.permute(0, 2, 1, 3).reshape(P * per, block, Hkv, D)
    vc = v.permute(0, 2, 1, 3).reshape(P * per, block, Hkv, D)
    B = q.shape[0]
    kept = table >= 0
    lens = kept.sum(1).to(torch.int32) * ps
    n_max = int(kept.sum(1).max()) * per
    blocks = torch.zeros(B, n_max, dtype=torch.int32, device=q.device)
    for b in range(B):
        pages = table[b][kept[b]].long()
        ids = (pages[:, None] * per + torch.arange(per, device=q.device)).reshape(-1)
        blocks[b, : ids.numel()] = ids.to(torch.int32)
    return flash_attn_with_kvcache(
        q.transpose(1, 2), kc, vc, cache_seqlens=lens, block_table=blocks
    ).transpose(1, 2)


def routed_rows(s: Setup, backward: bool) -> list[dict]:
    q, k, v, table = make_inputs(s)
    methods = {
        "kvpo triton": lambda: kvpo_kernels.routed_attention(q, k, v, table, backend="triton")[0],
        "FlexAttention + BlockMask build": lambda: flex_method(q, k, v, table),
        "SDPA flash on gathered K/V": lambda: _sdpa_flash(q, k, v, table),
    }
    if kvpo_kernels._backend.native_cuda_available("routed_attn_fwd"):
        methods["kvpo cuda"] = lambda: kvpo_kernels.routed_attention(
            q, k, v, table, backend="cuda"
        )[0]
    if importlib.util.find_spec("flash_attn") is not None and s.page_size % 256 == 0:
        methods["flash_attn_with_kvcache (block table)"] = lambda: _flash_attn_paged(q, k, v, table)
    ref = methods["kvpo triton"]().float()
    rows = []
    for name, fn in methods.items():
        if backward and name.startswith("flash_attn"):
            continue  # inference-only API
        err = (fn().float() - ref).norm() / ref.norm()
        run = fn
        if backward:
            for t in (q, k, v):
                t.requires_grad_(True)

            def run(fn=fn):
                fn().backward(torch.ones_like(q))

        ms = _bench(run)
        rows.append(
            {
                "method": name,
                "ms": ms,
                "tflops": flops(s, table, backward) / ms / 1e9,
                "peak_mib": _peak(run),
                "rel_err_vs_kvpo": float(err),
            }
        )
        for t in (q, k, v):
            t.requires_grad_(False)
            t.grad = None
    return rows


def copy_bandwidth_gbs() -> float:
    x = torch.empty(2**28, dtype=torch.float32, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = _bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / ms / 1e6


def velocity_rows(G=8, S=4, N=3 * 16 * 60 * 104, dtype=torch.bfloat16) -> list[dict]:
    """Wan latents: 16 channels x 60 x 104 per frame, a chunk of 3 frames, 4 steps, G = 8."""
    a = torch.randn(G, S, N, device="cuda", dtype=dtype)
    b = torch.randn(G, S, N, device="cuda", dtype=dtype)
    w = torch.rand(S, device="cuda")
    bytes_fwd = 2 * a.numel() * a.element_size()
    bytes_bwd = 3 * a.numel() * a.element_size()  # read both, write d_pred
    copy = copy_bandwidth_gbs()
    rows = []
    for name, fn, nbytes in [
        ("kvpo triton fwd", lambda: kvpo_kernels.velocity_energy(a, b, w, "mean", backend="triton"), bytes_fwd),
        ("torch eager fwd", lambda: kvpo_kernels.velocity_energy_reference(a.float(), b.float(), w, "mean"), bytes_fwd),
        ("torch.compile fwd", torch.compile(lambda: kvpo_kernels.velocity_energy_reference(a, b, w, "mean")), bytes_fwd),
    ]:  # fmt: skip
        ms = _bench(fn)
        gbs = nbytes / ms / 1e6
        rows.append({"method": name, "ms": ms, "GB/s": gbs, "of_copy": gbs / copy})
    backends = ["triton"]
    if kvpo_kernels._backend.native_cuda_available("velocity_energy_fwd"):
        backends.append("cuda")
        ms = _bench(lambda: kvpo_kernels.velocity_energy(a, b, w, "mean", backend="cuda"))
        rows.insert(1, {"method": "kvpo cuda fwd", "ms": ms, "GB/s": bytes_fwd / ms / 1e6,
                        "of_copy": bytes_fwd / ms / 1e6 / copy})  # fmt: skip
    a.requires_grad_(True)
    for backend in backends:
        e = kvpo_kernels.velocity_energy(a, b, w, "mean", backend=backend)
        g = torch.ones_like(e)
        ms = _bench(lambda e=e, g=g: torch.autograd.grad(e, a, g, retain_graph=True))
        rows.append({"method": f"kvpo {backend} bwd", "ms": ms, "GB/s": bytes_bwd / ms / 1e6,
                     "of_copy": bytes_bwd / ms / 1e6 / copy})  # fmt: skip
    rows.append(
        {"method": "device copy (read + write)", "ms": float("nan"), "GB/s": copy, "of_copy": 1.0}
    )
    return rows


def _table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="the main shape only")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = [
        f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
    ]
    out += ["", "### routed_attention forward, Wan2.1 shape, bf16", _table(routed_rows(WAN, False))]
    out += [
        "",
        "### routed_attention forward + backward, Wan2.1 shape, bf16",
        _table(routed_rows(WAN, True)),
    ]
    out += ["", "### velocity_energy, bf16", _table(velocity_rows())]
    if not args.quick:
        fa = dataclasses.replace(WAN, page_size=1536, queries=4608)
        out += [
            "",
            "### forward, 1536-token frames (flash-attn block table needs 256 | page)",
            _table(routed_rows(fa, False)),
        ]
        for pages in (9, 21, 33):
            for g in (4, 8, 16):
                s = dataclasses.replace(WAN, pages=pages, branches=g)
                r = [
                    x
                    for x in routed_rows(s, False)
                    if x["method"] in ("kvpo triton", "FlexAttention + BlockMask build")
                ]
                out += ["", f"### sweep: {pages} frames of cache, G = {g}", _table(r)]
    text = "\n".join(out)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
