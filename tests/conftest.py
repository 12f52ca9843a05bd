import os

import pytest
import torch

# The Triton kernels run on CPU tensors only under the interpreter, which must be chosen before
# triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# Suites CI must run: with KVPO_REQUIRE_SUITES=1 (set by .ci/run) a skip in them is a failure, so
# a missing tool or a failing probe cannot pass in silence.
REQUIRED_SUITES = {
    "tests/kernels/test_triton.py": "the Triton interpreter suite",
    "tests/kernels/test_triton_aot.py": "the Triton ahead-of-time compile (ptxas)",
    "tests/kernels/test_cuda_build.py": "the nvcc builds",
    "tests/kernels/test_sanitizers.py": "the sanitizer build",
    "tests/trainer/test_wan.py": "the diffusers tests",
}
# skips that are right on a machine without a GPU: no CUDA build of torch there
ALLOWED_SKIPS = ("needs a CUDA build of torch",)


def _required_suite(path: str) -> str | None:
    """The suite a test file belongs to when KVPO_REQUIRE_SUITES=1 asks for it."""
    if os.environ.get("KVPO_REQUIRE_SUITES") != "1":
        return None
    rel = os.path.relpath(path, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return REQUIRED_SUITES.get(rel.replace(os.sep, "/"))


def _fail_skip(report, suite: str) -> None:
    """Turn a skip report into a failure naming the suite and the skip's reason."""
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if any(a in reason for a in ALLOWED_SKIPS):
        return
    report.outcome = "failed"
    report.longrepr = f"{suite} must run here (KVPO_REQUIRE_SUITES=1), but it skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    suite = _required_suite(str(item.fspath))
    if report.skipped and suite and not hasattr(report, "wasxfail"):
        _fail_skip(report, suite)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    suite = _required_suite(str(getattr(collector, "path", "")))
    if report.skipped and suite:
        _fail_skip(report, suite)
