"""Data parallelism for ``torchrun``: gloo on CPU, NCCL on GPU.

Each rank rolls out its shard of the iteration's prompts; rewards are all-gathered for group
statistics and logs; gradients are averaged over ranks before every optimizer step, so every rank
keeps identical weights (what DistributedDataParallel does, without wrapping the model's forward).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist


def init(device: torch.device) -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank_and_world()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when there is a GPU, else the CPU; any other name as torch reads it (a
    ValueError for CUDA where there is none)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        build = (
            "" if torch.backends.cuda.is_built() else f" (torch {torch.__version__} is a CPU build)"
        )
        raise ValueError(f"no CUDA device is available{build}")
    return device


def add_device_argument(ap: argparse.ArgumentParser) -> None:
    """``--device auto|cpu|cuda`` of a command line, read by :func:`resolve_device`."""
    ap.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA if any"
    )


def local_device(device: torch.device) -> torch.device:
    """The device this process runs on: under ``torchrun`` with several ranks, a CUDA rank takes
    ``cuda:LOCAL_RANK`` (one GPU per rank, as NCCL requires); anything else is ``device``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type != "cuda" or device.index is not None or world <= 1:
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def active() -> bool:
    """Whether this process is one of several ranks."""
    return dist.is_initialized() and dist.get_world_size() > 1


def _for_backend(x: torch.Tensor) -> torch.Tensor:
    """``x`` where the process group's collectives take it: NCCL's on the rank's GPU."""
    return x.cuda() if dist.get_backend() == "nccl" else x


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` ([n, ...], same shape on every rank) over ranks along dim 0."""
    if not active():
        return x
    home = x.device
    x = _for_backend(x)  # rewards live on the CPU
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts).to(home)


def max_over_ranks(value: int) -> int:
    """The largest of every rank's ``value`` (on every rank)."""
    if not active():
        return value
    x = _for_backend(torch.tensor([value], dtype=torch.int64))
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x.item())


def all_gather_object(obj: object) -> list:
    """Every rank's ``obj`` (picklable, any size), in rank order, on every rank."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: object) -> list | None:
    """Every rank's ``obj`` in rank order on rank 0 (None elsewhere): what only the lead writes."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


# DistributedDataParallel's default bucket size is 25 MiB; fewer, larger all-reduces suit a step
# that reduces once after the whole backward
BUCKET_MIB = 64


def average_gradients(params: list[torch.nn.Parameter], bucket_mib: float = BUCKET_MIB) -> None:
    """Replace each parameter's gradient by its mean over the ranks, in place (a missing gradient
    counts as zeros and is made), so every rank takes the same step. Gradients are all-reduced in
    buckets of about ``bucket_mib`` MiB, one dtype each: the extra memory is a bucket, not a copy
    of every gradient (a full fine-tune of a 1.3 B model has 5 GiB of float32 gradients)."""
    if not active():
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p in params:
        by_kind.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    limit = bucket_mib * 2**20
    for grads in by_kind.values():  # every rank walks the same order: the same collectives
        bucket, size = [], 0
        for g in grads:
            bucket.append(g)
            size += g.numel() * g.element_size()
            if size >= limit:
                _all_reduce_mean(bucket, world)
                bucket, size = [], 0
        if bucket:
            _all_reduce_mean(bucket, world)


def _all_reduce_mean(grads: list[torch.Tensor], world: int) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    off = 0
    for g in grads:
        g.copy_(flat[off : off + g.numel()].view_as(g))
        off += g.numel()


def shutdown() -> None:
    """End the process group, if one was started, once every rank has come here. Without the
    barrier a rank could end the group while rank 0 was still gathering from it (kvpo.evaluate's
    last collective): once in CI the early rank aborted at exit, "terminate called without an
    active exception", and torchrun failed the run."""
    if active():
        dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
