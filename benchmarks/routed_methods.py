"""Routed attention and the baselines a user would pick instead, on one shared setup.

Each method computes, for every branch row b, attention of q[b] over the tokens of the pages that
row's table keeps. Used by the CPU and GPU benchmark suites, and as a script for peak memory:

    python -m benchmarks.routed_methods METHOD [--device cpu|cuda]   # prints peak MiB
"""

from __future__ import annotations

import argparse
import resource
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kvpo_kernels


@dataclass(frozen=True)
class Setup:
    branches: int = 8  # G: rows of the batch (one prompt)
    pages: int = 16  # physical pages in the shared cache (one latent frame each)
    page_size: int = 64  # tokens per frame
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    queries: int = 128  # the current chunk's query tokens
    p_keep: float = 0.5
    sinks: int = 1
    recent: int = 1  # most recent pages, never routed out
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    seed: int = 0


def make_inputs(s: Setup):
    gen = torch.Generator().manual_seed(s.seed)
    shape_q = (s.branches, s.heads, s.queries, s.head_dim)
    shape_kv = (s.pages, s.kv_heads, s.page_size, s.head_dim)
    q = torch.randn(shape_q, generator=gen).to(s.device, s.dtype)
    k = torch.randn(shape_kv, generator=gen).to(s.device, s.dtype)
    v = torch.randn(shape_kv, generator=gen).to(s.device, s.dtype)
    base = torch.arange(s.pages, dtype=torch.int32)
    droppable = torch.zeros(s.pages, dtype=torch.bool)
    droppable[s.sinks : s.pages - s.recent] = True
    table = kvpo_kernels.route_pages(base, s.branches, s.p_keep, droppable, generator=gen)
    return q, k, v, table.to(s.device)


def kept_tokens(s: Setup, table: torch.Tensor) -> int:
    return int((table >= 0).sum()) * s.page_size


def flops(s: Setup, table: torch.Tensor, backward: bool = False) -> float:
    """Matmul FLOPs of the kept work only (QK^T and PV; backward counts 2.5x the forward)."""
    fwd = 4.0 * s.heads * s.queries * s.head_dim * kept_tokens(s, table)
    return fwd * (3.5 if backward else 1.0)


def kvpo(q, k, v, table, backend=None):
    return kvpo_kernels.routed_attention(q, k, v, table, backend=backend)[0]


def gather_sdpa(q, k, v, table):
    """Copy each branch's kept pages into a contiguous K/V, then SDPA per branch (the gather counts)."""
    outs = []
    for b in range(q.shape[0]):
        kept = table[b][table[b] >= 0].long()
        kb = k[kept].permute(1, 0, 2, 3).reshape(1, k.shape[1], -1, k.shape[3])
        vb = v[kept].permute(1, 0, 2, 3).reshape(1, v.shape[1], -1, v.shape[3])
        gqa = kb.shape[1] != q.shape[1]  # only flash and math take enable_gqa: ask only if needed
        outs.append(F.scaled_dot_product_attention(q[b : b + 1], kb, vb, enable_gqa=gqa))
    return torch.cat(outs)


def sdpa_dense_mask(q, k, v, table):
    """The whole cache once for every row, and a dense boolean mask of the kept tokens."""
    P, Hkv, ps, D = k.shape
    B = q.shape[0]
    kc = k.permute(1, 0, 2, 3).reshape(1, Hkv, P * ps, D).expand(B, -1, -1, -1)
    vc = v.permute(1, 0, 2, 3).reshape(1, Hkv, P * ps, D).expand(B, -1, -1, -1)
    kept = torch.zeros(B, P, dtype=torch.bool, device=q.device)
    rows = torch.arange(B, device=q.device)[:, None].expand_as(table)
    kept[rows[table >= 0], table[table >= 0].long()] = True
    mask = kept.repeat_interleave(ps, dim=1)[:, None, None, :].expand(B, 1, q.shape[2], P * ps)
    return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)


_flex_compiled = None


def flex(q, k, v, table, compiled: bool = True):
    """FlexAttention with a per-branch BlockMask built for this routing (the build counts)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _flex_compiled
    P, Hkv, ps, D = k.shape
    B = q.shape[0]
    kc = k.permute(1, 0, 2, 3).reshape(1, Hkv, P * ps, D).expand(B, -1, -1, -1)
    vc = v.permute(1, 0, 2, 3).reshape(1, Hkv, P * ps, D).expand(B, -1, -1, -1)
    kept = torch.zeros(B, P, dtype=torch.bool, device=q.device)
    rows = torch.arange(B, device=q.device)[:, None].expand_as(table)
    kept[rows[table >= 0], table[table >= 0].long()] = True

    def mask_mod(b, h, q_idx, kv_idx):
        return kept[b, kv_idx // ps]

    # One KV block per page where the kernels allow it (CPU; on GPU the Triton kernel needs a KV
    # block that is a multiple of its tile, so a 1560-token frame takes 128-token blocks and the
    # mask_mod resolves the blocks that straddle two pages).
    kv_block = ps if q.device.type == "cpu" or ps % 128 == 0 else 128
    block = create_block_mask(
        mask_mod, B, None, q.shape[2], P * ps, device=q.device, BLOCK_SIZE=(128, kv_block)
    )
    if compiled and _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    fn = _flex_compiled if compiled else flex_attention
    return fn(q, kc, vc, block_mask=block, enable_gqa=Hkv != q.shape[1])


METHODS = {
    "kvpo": kvpo,
    "gather_sdpa": gather_sdpa,
    "sdpa_dense_mask": sdpa_dense_mask,
    "flex": flex,
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_memory_mib(method: str, s: Setup) -> float:
    """Peak memory of one warm call beyond what was resident before it.

    CUDA: the allocator's peak. CPU: the process's resident set, sampled every 0.1 ms by a thread
    while the call runs (large blocks are mmapped by glibc, so they show while alive).
    """
    q, k, v, table = make_inputs(s)
    fn = METHODS[method]
    fn(q, k, v, table)  # warm up: compilation, workspaces, the allocator's caches
    if s.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(q, k, v, table)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return peak_rss_mib(lambda: fn(q, k, v, table))


def peak_rss_mib(call, repeats: int = 3) -> float:
    """Peak resident set of the process while ``call()`` runs ``repeats`` times, beyond what was
    resident before, sampled every 0.1 ms by a thread (large blocks are mmapped by glibc, so they
    show while alive)."""
    base = _rss_bytes()
    peak = base
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(1e-4)

    thread = threading.Thread(target=sample)
    thread.start()
    for _ in range(repeats):
        call()
    done.set()
    thread.join()
    return (peak - base) / 2**20


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("method", choices=sorted(METHODS))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"{peak_memory_mib(args.method, Setup(device=args.device)):.1f}")
