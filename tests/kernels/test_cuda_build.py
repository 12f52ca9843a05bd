"""The CUDA sources compile on a machine without a GPU (CI): every csrc/cuda/*.cu with nvcc for
sm_80 and sm_90a (and sm_80 PTX, for newer GPUs) through CMake, without a register spill in any
kernel, and the torch binding through the host compiler."""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_ok, torch_cmake_args

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
CUDA_SOURCES = [
    "routed_attention.cu",
    "routed_attention_bwd.cu",
    "routed_attention_bwd_sm90.cu",
    "routed_attention_sm90.cu",
    "velocity_energy.cu",
]

pytestmark = pytest.mark.skipif(
    shutil.which("nvcc") is None or shutil.which("cmake") is None, reason="needs nvcc and cmake"
)


def test_cuda_sources_exist():
    assert sorted(p.name for p in CUDA_DIR.glob("*.cu")) == CUDA_SOURCES
    for cu in CUDA_DIR.glob("*.cu"):
        assert "torch" not in cu.read_text() and "ATen" not in cu.read_text(), cu


def test_cmake_compiles_every_cu_for_sm80_and_sm90a(tmp_path):
    build = tmp_path / "build"
    run_ok(
        [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build),
            "-DKVPO_CUDA_ONLY=ON",
            f"-DCMAKE_CUDA_COMPILER={shutil.which('nvcc')}",
        ]
    )
    res = run_ok(["cmake", "--build", str(build), "-j", "2"])
    # -warn-spills: ptxas names every kernel that spills registers to local memory
    assert "spill" not in res.stdout + res.stderr, res.stdout + res.stderr
    objects = list(build.rglob("*.cu.o"))
    assert sorted(o.name for o in objects) == [f"{name}.o" for name in CUDA_SOURCES]
    for obj in objects:  # a cubin for each architecture is embedded (its ptxas options name it)
        blob = obj.read_bytes()
        assert b"-arch sm_80 " in blob and b"-arch sm_90a " in blob, obj
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        return
    for obj in objects:  # and sm_80 PTX, which the driver compiles for a Blackwell GPU
        listed = run_ok([cuobjdump, "--list-ptx", "--list-elf", str(obj)]).stdout
        assert ".sm_80.ptx" in listed and ".sm_80.cubin" in listed, listed
        assert ".sm_90a.cubin" in listed, listed


@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
def test_cmake_builds_the_library_with_its_cuda_kernels_against_a_cuda_torch(tmp_path):
    """The standalone library with the CUDA kernels and their binding, on a machine with or
    without a GPU: the .cu files carry their own architectures only (torch's CMake config would
    add its whole -gencode list, sm_50 among them, which CUDA 13's nvcc refuses), and the library
    registers the CUDA kernels when loaded."""
    build = tmp_path / "build"
    nvcc = f"-DCMAKE_CUDA_COMPILER={shutil.which('nvcc')}"
    run_ok(["cmake", "-S", str(ROOT), "-B", str(build), nvcc, *torch_cmake_args()])
    run_ok(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)])
    library = build / "libkvpo_ops.so"
    cuobjdump = _cuobjdump()
    if cuobjdump is not None:
        listed = run_ok([cuobjdump, "--list-elf", "--list-ptx", str(library)]).stdout
        archs = {line.rsplit(".", 2)[-2] for line in listed.splitlines() if ":" in line}
        assert archs == {"sm_80", "sm_90a"}, listed
    probe = "import json, kvpo_kernels.info as i; print(json.dumps(i.environment()))"
    env = {**os.environ, "KVPO_NATIVE_LIBRARY": str(library)}
    loaded = json.loads(run_ok([sys.executable, "-c", probe], env=env).stdout)
    kernels = loaded["native_cuda_kernels"]
    want = ["routed_attn_bwd", "routed_attn_fwd", "velocity_energy_bwd", "velocity_energy_fwd"]
    assert kernels == want, kernels


def test_hopper_forward_is_wgmma_and_tma_without_spills(tmp_path):
    """routed_attention_sm90.cu for sm_90a: tensor-core products by wgmma (HGMMA) and loads by TMA
    (UTMALDG) in the SASS, no spill in any instantiation (dtype x head_dim), and 168 registers a
    thread at launch: 384 x 168 is the pool the warpgroups' setmaxnreg share out (24 for the
    producer, 240 for each consumer), so fewer would leave a consumer waiting forever."""
    obj = tmp_path / "routed_attention_sm90.o"
    res = run_ok(
        [
            shutil.which("nvcc"),
            "-std=c++17",
            "-O3",
            "--use_fast_math",
            "-Xptxas=-v",
            "-gencode=arch=compute_90a,code=sm_90a",
            "-c",
            str(CUDA_DIR / "routed_attention_sm90.cu"),
            "-o",
            str(obj),
        ]
    )
    log = res.stdout + res.stderr
    kernels = [line for line in log.splitlines() if "Compiling entry function" in line]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", log)]
    assert len(kernels) == 4 and len(spills) == 4 and len(registers) == 4, log
    assert all(s == ("0", "0") for s in spills), log
    assert registers == [168] * 4, log
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        return
    sass = run_ok([cuobjdump, "-sass", str(obj)]).stdout
    assert "HGMMA.64x176x16.F32" in sass and ".tnspB" in sass, "no wgmma in the sm_90a code"
    assert "UTMALDG.3D" in sass, "no TMA load in the sm_90a code"


def test_hopper_backward_is_wgmma_and_tma_without_spills(tmp_path):
    """routed_attention_bwd_sm90.cu for sm_90a: per dtype x head_dim a dK/dV kernel in each dq
    mode, a dQ kernel and the atomic mode's conversion. Products by wgmma (HGMMA, B transposed for
    dV, dK and dQ, A and B transposed for the atomic mode's dS K), loads by TMA (UTMALDG), float2
    reductions into the dq accumulator, no spill in any kernel, and 168 registers a thread for the
    warp-specialised ones (384 x 168: the pool setmaxnreg shares out as 24 + 2 x 240)."""
    obj = tmp_path / "routed_attention_bwd_sm90.o"
    res = run_ok(
        [
            shutil.which("nvcc"),
            "-std=c++17",
            "-O3",
            "--use_fast_math",
            "-Xptxas=-v",
            "-gencode=arch=compute_90a,code=sm_90a",
            "-c",
            str(CUDA_DIR / "routed_attention_bwd_sm90.cu"),
            "-o",
            str(obj),
        ]
    )
    log = res.stdout + res.stderr
    kernels = re.findall(r"Compiling entry function '(\w+)'", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", log)]
    assert len(kernels) == 14 and len(spills) == 14 and len(registers) == 14, log
    assert all(s == ("0", "0") for s in spills), log
    assert "setmaxnreg ignored" not in log and "serialized" not in log, log
    specialised = [r for k, r in zip(kernels, registers, strict=True) if "convert" not in k]
    assert sum("dkdv" in k for k in kernels) == 8 and sum("dq_sm90" in k for k in kernels) == 4
    assert specialised == [168] * 12, log
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        return
    sass = run_ok([cuobjdump, "-sass", str(obj)]).stdout
    assert "HGMMA.64x64x16.F32" in sass and "HGMMA.64x128x16.F32" in sass, "no wgmma"
    assert ".tnspB" in sass and ".tnspA.tnspB" in sass, "no wgmma with MN-major operands"
    assert "UTMALDG.3D" in sass, "no TMA load in the sm_90a code"
    assert "REDG.E.ADD.F32x2" in sass, "no float2 reduction into the dq accumulator"


def _cuobjdump() -> str | None:
    """CUDA's cuobjdump: beside nvcc, or the copy Triton bundles."""
    found = shutil.which("cuobjdump")
    if found is None:
        try:
            import triton

            found = triton.knobs.nvidia.cuobjdump.path
        except Exception:
            return None
    return found if found and Path(found).exists() else None


def test_torch_binding_compiles(tmp_path):
    """bindings.cpp against torch's headers and the CUDA runtime's. A CPU build of torch ships
    c10/cuda headers without the CMake-generated cuda_cmake_macros.h: an empty one stands in."""
    torch_ext = pytest.importorskip("torch.utils.cpp_extension")
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    nvcc = Path(shutil.which("nvcc")).resolve()
    cuda_inc = [
        p
        for p in (nvcc.parents[1] / "include", Path("/usr/local/cuda/include"))
        if (p / "cuda_runtime.h").exists()
    ]
    if not cuda_inc:
        pytest.skip("cuda_runtime.h not found beside nvcc")
    shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("")
    includes = [f"-I{p}" for p in torch_ext.include_paths()]
    run_ok(
        [
            cxx,
            "-std=c++20",
            "-fsyntax-only",
            "-Wall",
            "-Werror",
            "-DKVPO_WITH_CUDA",
            *includes,
            f"-I{tmp_path / 'shim'}",
            f"-I{cuda_inc[0]}",
            f"-I{ROOT / 'csrc'}",  # as setup.py's and CMakeLists.txt's include directories
            f"-I{CUDA_DIR}",
            str(CUDA_DIR / "bindings.cpp"),
        ]
    )
