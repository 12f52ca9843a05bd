"""GPU benchmark suite: routed_attention and velocity_energy against the baselines, one run.

    python -m benchmarks.gpu_suite [--part all|main|sweep|velocity] [--out results.md]
    python -m benchmarks.gpu_suite --smoke --device cpu   # tiny shapes: checks the suite runs


Shapes of the real target, Self-Forcing on Wan2.1-T2V-1.3B: 12 heads of dim 128, 1560 tokens per
latent frame, a chunk of 3 frames (4680 queries), 21 frames of cache, G = 8 branches keeping each
window frame with probability 0.5; plus a sweep over cache length and G. Times are medians of
``triton.testing.do_bench`` (CUDA events, L2 flushed between runs). TFLOP/s count only kept work.
A method that fails (an unsupported shape, a missing kernel) gets a row with its error; the run
goes on. ``--smoke`` runs every code path on tiny shapes (CI does, on CPU with the Triton
interpreter), so a GPU session spends its minutes measuring, not debugging the suite.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import statistics
import time

import torch
import triton

import kvpo_kernels
from benchmarks.routed_methods import Setup, flops, gather_sdpa, make_inputs, peak_rss_mib
from benchmarks.routed_methods import flex as flex_method

WAN = Setup(
    branches=8,
    pages=21,
    page_size=1560,
    heads=12,
    kv_heads=12,
    head_dim=128,
    queries=4680,
    p_keep=0.5,
    sinks=3,
    recent=3,
    dtype=torch.bfloat16,
    device="cuda",
)
# Every code path at toy size: 2 frames of 32 tokens in the window, GQA, fp16 (the interpreter
# mishandles bf16).
SMOKE = Setup(
    branches=2,
    pages=4,
    page_size=32,
    heads=4,
    kv_heads=2,
    head_dim=64,
    queries=24,
    p_keep=0.5,
    sinks=1,
    recent=1,
    dtype=torch.float16,
    device="cpu",
)


def _bench(fn, device: str) -> float:
    """Median milliseconds of fn()."""
    if device == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _gpu_ms(fn, device: str, reps: int = 30, flush: str = "write") -> float:
    """Median milliseconds the GPU spends in fn()'s kernels, with a cold L2 and the CPU's launch
    cost hidden: a spin kernel queued ahead of each call keeps the GPU busy while the CPU queues
    the events and fn's launches, so the events time only the kernels. On CPU: :func:`_bench`.

    flush: how L2 is emptied of fn's data before each call. "write" zeroes 256 MB (what
    ``triton.testing.do_bench`` does): L2 is left full of dirty lines, which the timed kernels
    write back to memory as their reads evict them, up to an L2's worth of extra traffic (50 MB
    on an H100/H200: a fifth more than a 268 MB read-only kernel moves, 2.5 % of a 2 GB copy's).
    "read" sums the same 256 MB instead: L2 holds clean lines, evicted for free.

    For an op of a few microseconds of memory traffic (velocity_energy at one chunk), the time of
    a Python call (``_bench``: dispatch and launch included) and this GPU time differ several
    times over; both are reported."""
    if flush not in ("write", "read"):
        raise ValueError(f"flush must be 'write' or 'read', got {flush!r}")
    if device != "cuda":
        return _bench(fn, device)
    fn()
    buf = torch.ones(256 * 2**20 // 8, dtype=torch.int64, device=device)
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(reps)
    ]
    for start, end in events:
        if flush == "write":
            buf.zero_()
        else:
            buf.sum()
        torch.cuda._sleep(2_000_000)  # about 1 ms: longer than queuing one call takes
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _graph_ms(fn, device: str, calls: int = 10, reps: int = 20) -> float:
    """Median milliseconds per call of fn() replayed back to back from a CUDA graph of ``calls``
    calls: the steady state of a loop that calls it, without the gaps between launches, where
    each call evicts the previous call's lines (clean unless that call wrote them: it pays for its
    own traffic only). On CPU: :func:`_bench`."""
    if device != "cuda":
        return _bench(fn, device)
    side = torch.cuda.Stream()  # capture wants its warm-up off the default stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(reps)
    ]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) / calls


def _peak(fn, device: str) -> float:
    """MiB allocated at the peak of one warm call beyond what was allocated before it."""
    if device != "cuda":
        return peak_rss_mib(fn, repeats=1)
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _failed(method: str, err: Exception, cols: tuple[str, ...]) -> dict:
    """The row of a method that raised: NaN in every column, and the error."""
    return {
        "method": method,
        **dict.fromkeys(cols, float("nan")),
        "error": f"{type(err).__name__}: {err}"[:160],
    }


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


ROUTED_COLS = ("ms", "tflops", "peak_mib", "rel_err_vs_kvpo")
BACKWARD_COLS = ("bwd_ms", "bwd_tflops")  # the backward alone, on a retained graph

ENERGY_COLS = (
    "call_ms",
    "gpu_ms",
    "GB/s",
    "of_copy",
    "gpu_ms_clean",
    "of_copy_clean",
    "graph_ms",
    "of_copy_graph",
    "rel_err",
)


def _tma_ok(device: str) -> bool:
    """The TMA forward runs here: a GPU of compute capability 9.x or 10.x, or the interpreter."""
    if device == "cuda":
        return kvpo_kernels._backend._tma_capable(torch.device("cuda"))
    return kvpo_kernels._backend.triton_interpreted()


def _routed_methods(s: Setup, q, k, v, table, backward: bool) -> dict:
    """Every method of the table: kvpo's backends (and, with a backward, their atomic-dq mode)
    and the baselines that install here."""

    def kvpo(backend, deterministic=True):
        return lambda: kvpo_kernels.routed_attention(
            q, k, v, table, backend=backend, deterministic=deterministic
        )[0]

    methods = {
        "kvpo triton": kvpo("triton"),
        "FlexAttention + BlockMask build": lambda: flex_method(q, k, v, table),
        "SDPA flash on gathered K/V": lambda: _sdpa_flash(q, k, v, table),
    }
    if _tma_ok(s.device):
        methods["kvpo triton_tma"] = kvpo("triton_tma")
    if backward:
        methods["kvpo triton, atomic dq"] = kvpo("triton", deterministic=False)
        if _tma_ok(s.device):
            methods["kvpo triton_tma, atomic dq"] = kvpo("triton_tma", deterministic=False)
    if kvpo_kernels._backend.native_cuda_available("routed_attn_fwd") and s.device == "cuda":
        methods["kvpo cuda"] = kvpo("cuda")
        if backward:
            methods["kvpo cuda, atomic dq"] = kvpo("cuda", deterministic=False)
        if torch.cuda.get_device_capability()[0] == 9:  # the mma.sync kernels on Hopper
            methods["kvpo cuda, KVPO_CUDA_HOPPER=0"] = kvpo("cuda")
    if (
        importlib.util.find_spec("flash_attn") is not None
        and s.page_size % 256 == 0
        and s.device == "cuda"
        and not backward  # inference-only API
    ):
        methods["flash_attn_with_kvcache (block table)"] = lambda: _flash_attn_paged(q, k, v, table)
    return methods


# Rows measured with environment variables set (read by the CUDA launchers per call).
METHOD_ENV = {"kvpo cuda, KVPO_CUDA_HOPPER=0": {"KVPO_CUDA_HOPPER": "0"}}


@contextlib.contextmanager
def _env(values: dict[str, str]):
    prior = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in prior.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def routed_rows(s: Setup, backward: bool, only: tuple[str, ...] | None = None) -> list[dict]:
    """One row per method: median ms, TFLOP/s of kept work, peak MiB, error against kvpo triton;
    with ``backward``, forward + backward, and the backward alone (bwd_ms, bwd_tflops)."""
    q, k, v, table = make_inputs(s)
    methods = _routed_methods(s, q, k, v, table, backward)
    if only is not None:
        methods = {name: fn for name, fn in methods.items() if name in only}
    ref = methods["kvpo triton"]().float()
    cols = ROUTED_COLS + (BACKWARD_COLS if backward else ())
    rows = []
    for name, fn in methods.items():
        for t in (q, k, v):
            t.requires_grad_(backward)

        def run(fn=fn):
            out = fn()
            if backward:
                out.backward(torch.ones_like(q))

        try:
            with _env(METHOD_ENV.get(name, {})):
                row = _routed_row(s, table, name, fn, run, ref, backward, (q, k, v))
            rows.append({c: row[c] for c in ("method", *cols, "error")})
        except Exception as e:  # noqa: BLE001  (one failing baseline must not end the run)
            rows.append(_failed(name, e, cols))
        for t in (q, k, v):
            t.requires_grad_(False)
            t.grad = None
    return rows


def _routed_row(s: Setup, table, name: str, fn, run, ref, backward: bool, qkv) -> dict:
    """One method's measurements: error against ``ref``, ms and TFLOP/s of ``run``, with
    ``backward`` the backward alone, and peak memory."""
    with torch.no_grad():
        err = (fn().float() - ref).norm() / ref.norm()
    ms = _bench(run, s.device)
    row = {"method": name, "ms": ms, "tflops": flops(s, table, backward) / ms / 1e9}
    if backward:
        bwd_ms = _bench(_backward_alone(fn, *qkv), s.device)
        bwd_flops = flops(s, table, True) - flops(s, table, False)
        row.update(bwd_ms=bwd_ms, bwd_tflops=bwd_flops / bwd_ms / 1e9)
    row.update(peak_mib=_peak(run, s.device), rel_err_vs_kvpo=float(err), error="")
    return row


def _backward_alone(fn, q, k, v):
    """A call that runs only the backward of one forward of ``fn`` (its graph retained)."""
    out = fn()
    grad = torch.ones_like(out)

    def run():
        for t in (q, k, v):
            t.grad = None
        out.backward(grad, retain_graph=True)

    return run


def copy_bandwidth_gbs(device: str, numel: int = 2**28, flush: str = "write") -> float:
    """Bytes read and written per second by a device-to-device copy of numel float32 values, L2
    emptied before each copy as ``_gpu_ms``'s flush says.

    Not from a CUDA graph: replayed from one, this 1 GiB copy ran at 2.72 TB/s on an H200
    (2026-12-04) against 4.21 TB/s launched alone (why is not established: a graph's memcpy node
    may run on the copy engines), while the suite's graphed kernels reached 4.3 TB/s."""
    x = torch.empty(numel, dtype=torch.float32, device=device).normal_()
    y = torch.empty_like(x)
    ms = _gpu_ms(lambda: y.copy_(x), device, flush=flush)
    return 2 * x.numel() * 4 / ms / 1e6


def _energy_kernel(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, **tiling):
    """The Triton forward's launch alone, on a preallocated energy (zeroed once: timing calls
    accumulate into it), without the custom op's dispatch, the weight's view or the zero fill;
    tiling: ``fwd_launch``'s block / num_warps / eviction."""
    from kvpo_kernels.triton.velocity_energy import fwd_launch

    G, S = a.shape[:2]
    energy = torch.zeros(G, device=a.device)
    launch = fwd_launch(a, b, w.float().expand(G, S), True, energy, **tiling)

    def run():
        launch()
        return energy

    return run


def _copy_same_bytes(a: torch.Tensor):
    """A device copy of one operand: as many bytes read + written as the forward reads."""
    dst = torch.empty_like(a)
    return lambda: dst.copy_(a)


def _sum_same_bytes(a: torch.Tensor, b: torch.Tensor):
    """torch.sum over both operands laid end to end: the forward's bytes, read only."""
    both = torch.stack((a, b))
    return lambda: both.sum(dtype=torch.float32)


# Other tilings of the Triton forward, timed beside the default (block: elements of each operand
# per program per iteration; more in flight per thread, or more and smaller programs per SM).
ENERGY_TILINGS = (
    {"block": 8192, "num_warps": 8},
    {"block": 4096, "num_warps": 4},
    {"block": 2048, "num_warps": 4},
    {"eviction": "evict_first"},
    {"block": 8192, "num_warps": 8, "eviction": "evict_first"},
)


def velocity_rows(
    G=8, S=4, N=3 * 16 * 60 * 104, dtype=torch.bfloat16, device: str = "cuda"
) -> list[dict]:
    """Wan latents: 16 channels x 60 x 104 per frame, a chunk of 3 frames, 4 steps, G = 8.

    call_ms: a Python call as a caller waits for it (dispatch and launch included); gpu_ms: the
    kernels alone, L2 emptied by writes (as in every earlier run), from which GB/s and the fraction
    of copy bandwidth are computed; gpu_ms_clean / of_copy_clean: the same with L2 emptied by
    reads, the copy it divides by measured likewise (see ``_gpu_ms``: written-back dirty lines
    weigh on a 268 MB read five times more than on the 2 GB copy); graph_ms / of_copy_graph: per
    call of 10 replayed back to back from a CUDA graph (the steady state of a loop, no launch
    gaps; a call may find some of the previous call's lines still in L2), against the copy with
    L2 emptied by reads."""
    a = torch.randn(G, S, N, device=device, dtype=dtype)
    b = torch.randn(G, S, N, device=device, dtype=dtype)
    w = torch.rand(S, device=device)
    bytes_fwd = 2 * a.numel() * a.element_size()
    bytes_bwd = 3 * a.numel() * a.element_size()  # read both, write d_pred
    copy_numel = 2**28 if device == "cuda" else 2**20
    copy = copy_bandwidth_gbs(device, copy_numel)
    copy_clean = copy_bandwidth_gbs(device, copy_numel, flush="read")
    ref = kvpo_kernels.velocity_energy_reference(a.double(), b.double(), w.double(), "mean")

    def energy(backend):
        return lambda: kvpo_kernels.velocity_energy(a, b, w, "mean", backend=backend)

    def grad(backend):
        a.requires_grad_(True)  # stays on: the bwd rows come last
        e = kvpo_kernels.velocity_energy(a, b, w, "mean", backend=backend)
        g = torch.ones_like(e)
        return lambda: torch.autograd.grad(e, a, g, retain_graph=True)

    backends = ["triton"]
    if kvpo_kernels._backend.native_cuda_available("velocity_energy_fwd") and device == "cuda":
        backends.append("cuda")
    cases = [(f"kvpo {be} fwd", lambda be=be: energy(be), bytes_fwd) for be in backends]
    cases += [
        (
            "torch eager fwd",
            lambda: lambda: kvpo_kernels.velocity_energy_reference(a.float(), b.float(), w, "mean"),
            bytes_fwd,
        ),
        (
            "torch.compile fwd",
            lambda: torch.compile(lambda: kvpo_kernels.velocity_energy_reference(a, b, w, "mean")),
            bytes_fwd,
        ),
    ]
    cases += [(f"kvpo {be} bwd", lambda be=be: grad(be), bytes_bwd) for be in backends]
    # Where a forward call's time goes, against what moving the same bytes costs at this size
    # (the 1 GB copy that "of copy" divides by hides a launch's fixed costs; these do not).
    cases += [
        (
            "kvpo triton fwd kernel alone (no op, no zero fill)",
            lambda: _energy_kernel(a, b, w),
            bytes_fwd,
        ),
        *[
            (
                f"kvpo triton fwd kernel alone, {t}",
                lambda t=t: _energy_kernel(a, b, w, **t),
                bytes_fwd,
            )
            for t in ENERGY_TILINGS
        ],
        ("copy of the same bytes (read + write)", lambda: _copy_same_bytes(a), bytes_fwd),
        ("torch.sum over the same bytes (read only)", lambda: _sum_same_bytes(a, b), bytes_fwd),
    ]
    rows = []
    for name, make, nbytes in cases:
        try:
            fn = make()
            out = fn()
            with torch.no_grad():
                if "same bytes" in name:
                    err = float("nan")  # a yardstick, not an energy
                elif "fwd" in name:
                    err = float((out - ref).norm() / ref.norm())
                else:  # d/da of sum_s w_s mean_n (a - b)^2
                    want = 2 * w.double()[None, :, None] * (a.double() - b.double()) / N
                    err = float((out[0].double() - want).norm() / want.norm())
            call_ms = _bench(fn, device)
            gpu_ms = _gpu_ms(fn, device)
            clean_ms = _gpu_ms(fn, device, flush="read")
            # Only the forward kernels and the yardsticks are captured: autograd would run a
            # backward's kernels on the stream its forward ran on, outside the capture, and a
            # capture broken that way could leave its error to the rows after it.
            graph_ms = float("nan")
            if (name.startswith("kvpo") and "bwd" not in name) or "same bytes" in name:
                try:
                    graph_ms = _graph_ms(fn, device)
                except Exception:  # noqa: BLE001 (the row keeps its other timings)
                    pass
            gbs = nbytes / gpu_ms / 1e6
            rows.append(
                {
                    "method": name,
                    "call_ms": call_ms,
                    "gpu_ms": gpu_ms,
                    "GB/s": gbs,
                    "of_copy": gbs / copy,
                    "gpu_ms_clean": clean_ms,
                    "of_copy_clean": nbytes / clean_ms / 1e6 / copy_clean,
                    "graph_ms": graph_ms,
                    "of_copy_graph": nbytes / graph_ms / 1e6 / copy_clean,
                    "rel_err": err,
                    "error": "",
                }
            )
        except Exception as e:  # noqa: BLE001
            rows.append(_failed(name, e, ENERGY_COLS))
    rows.append(
        {
            "method": "device copy (read + write)",
            "call_ms": float("nan"),
            "gpu_ms": float("nan"),
            "GB/s": copy,
            "of_copy": 1.0,
            "gpu_ms_clean": float("nan"),
            "of_copy_clean": 1.0,
            "graph_ms": float("nan"),
            "of_copy_graph": 1.0,
            "rel_err": float("nan"),
            "error": "",
        }
    )
    rows.append(
        {
            **rows[-1],
            "method": "device copy (read + write), L2 emptied by reads",
            "GB/s": copy_clean,
        }
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


PARTS = ("all", "main", "sweep", "velocity", "attention")


def sections(smoke: bool = False, part: str = "all", device: str = "cuda"):
    """(title, rows) of every table of the suite, in order.

    part: "main" (the Wan2.1 shape and velocity_energy), "sweep" (the 1536-token frames and the
    cache length x G sweep), "all" (both), "velocity" (velocity_energy's tables alone: seconds,
    no FlexAttention compile) or "attention" (routed_attention's tables at the Wan2.1 shape and
    at 1536-token frames, no sweep): a lent GPU's few minutes can run them apart.
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    # One compiled FlexAttention per shape: the sweep alone has 9, more than dynamo's default
    # recompile limit (8), past which it would silently run the eager kernel.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    main_setup = dataclasses.replace(SMOKE if smoke else WAN, device=device)
    dtype = str(main_setup.dtype).removeprefix("torch.")
    if part == "velocity":
        yield from _velocity_sections(dtype, smoke, device)
        return
    if part == "attention":
        yield from _attention_sections(main_setup, dtype, smoke)
        return
    if part != "sweep":
        yield from _main_sections(main_setup, dtype, smoke, device)
    if part != "main":
        yield from _sweep_sections(main_setup, smoke)


def _main_sections(main_setup: Setup, dtype: str, smoke: bool, device: str):
    yield from _wan_attention_sections(main_setup, dtype)
    yield from _velocity_sections(dtype, smoke, device)


def _wan_attention_sections(main_setup: Setup, dtype: str):
    yield f"routed_attention forward, Wan2.1 shape, {dtype}", routed_rows(main_setup, False)
    yield (
        f"routed_attention forward + backward, Wan2.1 shape, {dtype}",
        routed_rows(main_setup, True),
    )


def _attention_sections(main_setup: Setup, dtype: str, smoke: bool):
    yield from _wan_attention_sections(main_setup, dtype)
    if not smoke:
        yield _flash_frames_section(main_setup)


def _flash_frames_section(main_setup: Setup):
    fa = dataclasses.replace(main_setup, page_size=1536, queries=4608)
    title = "forward, 1536-token frames (flash-attn block table needs 256 | page)"
    return title, routed_rows(fa, False)


def _velocity_sections(dtype: str, smoke: bool, device: str):
    energy = velocity_rows(2, 2, 3000, torch.float16, device) if smoke else velocity_rows()
    yield f"velocity_energy, {dtype}", energy
    if not smoke:  # the whole 21-frame clip at once: 134 MB per operand, past any L2
        clip = velocity_rows(N=21 * 16 * 60 * 104)
        yield f"velocity_energy, whole 21-frame clip, {dtype}", clip


def _sweep_sections(main_setup: Setup, smoke: bool):
    if not smoke:
        yield _flash_frames_section(main_setup)
    sweep = [(3, 2)] if smoke else [(p, g) for p in (9, 21, 33) for g in (4, 8, 16)]
    for pages, g in sweep:
        s = dataclasses.replace(main_setup, pages=pages, branches=g)
        rows = routed_rows(
            s,
            False,
            only=("kvpo triton", "kvpo triton_tma", "kvpo cuda", "FlexAttention + BlockMask build"),
        )
        yield f"sweep: {pages} frames of cache, G = {g}", rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--part",
        choices=PARTS,
        default="all",
        help="main: the Wan2.1 shape and velocity_energy; sweep: 1536-token frames, cache x G; "
        "velocity: velocity_energy alone; attention: routed_attention's Wan2.1 and 1536-token "
        "tables",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check the suite runs")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (smoke run)"
    out = [f"Device: {name}, torch {torch.__version__}, triton {triton.__version__}"]
    print(out[0], flush=True)
    for title, rows in sections(args.smoke, args.part, args.device):
        out += ["", f"### {title}", _table(rows)]
        print("\n".join(out[-3:]), flush=True)
        if args.out:  # rewritten after every table: a run cut short keeps what it measured
            with open(args.out, "w") as f:
                f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
