"""GPU tests: every GPU backend against the float64 reference (skipped without a CUDA device)."""

import pytest
import torch
from helpers import CASES, RoutedCase, assert_low_precision, assert_rel, make_routed, routed_grads

import kvpo_kernels
from kvpo_kernels import _backend

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _gpu_backends(op: str):
    names = []
    if _backend.triton_available() and not _backend.triton_interpreted():
        names.append("triton")
    if _backend.native_cuda_available(op):
        names.append("cuda")
    return names


def _fn(backend):
    return lambda q, k, v, t, lens: kvpo_kernels.routed_attention(q, k, v, t, lens, backend=backend)


def _ref(q, k, v, t, lens):
    return kvpo_kernels.routed_attention_reference(q, k, v, t, lens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_routed_attention_gpu_backends(case, dtype):
    backends = _gpu_backends("routed_attn_fwd")
    if not backends:
        pytest.skip("no GPU backend built")
    q, k, v, table, lens = make_routed(case, torch.float64)
    dout = torch.randn_like(q)
    dlse = torch.zeros(q.shape[:3], dtype=torch.float64)
    ref = routed_grads(_ref, q, k, v, table, lens, dout, dlse)
    dev = [t.cuda() for t in (q, k, v, table)] + [None if lens is None else lens.cuda()]
    q, k, v, table, lens = dev
    low = [t.to(dtype) for t in (q, k, v)]
    pt = routed_grads(_ref, *low, table, lens, dout.cuda().to(dtype), dlse.cuda())
    for backend in backends:
        if backend == "cuda" and (dtype == torch.float32 or case.D not in (64, 128)):
            continue  # the CUDA C++ forward is fp16/bf16 (tensor cores), head dim 64 or 128
        got = routed_grads(_fn(backend), *low, table, lens, dout.cuda().to(dtype), dlse.cuda())
        for name, a, b, c in zip(("out", "lse", "dq", "dk", "dv"), got, pt, ref, strict=True):
            if dtype == torch.float32:
                assert_rel(a.cpu(), c, 1e-5, f"{backend} {name}")
            else:
                assert_low_precision(a.cpu(), b.cpu(), c, f"{backend} {dtype} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_velocity_energy_gpu_backends(dtype):
    backends = _gpu_backends("velocity_energy_fwd")
    if not backends:
        pytest.skip("no GPU backend built")
    v_pred = torch.randn(8, 4, 3, 1560, dtype=torch.float64)
    v_ref = v_pred + torch.randn_like(v_pred)
    weight = torch.rand(4, dtype=torch.float64)
    ref = kvpo_kernels.velocity_energy_reference(v_pred, v_ref, weight, "mean")
    pt = kvpo_kernels.velocity_energy_reference(
        v_pred.to(dtype), v_ref.to(dtype), weight.to(dtype), "mean"
    )
    for backend in backends:
        got = kvpo_kernels.velocity_energy(
            v_pred.cuda().to(dtype), v_ref.cuda().to(dtype), weight.cuda(), "mean", backend=backend
        )
        if dtype == torch.float32:
            assert_rel(got.cpu(), ref, 1e-5, backend)
        else:
            assert_low_precision(got.cpu(), pt, ref, f"{backend} {dtype}")


def test_triton_does_not_recompile_when_only_the_table_changes():
    if "triton" not in _gpu_backends("routed_attn_fwd"):
        pytest.skip("needs compiled Triton")
    from kvpo_kernels.triton.routed_attention import _fwd_kernel

    q = torch.randn(8, 4, 64, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(16, 4, 32, 64, device="cuda", dtype=torch.float16)
    base = torch.arange(16, dtype=torch.int32)
    droppable = torch.ones(16, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    table = kvpo_kernels.route_pages(base, 8, 0.5, droppable, generator=gen).cuda()

    def compiled_variants() -> int:
        # JITFunction.device_caches[device] = (kernel_cache, kernel_key_cache, target, backend, binder)
        return sum(len(cache[0]) for cache in _fwd_kernel.fn.device_caches.values())

    kvpo_kernels.routed_attention(q, k, k, table, backend="triton")
    before = compiled_variants()
    assert before >= 1
    for _ in range(5):
        table = kvpo_kernels.route_pages(base, 8, 0.5, droppable, generator=gen).cuda()
        kvpo_kernels.routed_attention(q, k, k, table, backend="triton")
    assert compiled_variants() == before


# Shapes for the CUDA C++ tensor-core forward: several 64-key blocks per page with a masked tail,
# two query tiles with a partial one, GQA, shared pages, an empty row.
CUDA_CASES = [
    RoutedCase(3, 4, 2, 100, 64, 6, 70, 5, partial=True, empty_row=True),
    RoutedCase(4, 4, 1, 65, 128, 5, 130, 4),
    RoutedCase(2, 2, 2, 16, 128, 3, 64, 3, partial=True),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CUDA_CASES, ids=str)
def test_cuda_forward_against_reference_and_triton(case, dtype):
    if not _backend.native_cuda_available("routed_attn_fwd"):
        pytest.skip("kvpo_kernels._C built without CUDA")
    q, k, v, table, lens = make_routed(case, torch.float64)
    ref_out, ref_lse = _ref(q, k, v, table, lens)
    dev = [t.cuda().to(dtype) for t in (q, k, v)]
    tab, ln = table.cuda(), None if lens is None else lens.cuda()
    pt_out, pt_lse = _ref(*dev, tab, ln)
    out, lse = kvpo_kernels.routed_attention(*dev, tab, ln, backend="cuda")
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_low_precision(out.cpu(), pt_out.cpu(), ref_out, f"cuda {dtype} out")
    assert_low_precision(lse.cpu(), pt_lse.cpu(), ref_lse, f"cuda {dtype} lse")
    if _backend.triton_available():
        t_out, t_lse = kvpo_kernels.routed_attention(*dev, tab, ln, backend="triton")
        torch.testing.assert_close(out.float(), t_out.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(lse, t_lse, rtol=1e-3, atol=1e-3)


def test_cuda_backend_rejects_unsupported_inputs():
    if not _backend.native_cuda_available("routed_attn_fwd"):
        pytest.skip("kvpo_kernels._C built without CUDA")
    q, k, v, table, lens = make_routed(CUDA_CASES[0], torch.float32)
    with pytest.raises(TypeError, match="backend 'cuda'"):
        kvpo_kernels.routed_attention(q.cuda(), k.cuda(), v.cuda(), table.cuda(), backend="cuda")
