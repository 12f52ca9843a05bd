"""velocity_energy against the float64 reference, gradcheck and opcheck (CPU backends)."""

import pytest
import torch
from helpers import assert_low_precision, assert_rel, assert_strided_velocity_energy, permuted_copy

import kvpo_kernels
from kvpo_kernels.velocity_energy import _velocity_energy_op

BACKENDS = ["cpu", "reference"]
# The C++ kernel splits rows into chunks of 2^14 elements: the last shape spans four.
LONG = (2, 3, 3 * 2**14 + 5)
SHAPES = [(1, 1, 1), (4, 3, 17), (8, 4, 3, 5, 7), (3, 2, 4099), LONG]
WEIGHT_KINDS = ["none", "step", "branch_step", "branch_step_strided"]


def _inputs(shape, weight_kind, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    v_pred = torch.randn(shape, generator=gen, dtype=torch.float64)
    v_ref = v_pred + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    G, S = shape[:2]
    weight = {
        "none": None,
        "step": torch.rand(S, generator=gen, dtype=torch.float64) + 0.1,
        "branch_step": torch.rand(G, S, generator=gen, dtype=torch.float64) + 0.1,
        # [G, S] with strides (1, G): read through its strides, not copied
        "branch_step_strided": torch.rand(S, G, generator=gen, dtype=torch.float64).t() + 0.1,
    }[weight_kind]
    return v_pred.to(dtype), v_ref.to(dtype), weight


def _grads(fn, v_pred, v_ref, weight, reduction, grad_out):
    v_pred = v_pred.detach().clone().requires_grad_()
    v_ref = v_ref.detach().clone().requires_grad_()
    energy = fn(v_pred, v_ref, weight, reduction)
    (energy.double() * grad_out).sum().backward()
    return energy.detach(), v_pred.grad, v_ref.grad


def _kernel(backend):
    return lambda a, b, w, r: kvpo_kernels.velocity_energy(a, b, w, r, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("weight_kind", WEIGHT_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_matches_float64_reference(backend, reduction, weight_kind, shape):
    v_pred, v_ref, weight = _inputs(shape, weight_kind)
    grad_out = torch.randn(shape[0], dtype=torch.float64)
    ref = _grads(kvpo_kernels.velocity_energy_reference, v_pred, v_ref, weight, reduction, grad_out)
    got = _grads(_kernel(backend), v_pred.float(), v_ref.float(), weight, reduction, grad_out)
    assert got[0].dtype == torch.float32 and got[0].shape == (shape[0],)
    for name, a, b in zip(("energy", "d_pred", "d_ref"), got, ref, strict=True):
        assert_rel(a, b, 1e-5, f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 3, 2000), LONG], ids=str)
def test_half_precision_within_twice_torch_error(backend, dtype, shape):
    v_pred, v_ref, weight = _inputs(shape, "step")
    grad_out = torch.randn(shape[0], dtype=torch.float64)
    ref = _grads(kvpo_kernels.velocity_energy_reference, v_pred, v_ref, weight, "mean", grad_out)
    low = (v_pred.to(dtype), v_ref.to(dtype))
    pt = _grads(kvpo_kernels.velocity_energy_reference, *low, weight.to(dtype), "mean", grad_out)
    got = _grads(_kernel(backend), *low, weight, "mean", grad_out)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    for name, a, b, c in zip(("energy", "d_pred", "d_ref"), got, pt, ref, strict=True):
        assert_low_precision(a, b, c, f"{backend} {dtype} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_bits_do_not_depend_on_the_thread_count(dtype):
    v_pred, v_ref, weight = _inputs(LONG, "branch_step", dtype)
    grad_out = torch.randn(LONG[0], dtype=torch.float64)
    threads = torch.get_num_threads()
    got = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got.append(_grads(_kernel("cpu"), v_pred, v_ref, weight, "mean", grad_out))
    finally:
        torch.set_num_threads(threads)
    for other in got[1:]:
        for name, a, b in zip(("energy", "d_pred", "d_ref"), got[0], other, strict=True):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradcheck_float64_including_weight(backend, reduction):
    v_pred, v_ref, weight = _inputs((3, 2, 5), "branch_step")
    args = (v_pred.requires_grad_(), v_ref.requires_grad_(), weight.requires_grad_())

    def fn(a, b, w):
        return kvpo_kernels.velocity_energy(a, b, w, reduction, backend=backend)

    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    assert_strided_velocity_energy(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_to_v_ref_unless_required(backend):
    v_pred, v_ref, _ = _inputs((2, 3, 4), "none", torch.float32)
    v_pred.requires_grad_()
    kvpo_kernels.velocity_energy(v_pred, v_ref, backend=backend).sum().backward()
    assert v_ref.grad is None and v_pred.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_opcheck(backend, mean, layout):
    """Step-major velocities ([S, G, N] in memory) too: the fake backward's strides must be the
    real ones'."""
    v_pred, v_ref, weight = _inputs((3, 2, 7), "branch_step", torch.float32)
    if layout == "permuted":
        v_pred, v_ref = (permuted_copy(t, 0, 1) for t in (v_pred, v_ref))
    args = (v_pred.requires_grad_(), v_ref.requires_grad_(), weight.float(), mean, backend, backend)
    torch.library.opcheck(_velocity_energy_op, args)


def test_compile_fullgraph_matches_eager():
    v_pred, v_ref, weight = _inputs((4, 3, 5, 6), "step", torch.float32)

    def fn(a):
        return torch.softmax(-kvpo_kernels.velocity_energy(a, v_ref, weight, "mean"), 0)[0]

    a1, a2 = v_pred.clone().requires_grad_(), v_pred.clone().requires_grad_()
    eager = fn(a1)
    comp = torch.compile(fn, fullgraph=True, backend="aot_eager")(a2)
    eager.backward()
    comp.backward()
    torch.testing.assert_close(comp, eager)
    torch.testing.assert_close(a2.grad, a1.grad)


def test_compile_with_dynamic_shapes_compiles_once():
    """One graph serves every G, S and velocity shape (the fake kernel specializes on no size)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def fn(a, b, w):
        return torch.softmax(-kvpo_kernels.velocity_energy(a, b, w, "mean"), 0)[0]

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    for shape in ((3, 2, 5, 7), (4, 5, 6, 9), (6, 7, 8, 11)):
        v_pred, v_ref, weight = _inputs(shape, "branch_step", torch.float32)
        results = []
        for f in (fn, compiled):
            a = v_pred.clone().requires_grad_()
            p = f(a, v_ref, weight.float())
            p.backward()
            results.append((p, a.grad))
        for want, got in zip(*results, strict=True):
            torch.testing.assert_close(got, want)
    assert counter.frame_count == 1


@pytest.mark.parametrize("weight_kind", ["none", "step"])
def test_the_weight_reaches_the_op_without_a_copy(weight_kind):
    """A [S] weight arrives at the op as a stride-0 view over G and None as None: a call on a GPU
    launches no kernel to build the [G, S] weight (its kernels read the strides)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append((str(func), args))
            return func(*args, **(kwargs or {}))

    v_pred, v_ref, weight = _inputs((4, 3, 17), weight_kind, torch.float32)
    if weight is not None:
        weight = weight.float()
    with Log() as log:
        kvpo_kernels.velocity_energy(v_pred, v_ref, weight, "mean", backend="cpu")
    ops = [name for name, _ in log.calls]
    assert "kvpo.velocity_energy.default" in ops, ops
    copying = [n for n in ops if any(k in n for k in ("copy", "clone", "ones", "fill", "full"))]
    assert not copying, ops
    (w_arg,) = [args[2] for name, args in log.calls if name == "kvpo.velocity_energy.default"]
    if weight is None:
        assert w_arg is None
    else:
        assert w_arg.shape == (4, 3) and w_arg.stride() == (0, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("shape", [(2, 3, 0), (0, 3, 5), (2, 0, 5), (2, 3, 4, 0)], ids=str)
def test_empty_dimensions_agree_with_torch(backend, reduction, shape):
    """No branches: []; no steps: zeros; no elements per step: 0 for "sum", NaN for "mean" (a
    mean over nothing, as torch.mean gives). Gradients keep their shapes."""
    v_pred = torch.randn(shape, requires_grad=True)
    v_ref = torch.randn(shape)
    got = kvpo_kernels.velocity_energy(v_pred, v_ref, None, reduction, backend=backend)
    want = kvpo_kernels.velocity_energy_reference(v_pred.detach(), v_ref, None, reduction)
    assert got.shape == (shape[0],)
    torch.testing.assert_close(got, want, equal_nan=True)
    got.sum().backward()
    assert v_pred.grad.shape == shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_double_backward_is_refused_naming_the_op(backend):
    """First-order gradients only, said plainly when a gradient is differentiated."""
    v_pred = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)
    v_ref = torch.randn(3, 4, 10, dtype=torch.float64)
    energy = kvpo_kernels.velocity_energy(v_pred, v_ref, backend=backend)
    (g,) = torch.autograd.grad(energy.sum(), v_pred, create_graph=True)
    torch.testing.assert_close(g.detach(), 2 * (v_pred - v_ref).detach())
    with pytest.raises(NotImplementedError, match="velocity_energy has first-order gradients"):
        torch.autograd.grad(g.sum(), v_pred)
