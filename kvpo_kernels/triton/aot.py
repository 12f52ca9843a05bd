"""Ahead-of-time compilation of the Triton kernels for GPUs this machine does not have.

``python -m kvpo_kernels.triton.aot`` builds every launch the op wrappers make (each kernel, dtype
and head dim, small and large pages, every autotuning candidate left after pruning), compiles it
with Triton's compiler and ptxas for each architecture of :data:`ARCHS` (Ampere, Ada, Hopper and
both Blackwells), and prints what each kernel asks of the SM: registers per thread, bytes spilled
to local memory (the stack frame), shared memory, and which matrix instructions it uses.

``--check`` exits non-zero when a launch would not run well: on the architectures the tile tables
were tuned and timed on (:data:`TUNED`: the A100's and the H100's) every candidate must compile
without a spill (fp32 may spill a few bytes: :data:`SPILL_BUDGET`) and within the SM's shared
memory; on the others at least one candidate of each launch must. The autotuner skips a candidate
that asks for more shared memory than the GPU has (Triton raises OutOfResources, which it catches)
and times the rest, so such a launch still runs, on a clean candidate. ``--json`` writes the
records. CI runs it (tests/kernels/test_triton_aot.py).

Needs Triton's CUDA backend (its bundled ptxas and cuobjdump) but no GPU and no driver. The
interpreter replaces the kernels, so run it with ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type
from triton.tools.tensor_descriptor import TensorDescriptor

from .._backend import TMA_MAJORS
from . import routed_attention as ra
from . import routed_attention_tma as tma
from . import velocity_energy as ve
from ._common import Launch, interpreted

# compute capability, and the most shared memory one block may ask for (bytes; the opt-in maximum)
ARCHS: dict[str, tuple[int, int]] = {
    "sm_80": (80, 163 * 1024),  # A100
    "sm_89": (89, 99 * 1024),  # L40S, RTX 4090 (Ada)
    "sm_90a": (90, 227 * 1024),  # H100, H200
    "sm_100a": (100, 227 * 1024),  # B200, GB200 (Blackwell)
    "sm_120": (120, 99 * 1024),  # RTX 5090, RTX PRO 6000 (Blackwell)
}
# Where the tile tables were tuned and timed: every candidate must be clean there.
TUNED = ("sm_80", "sm_90a")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (64, 128, 256)
# 16 tokens: the smallest block of keys; 1560: a Wan2.1 latent frame (the keys block is not capped)
PAGE_SIZES = (16, 1560)

# The triton_tma kernels: compiled for sm_90a and sm_100a only
TMA_FWD = "routed_attention.fwd_tma"
TMA_BWD_DQ = "routed_attention.bwd_dq_tma"
TMA_BWD_DKDV = "routed_attention.bwd_dkdv_tma"
TMA_BWD_FUSED = "routed_attention.bwd_fused_tma"
TMA_KERNELS = (TMA_FWD, TMA_BWD_DQ, TMA_BWD_DKDV, TMA_BWD_FUSED)

# Registers spilled that a launch may have. fp32 runs exact IEEE dots on CUDA cores, the
# correctness path rather than the fast one, and ptxas spills a few bytes in some of its tiles.
SPILL_BUDGET = {"fp16": 0, "bf16": 0, "fp32": 64}

_TYPE_NAMES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.int32: "i32",
    torch.int64: "i64",
}


@dataclass(frozen=True)
class Compiled:
    """What one compiled kernel asks of the SM."""

    kernel: str
    arch: str
    dtype: str
    head_dim: int
    page_size: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    registers: int  # per thread
    spill_bytes: int  # stack frame: registers spilled to local memory
    shared_bytes: int
    shared_limit: int
    # "tcgen05" (Blackwell's tensor-core MMA), "wgmma" (Hopper's warpgroup MMA), "mma"
    # (mma.sync), "fma" (CUDA cores), "none"
    matmul: str
    tma: bool = False  # loads through the Tensor Memory Accelerator (cp.async.bulk.tensor)

    @property
    def ok(self) -> bool:
        """Clean: no spill beyond the dtype's budget, within the SM's shared memory."""
        return (
            self.spill_bytes <= SPILL_BUDGET[self.dtype] and self.shared_bytes <= self.shared_limit
        )


def _specialize(fn: triton.JITFunction, args: tuple, meta: dict[str, Any]):
    """Signature, constexprs and attributes as Triton's JIT derives them from call arguments:
    16-byte aligned pointers and integers divisible by 16 get a divisibility hint, an integer
    equal to 1 becomes a constant (unless the parameter is marked do_not_specialize)."""
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    hint = [["tt.divisibility", 16]]
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = meta[p.name]
            continue
        a = args[i]
        if isinstance(a, torch.Tensor):
            signature[p.name] = "*" + _TYPE_NAMES[a.dtype]
            if a.data_ptr() % 16 == 0 and not p.do_not_specialize_on_alignment:
                attrs[(i,)] = hint
        elif isinstance(a, bool):
            signature[p.name] = "u1"
        elif isinstance(a, int):
            if a == 1 and not p.do_not_specialize:
                signature[p.name] = "constexpr"
                constexprs[p.name] = 1
                continue
            signature[p.name] = "i32" if -(2**31) <= a < 2**31 else "i64"
            if a % 16 == 0 and not p.do_not_specialize:
                attrs[(i,)] = hint
        elif isinstance(a, float):
            signature[p.name] = "fp32"
        elif isinstance(a, TensorDescriptor):  # TMA: a descriptor of the block it loads
            signature[p.name] = mangle_type(a)
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(a).__name__}")
    return signature, constexprs, attrs


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the one kernel in a cubin, read by cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return int(m.group(1)), int(m.group(2))


def _matmul(ptx: str) -> str:
    if "tcgen05.mma" in ptx:
        return "tcgen05"
    if "wgmma" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    if re.search(r"\bfma\.rn\.f32\b", ptx):
        return "fma"
    return "none"


def compile_launch(
    launch: Launch,
    arch: str,
    name: str,
    dtype: torch.dtype,
    page_size: int = 0,
    until_clean: bool = False,
) -> list[Compiled]:
    """Compiles every variant of ``launch`` for ``arch`` (a key of :data:`ARCHS`), or with
    ``until_clean`` those up to the first clean one; ``name``, ``dtype`` (of the data operands)
    and ``page_size`` label the records."""
    capability, shared_limit = ARCHS[arch]
    fn = launch.jit_fn
    out = []
    for meta in launch.variants():
        signature, constexprs, attrs = _specialize(fn, launch.args, meta)
        kernel = triton.compile(
            ASTSource(fn, signature, constexprs, attrs),
            target=GPUTarget("cuda", capability, 32),
            options={
                "num_warps": meta.get("num_warps", 4),
                "num_stages": meta.get("num_stages", 3),
            },
        )
        registers, stack = _resources(kernel.asm["cubin"])
        out.append(
            Compiled(
                kernel=name,
                arch=arch,
                dtype=_TYPE_NAMES[dtype],
                head_dim=int(meta.get("BLOCK_D", 0)),
                page_size=page_size,
                block_m=int(meta.get("BLOCK_M", meta.get("BLOCK", 0))),
                block_n=int(meta.get("BLOCK_N", 0)),
                num_warps=kernel.metadata.num_warps,
                num_stages=kernel.metadata.num_stages,
                registers=registers,
                spill_bytes=stack,
                shared_bytes=kernel.metadata.shared,
                shared_limit=shared_limit,
                matmul=_matmul(kernel.asm["ptx"]),
                tma="cp.async.bulk.tensor" in kernel.asm["ptx"],
            )
        )
        if until_clean and out[-1].ok:
            break
    return out


def routed_attention_launches(
    dtype: torch.dtype, head_dim: int, page_size: int
) -> dict[str, Launch]:
    """The forward and both backward launches for a small problem (CPU tensors, never run) with
    the strides and divisibility of the real one: 2 rows, 4 query heads on 2 KV heads, 40
    queries, 3 pages."""
    B, H, Hkv, Lq, P = 2, 4, 2, 40, 3
    q = torch.zeros(B, H, Lq, head_dim, dtype=dtype)
    k = torch.zeros(P, Hkv, page_size, head_dim, dtype=dtype)
    table = torch.tensor([[0, 1, -1], [0, 2, 1]], dtype=torch.int32)
    lens = torch.full((P,), page_size, dtype=torch.int32)
    lse = torch.zeros(B, H, Lq)
    scale = head_dim**-0.5
    (fwd,) = ra.fwd_launches(q, k, k, table, lens, scale, torch.empty_like(q), lse)
    grads = (torch.empty_like(q), torch.empty_like(k), k)
    dq, dkdv = ra.bwd_launches(q, q, k, k, table, lens, lse, lse, scale, *grads)
    dq_acc = torch.zeros_like(q, dtype=torch.float32)
    (fused,) = ra.bwd_launches(
        q, q, k, k, table, lens, lse, lse, scale, dq_acc, *grads[1:], deterministic=False
    )
    launches = {
        "routed_attention.fwd": fwd,
        "routed_attention.bwd_dq": dq,
        "routed_attention.bwd_dkdv": dkdv,
        "routed_attention.bwd_fused": fused,
    }
    if tma.supported(dtype, head_dim) is None:
        out = torch.empty_like(q)
        (launches[TMA_FWD],) = tma.fwd_launches(q, k, k, table, lens, scale, out, lse)
        args = (q, q, k, k, table, lens, lse, lse, scale)
        dq, dkdv = tma.bwd_launches(*args, *grads)
        (fused,) = tma.bwd_launches(*args, dq_acc, *grads[1:], deterministic=False)
        launches.update({TMA_BWD_DQ: dq, TMA_BWD_DKDV: dkdv, TMA_BWD_FUSED: fused})
    return launches


def velocity_energy_launches(dtype: torch.dtype) -> dict[str, Launch]:
    """The forward and backward launches: 8 branches, 4 steps, 3 x 1560 x 16 latents each."""
    G, S, N = 8, 4, 3 * 1560 * 16
    v = torch.zeros(G, S, N, dtype=dtype)
    w = torch.ones(G, S)
    e = torch.zeros(G)
    return {
        "velocity_energy.fwd": ve.fwd_launch(v, v, w, True, e),
        # under torch.use_deterministic_algorithms(True): partial sums, no atomics
        "velocity_energy.fwd_partials": ve.fwd_launch(v, v, w, True, None),
        "velocity_energy.bwd": ve.bwd_launch(e, v, v, w, True, True, v, v),
    }


def _compile_one(
    arch: str, dtype: torch.dtype, head_dims: Sequence[int], quick: bool
) -> list[Compiled]:
    """Every launch of both ops for one architecture and dtype (a worker's share)."""
    until_clean = quick and arch not in TUNED
    records: list[Compiled] = []
    for name, launch in velocity_energy_launches(dtype).items():
        records += compile_launch(launch, arch, name, dtype, until_clean=until_clean)
    for head_dim in head_dims:
        for page_size in PAGE_SIZES:
            for name, launch in routed_attention_launches(dtype, head_dim, page_size).items():
                if name in TMA_KERNELS and ARCHS[arch][0] // 10 not in TMA_MAJORS:
                    continue
                records += compile_launch(launch, arch, name, dtype, page_size, until_clean)
    return records


def compile_all(
    archs: Sequence[str] = tuple(ARCHS),
    dtypes: Sequence[torch.dtype] = DTYPES,
    head_dims: Sequence[int] = HEAD_DIMS,
    jobs: int | None = None,
    quick: bool = False,
) -> list[Compiled]:
    """Every launch of both ops for each of ``archs``, in that order, compiled by ``jobs``
    processes (default: one per CPU core this process may use; ptxas and Triton's passes run on
    one core each).
    ``quick``: outside :data:`TUNED`, each launch's candidates only up to its first clean one,
    all that :func:`problems` asks of them (under half the compiles)."""
    if interpreted():
        raise RuntimeError("TRITON_INTERPRET=1 replaces the kernels: unset it to compile them")
    if jobs is not None and (not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"jobs must be a positive integer or None, got {jobs!r}")
    work = [(arch, dtype, tuple(head_dims), quick) for arch in archs for dtype in dtypes]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    jobs = min(len(work), jobs or cores or 1)
    if jobs <= 1:
        return [r for w in work for r in _compile_one(*w)]
    # spawn: a forked child would inherit the parent's torch and Triton state mid-flight
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        return [r for rs in pool.map(_compile_one, *zip(*work, strict=True)) for r in rs]


def problems(records: list[Compiled]) -> list[str]:
    """What ``--check`` fails on: a candidate that is not clean (:attr:`Compiled.ok`) on an
    architecture of :data:`TUNED`, and a launch without a single clean candidate anywhere."""
    found = []
    launches: dict[tuple, list[Compiled]] = {}
    for r in records:
        launches.setdefault((r.kernel, r.arch, r.dtype, r.head_dim, r.page_size), []).append(r)
        if r.arch in TUNED and not r.ok:
            found.append(
                f"{r.kernel} {r.arch} {r.dtype} D={r.head_dim} page={r.page_size} "
                f"{r.block_m}x{r.block_n}/{r.num_warps}w/{r.num_stages}s: {r.spill_bytes} B "
                f"spilled, {r.shared_bytes} of {r.shared_limit} B shared"
            )
    for (kernel, arch, dtype, head_dim, page_size), rs in launches.items():
        if not any(r.ok for r in rs):
            found.append(
                f"{kernel} {arch} {dtype} D={head_dim} page={page_size}: no candidate without "
                f"a spill within {rs[0].shared_limit} B shared"
            )
    return found


def table(records: list[Compiled]) -> str:
    head = (
        "| kernel | arch | dtype | D | page | BLOCK_M | BLOCK_N | warps | stages | regs | spill B "
        "| smem KiB | matmul | TMA |"
    )
    rows = [head, "|" + "---|" * 14]
    for r in records:
        rows.append(
            f"| {r.kernel} | {r.arch} | {r.dtype} | {r.head_dim or '-'} | {r.page_size or '-'} "
            f"| {r.block_m} | {r.block_n or '-'} | {r.num_warps} | {r.num_stages} | {r.registers} "
            f"| {r.spill_bytes} | {r.shared_bytes / 1024:.1f} | {r.matmul} | {'yes' if r.tma else ''} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), action="append", help="default: all")
    parser.add_argument("--json", help="write the records to this file")
    parser.add_argument(
        "--head_dim", type=int, action="append", help=f"default: {', '.join(map(str, HEAD_DIMS))}"
    )
    parser.add_argument("--jobs", type=int, help="compiling processes (default: one per CPU core)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="outside the tuned archs, stop at each launch's first clean candidate",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if a candidate spills or overflows shared memory on "
        f"{' or '.join(TUNED)}, or a launch has no candidate that does neither on any arch",
    )
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    records = compile_all(
        tuple(args.arch or ARCHS),
        head_dims=tuple(args.head_dim or HEAD_DIMS),
        jobs=args.jobs,
        quick=args.quick,
    )
    print(table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in records], f, indent=1)
    bad = problems(records)
    for line in bad:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
