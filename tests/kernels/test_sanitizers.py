"""The CPU kernels built with AddressSanitizer and UBSan (CMake, ``-DKVPO_SANITIZE=ON``) and
loaded through ``KVPO_NATIVE_LIBRARY``, under their own tests: a read or write outside a tensor,
a use after free or undefined behaviour stops the run, where the normal build could pass with a
wrong or uninitialised value. ``make sanitize`` runs this alone."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_ok, torch_cmake_args

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("gcc") is None, reason="needs cmake and gcc"
)


def _runtime(name: str) -> str:
    path = subprocess.run(
        ["gcc", f"-print-file-name={name}"], capture_output=True, text=True
    ).stdout.strip()
    if not os.path.isabs(path):  # gcc prints the bare name when it has no such library
        pytest.skip(f"gcc has no {name}")
    return path


def test_cpu_kernels_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    preload = f"{_runtime('libasan.so')}:{_runtime('libubsan.so')}"
    build = tmp_path / "build"
    run_ok(
        [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build),
            "-DKVPO_SANITIZE=ON",
            "-DKVPO_WITH_CUDA=OFF",
            *torch_cmake_args(),
        ]
    )
    run_ok(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)])
    library = build / "libkvpo_ops.so"
    env = {
        **os.environ,
        "KVPO_NATIVE_LIBRARY": str(library),
        "LD_PRELOAD": preload,  # the runtime first, as ASan requires of an uninstrumented python
        # python's own allocations are not ours to check for leaks; a report stops the process
        # (pytest's capture dies with it), so the reports go to files
        "ASAN_OPTIONS": f"detect_leaks=0:halt_on_error=1:log_path={tmp_path / 'asan'}",
        "UBSAN_OPTIONS": f"print_stacktrace=1:halt_on_error=1:log_path={tmp_path / 'ubsan'}",
    }
    kernels = ROOT / "tests" / "kernels"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "cpu",
            str(kernels / "test_random_inputs.py"),
            str(kernels / "test_routed_attention.py"),
            str(kernels / "test_velocity_energy.py"),
            str(kernels / "test_checks.py"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    reports = "".join(p.read_text()[:6000] for p in sorted(tmp_path.glob("*san.*")))
    assert not reports, reports
    assert res.returncode == 0 and " passed" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    # the tests ran the sanitized library, not kvpo_kernels._C
    probe = run_ok(
        [sys.executable, "-c", "import kvpo_kernels, torch; print(open('/proc/self/maps').read())"],
        env=env,
    )
    assert str(library) in probe.stdout and "kvpo_kernels/_C" not in probe.stdout
