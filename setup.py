"""Builds kvpo_kernels._C (C++ CPU kernels; CUDA kernels too when torch has CUDA).

torch must already be installed: build with ``pip install --no-build-isolation -e .`` so that pip
never resolves torch from the registry (which would pull the multi-GB CUDA build).
"""

import glob
import os

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


def _extension():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    cuda_bind = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    # -fno-trapping-math lets GCC if-convert float clamps, so the softmax loops vectorize.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]
    use_cuda = (
        (
            torch.version.cuda is not None
            and torch.cuda.is_available()
            or os.environ.get("KVPO_FORCE_CUDA") == "1"
        )
        and os.environ.get("KVPO_NO_CUDA") != "1"
        and bool(cuda)
    )
    if use_cuda:
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
