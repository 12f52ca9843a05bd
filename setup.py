"""Builds kvpo_kernels._C (C++ CPU kernels; CUDA kernels too when torch has CUDA).

torch must already be installed: build with ``pip install --no-build-isolation -e .`` so that pip
never resolves torch from the registry (which would pull the multi-GB CUDA build).
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - exercised only on a machine without torch
    raise SystemExit(
        "kvpo needs torch installed before it is built: `pip install torch==2.13.0` (CPU) or your "
        "CUDA build, then `pip install --no-build-isolation -e .`"
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))
# For a build on a machine without a GPU (a container image, a login node): the architectures to
# compile for, in torch's spelling; the Triton kernels need nothing of the kind.
ARCH_EXAMPLE = "8.0;9.0a;10.0;12.0+PTX"


def _use_cuda() -> bool:
    """Whether to build the CUDA kernels: torch has CUDA and either a GPU is visible (torch
    compiles for it) or TORCH_CUDA_ARCH_LIST names the architectures; KVPO_FORCE_CUDA=1 and
    KVPO_NO_CUDA=1 decide instead."""
    if os.environ.get("KVPO_NO_CUDA") == "1":
        return False
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    forced = os.environ.get("KVPO_FORCE_CUDA") == "1"
    if torch.version.cuda is None and not forced:
        return False
    if torch.cuda.is_available() or (archs and archs != "native"):
        return True
    if forced:  # torch would pick the architectures of the visible GPUs: there are none
        raise SystemExit(
            "KVPO_FORCE_CUDA=1 on a machine without a visible GPU needs TORCH_CUDA_ARCH_LIST, the "
            f"architectures to compile for, e.g. TORCH_CUDA_ARCH_LIST='{ARCH_EXAMPLE}'"
        )
    print(
        "kvpo: torch has CUDA but no GPU is visible and TORCH_CUDA_ARCH_LIST is unset: building "
        "without the CUDA kernels (on a GPU the Triton kernels serve every op); to build them, "
        f"set e.g. TORCH_CUDA_ARCH_LIST='{ARCH_EXAMPLE}'",
        file=sys.stderr,
    )
    return False


def _hopper_arch_list() -> None:
    """For visible GPUs all of compute capability 9.0 (TORCH_CUDA_ARCH_LIST unset or native),
    compile for 9.0a, not torch's 9.0: the Hopper kernels (csrc/cuda/*_sm90.cu) use wgmma and
    TMA, which only sm_90a code has (in an sm_90 build they are empty and the op runs the mma.sync
    kernels). sm_90a code runs on every 9.0 device."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "native") != "native":
        return
    gpus = range(torch.cuda.device_count()) if torch.cuda.is_available() else ()
    if gpus and all(torch.cuda.get_device_capability(i) == (9, 0) for i in gpus):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a"


def _extension():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    cuda_bind = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    # -fno-trapping-math lets GCC if-convert float clamps, so the softmax loops vectorize.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]
    use_cuda = bool(cuda) and _use_cuda()
    if use_cuda:
        _hopper_arch_list()
        return CUDAExtension(
            "kvpo_kernels._C",
            cpp + cuda_bind + cuda,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={
                "cxx": cxx + ["-DKVPO_WITH_CUDA"],
                "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "-Xptxas=-warn-spills"],
            },
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "kvpo_kernels._C",
        cpp,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
