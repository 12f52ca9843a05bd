"""Bad input gets a clear error naming the argument, never a wrong answer or a kernel crash."""

import pytest
import torch

import kvpo_kernels


def _ok(dtype=torch.float32):
    q = torch.randn(2, 4, 3, 8, dtype=dtype)
    k = torch.randn(5, 2, 4, 8, dtype=dtype)
    v = torch.randn(5, 2, 4, 8, dtype=dtype)
    table = torch.tensor([[0, 1, -1], [2, 3, 4]], dtype=torch.int32)
    return q, k, v, table


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.update(q=a["q"][0]), ValueError, "q must be 4-D"),
        (lambda a: a.update(k=a["k"][0]), ValueError, "k_pages must be 4-D"),
        (lambda a: a.update(table=a["table"][0]), ValueError, "page_table must be 2-D"),
        (lambda a: a.update(v=a["v"][:, :, :3]), ValueError, "k_pages and v_pages"),
        (lambda a: a.update(k=a["k"][..., :4], v=a["v"][..., :4]), ValueError, "head dim"),
        (lambda a: a.update(q=torch.randn(2, 3, 3, 8)), ValueError, "multiple of KV heads"),
        (lambda a: a.update(table=a["table"][:1]), ValueError, "one row per batch row"),
        (lambda a: a.update(table=a["table"].long()), TypeError, "page_table must be int32"),
        (lambda a: a.update(k=a["k"].double()), TypeError, "k_pages has dtype"),
        (lambda a: a.update(q=a["q"].int(), k=a["k"].int(), v=a["v"].int()), TypeError, "q must"),
        (lambda a: a["table"].__setitem__((0, 0), 5), ValueError, r"page index in \[0, 5\)"),
        (lambda a: a["table"].__setitem__((1, 2), -2), ValueError, "page_table entries"),
        (
            lambda a: a.update(lens=torch.tensor([4, 4, 5, 1, 0], dtype=torch.int32)),
            ValueError,
            "page_lens entries",
        ),
        (
            lambda a: a.update(lens=torch.tensor([4, 4, 4], dtype=torch.int32)),
            ValueError,
            "page_lens must be",
        ),
        (lambda a: a.update(lens=torch.ones(5)), TypeError, "page_lens must be int32"),
        (lambda a: a.update(q="q"), TypeError, "q must be a torch.Tensor"),
        (
            lambda a: a.update(
                q=torch.randn(2, 4, 3, 300),
                k=torch.randn(5, 2, 4, 300),
                v=torch.randn(5, 2, 4, 300),
            ),
            ValueError,
            "head dim D",
        ),
        (lambda a: a.update(q=a["q"].to("meta")), ValueError, "k_pages is on cpu but q is on meta"),
        (lambda a: a.update(table=a["table"].to("meta")), ValueError, "page_table is on meta"),
        (
            lambda a: a.update(lens=torch.full((5,), 4, dtype=torch.int32, device="meta")),
            ValueError,
            "page_lens is on meta but q is on cpu",
        ),
        (
            lambda a: a.update(k=a["k"][:, :, :0], v=a["v"][:, :, :0]),
            ValueError,
            "at least one page of one token",
        ),
        (
            lambda a: a.update(k=a["k"][:0], v=a["v"][:0], table=torch.full((2, 3), -1).int()),
            ValueError,
            "at least one page of one token",
        ),
    ],
)
def test_routed_attention_errors(backend, mutate, exc, match):
    q, k, v, table = _ok()
    args = {"q": q, "k": k, "v": v, "table": table, "lens": None}
    mutate(args)
    with pytest.raises(exc, match=match):
        kvpo_kernels.routed_attention(
            args["q"], args["k"], args["v"], args["table"], args["lens"], backend=backend
        )


@pytest.mark.parametrize(
    "scale, exc, match",
    [
        (float("nan"), ValueError, "scale must be finite, got nan"),
        (float("inf"), ValueError, "scale must be finite, got inf"),
        ("0.1", TypeError, "scale must be a float or None, got str"),
        (torch.tensor(0.1), TypeError, "scale must be a float or None, got Tensor"),
        (True, TypeError, "scale must be a float or None, got bool"),
    ],
)
def test_bad_scale(scale, exc, match):
    q, k, v, table = _ok()
    with pytest.raises(exc, match=match):
        kvpo_kernels.routed_attention(q, k, v, table, scale=scale)


def test_integer_and_numpy_scales_are_scales():
    np = pytest.importorskip("numpy")
    q, k, v, table = _ok()
    want, _ = kvpo_kernels.routed_attention(q, k, v, table, scale=0.5)
    for scale in (np.float32(0.5), np.float64(0.5)):
        torch.testing.assert_close(
            kvpo_kernels.routed_attention(q, k, v, table, scale=scale)[0], want
        )
    one, _ = kvpo_kernels.routed_attention(q, k, v, table, scale=1)
    torch.testing.assert_close(one, kvpo_kernels.routed_attention(q, k, v, table, scale=1.0)[0])
    assert not torch.allclose(one, want)


def test_unknown_backend_and_wrong_device_backend():
    q, k, v, table = _ok()
    with pytest.raises(ValueError, match="backend must be one of"):
        kvpo_kernels.routed_attention(q, k, v, table, backend="fast")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        kvpo_kernels.routed_attention(q, k, v, table, backend="cuda")


def test_backend_from_environment(monkeypatch):
    q, k, v, table = _ok()
    monkeypatch.setenv("KVPO_ROUTED_ATTENTION_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        kvpo_kernels.routed_attention(q, k, v, table)
    monkeypatch.setenv("KVPO_ROUTED_ATTENTION_BACKEND", "reference")
    ref = kvpo_kernels.routed_attention(q, k, v, table)[0]
    monkeypatch.setenv("KVPO_ROUTED_ATTENTION_BACKEND", "cpu")
    torch.testing.assert_close(kvpo_kernels.routed_attention(q, k, v, table)[0], ref)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((torch.randn(3), torch.randn(3)), ValueError, "at least 2-D"),
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 5)), ValueError, "shape of v_pred"),
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 4).double()), TypeError, "v_ref has dtype"),
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(4)), ValueError, "weight must"),
        (
            (torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(3, dtype=torch.int64)),
            TypeError,
            "weight must be a floating",
        ),
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 4), None, "max"), ValueError, "reduction"),
        (
            (torch.ones(2, 3, dtype=torch.int32), torch.ones(2, 3, dtype=torch.int32)),
            TypeError,
            "v_pred must be float",
        ),
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 4, device="meta")), ValueError, "v_ref is on"),
        (
            (torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(3, device="meta")),
            ValueError,
            "weight is on meta but v_pred is on cpu",
        ),
    ],
)
def test_velocity_energy_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        kvpo_kernels.velocity_energy(*args)


def _merge_args(**change):
    args = dict(
        out_a=torch.randn(2, 3, 4),
        lse_a=torch.randn(2, 3),
        out_b=torch.randn(2, 3, 4),
        lse_b=torch.randn(2, 3),
    )
    return {**args, **change}


@pytest.mark.parametrize(
    ("change", "exc", "match"),
    [
        ({"out_b": torch.randn(2, 3, 5)}, ValueError, "shapes differ"),
        ({"lse_a": torch.randn(2, 4), "lse_b": torch.randn(2, 4)}, ValueError, "without D"),
        ({"out_b": torch.randn(2, 3, 4).double()}, TypeError, "out_b has dtype torch.float64 but"),
        ({"out_a": torch.ones(2, 3, 4, dtype=torch.int32)}, TypeError, "out_a must be float16"),
        ({"lse_b": torch.randn(2, 3).half()}, TypeError, "lse_b has dtype torch.float16 but"),
        ({"lse_a": [0.0]}, TypeError, "lse_a must be a torch.Tensor, got list"),
        (
            {"lse_a": torch.randn(2, 3, device="meta"), "lse_b": torch.randn(2, 3, device="meta")},
            ValueError,
            "lse_a is on meta but out_a is on cpu",
        ),
    ],
)
def test_merge_attention_errors(change, exc, match):
    with pytest.raises(exc, match=match):
        kvpo_kernels.merge_attention(**_merge_args(**change))


@pytest.mark.parametrize(
    ("triton", "cuda", "attention", "energy"),
    [
        (True, True, "triton", "cuda"),  # each op's faster GPU kernel (the H200 suite)
        (True, False, "triton", "triton"),
        (False, True, "cuda", "cuda"),
        (False, False, "reference", "reference"),
    ],
)
def test_auto_on_cuda_picks_each_ops_faster_backend(monkeypatch, triton, cuda, attention, energy):
    from kvpo_kernels import _backend

    monkeypatch.setattr(_backend, "triton_available", lambda: triton)
    monkeypatch.setattr(_backend, "native_cuda_available", lambda op: cuda)
    for var in ("KVPO_BACKEND", "KVPO_ROUTED_ATTENTION_BACKEND", "KVPO_VELOCITY_ENERGY_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    gpu = torch.device("cuda")
    assert _backend.resolve("routed_attention", gpu, None, "routed_attn_fwd") == attention
    assert _backend.resolve("velocity_energy", gpu, None, "velocity_energy_fwd") == energy
    # the CUDA C++ backward is not in auto's measured order: the Triton one, else the reference
    bwd = _backend.resolve("routed_attention", gpu, None, "routed_attn_bwd", direction="backward")
    assert bwd == ("triton" if triton else "reference")
    # float64 always goes to the reference (the GPU kernels accumulate in float32)
    assert _backend.resolve("velocity_energy", gpu, None, "", torch.float64) == "reference"
    assert _backend.resolve("velocity_energy", torch.device("cpu")) in ("cpu", "reference")


def test_resolve_on_cuda_traces_under_fullgraph_compile():
    """resolve() runs inside the ops' Python wrappers, which torch.compile traces: on CUDA it asks
    which GPU kernels exist, and that answer must be a constant (a dispatcher query there is an
    unsupported call under fullgraph=True)."""
    from kvpo_kernels import _backend

    gpu = torch.device("cuda")

    def f(x):
        attention = _backend.resolve("routed_attention", gpu, None, "routed_attn_fwd")
        energy = _backend.resolve("velocity_energy", gpu, None, "velocity_energy_fwd")
        return x + len(attention) + 10 * len(energy)

    x = torch.randn(3)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


def test_a_native_library_that_is_not_a_file_stops_the_import(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "KVPO_NATIVE_LIBRARY": str(tmp_path / "libkvpo_ops.so")}
    res = subprocess.run(
        [sys.executable, "-c", "import kvpo_kernels"], env=env, capture_output=True, text=True
    )
    assert res.returncode != 0 and "KVPO_NATIVE_LIBRARY=" in res.stderr
    assert "is not a file" in res.stderr


def test_a_global_backend_only_some_ops_have_gives_the_others_its_family(monkeypatch):
    """KVPO_BACKEND=triton_tma: routed_attention's TMA kernels, velocity_energy's Triton ones;
    asked for velocity_energy itself, triton_tma is an error naming the op."""
    from kvpo_kernels import _backend

    monkeypatch.delenv("KVPO_VELOCITY_ENERGY_BACKEND", raising=False)
    monkeypatch.delenv("KVPO_ROUTED_ATTENTION_BACKEND", raising=False)
    monkeypatch.setenv("KVPO_BACKEND", "triton_tma")
    assert _backend.requested("routed_attention", None) == "triton_tma"
    assert _backend.requested("velocity_energy", None) == "triton"
    with pytest.raises(ValueError, match="'triton_tma' serves .*routed_attention.* not velocity"):
        _backend.requested("velocity_energy", "triton_tma")
    monkeypatch.setenv("KVPO_VELOCITY_ENERGY_BACKEND", "triton_tma")
    with pytest.raises(ValueError, match="not velocity_energy"):
        _backend.requested("velocity_energy", None)
