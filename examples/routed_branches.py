"""KVPO's exploration and TVE with ``kvpo_kernels`` alone: G branches of one prompt attend to one
shared paged KV cache, each through its own routed page table (no page copied), then each
branch's Trajectory Velocity Energy gives its Gibbs probability in the group.

    python examples/routed_branches.py [--device cuda]

Each branch's output is checked against SDPA over the frames it kept, gathered by hand.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from kvpo_kernels import route_pages, routed_attention, velocity_energy


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)

    # The cache: 8 latent frames of history, a frame per page of 16 tokens; GQA, 4 query heads
    # reading 2 KV heads of dim 64. Every branch reads these same pages.
    frames, page, H, Hkv, D = 8, 16, 4, 2, 64
    k_pages = torch.randn(frames, Hkv, page, D, generator=gen).to(dev, dtype)
    v_pages = torch.randn(frames, Hkv, page, D, generator=gen).to(dev, dtype)

    # Deployment context: every frame. Exploration: G = 4 branches, each keeping every frame of
    # the perturbed window with probability 0.5; the sink (frame 0) and the most recent frame
    # (7) are never dropped.
    G, p_keep = 4, 0.5
    table = torch.arange(frames, dtype=torch.int32)
    droppable = torch.zeros(frames, dtype=torch.bool)
    droppable[1:-1] = True
    tables = route_pages(table, G, p_keep, droppable, sink_pages=1, generator=gen).to(dev)

    # One chunk's queries per branch (2 frames of 16 tokens): out [G, H, Lq, D], lse [G, H, Lq].
    q = torch.randn(G, H, 2 * page, D, generator=gen).to(dev, dtype)
    out, lse = routed_attention(q, k_pages, v_pages, tables)

    worst = 0.0
    for g in range(G):
        kept = tables[g][tables[g] >= 0].long()
        # what the kernel spares: the branch's K/V gathered into a contiguous copy
        k = k_pages[kept].transpose(0, 1).reshape(Hkv, -1, D).repeat_interleave(H // Hkv, 0)
        v = v_pages[kept].transpose(0, 1).reshape(Hkv, -1, D).repeat_interleave(H // Hkv, 0)
        ref = F.scaled_dot_product_attention(q[g].float(), k.float(), v.float())
        err = float((out[g].float() - ref).abs().max())
        worst = max(worst, err)
        print(f"branch {g}: attends to frames {kept.tolist()}, max |out - SDPA| {err:.1e}")

    # TVE: each branch's recorded velocities (4 scored steps x 32 tokens x 16 channels) against
    # the policy's replay of them, the first two steps weighed double. Differentiable.
    v_ref = torch.randn(G, 4, 2 * page, 16, generator=gen).to(dev)
    v_pred = (v_ref + 0.1 * torch.randn(v_ref.shape, generator=gen).to(dev)).requires_grad_()
    energy = velocity_energy(v_pred, v_ref, weight=torch.tensor([2.0, 2.0, 1.0, 1.0], device=dev))
    tau = 1.0
    logp = torch.log_softmax(-energy / tau, dim=0)  # the Gibbs branch log-probabilities
    advantage = torch.tensor([1.0, -1.0, 0.5, -0.5], device=dev)
    (-(advantage * logp).sum()).backward()  # pulls v_pred toward high-advantage branches
    print(
        f"TVE {[round(e, 3) for e in energy.tolist()]}, p {[round(p, 3) for p in logp.exp().tolist()]}"
    )
    return {"max_abs_error": worst, "grad_norm": float(v_pred.grad.norm())}


if __name__ == "__main__":
    main()
