"""What this installation of kvpo_kernels can run, and which backend each op picks here:
``python -m kvpo_kernels.info [--json]`` (paste it into a bug report).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from . import __version__, _backend

# the public ops and the native ops whose CUDA kernels their ``cuda`` backend needs, per direction
OPS = {
    "routed_attention": ("routed_attn_fwd", "routed_attn_bwd"),
    "velocity_energy": ("velocity_energy_fwd", "velocity_energy_bwd"),
}


def _pick(op: str, natives: tuple[str, str], device: torch.device) -> str:
    """The backend ``op`` runs on float32 tensors of ``device`` (and its backward's, where that
    differs), or why it cannot run there."""
    try:
        fwd, bwd = (
            _backend.resolve(op, device, None, native, direction=direction)
            for native, direction in zip(natives, _backend.DIRECTIONS, strict=True)
        )
    except (ValueError, RuntimeError, TypeError) as e:
        return f"error: {e}"
    return fwd if fwd == bwd else f"{fwd} (backward {bwd})"


def _deterministic() -> str:
    try:
        return "yes" if _backend.deterministic(None) else "no (dq by atomics)"
    except ValueError as e:
        return f"error: {e}"


def environment() -> dict:
    """Versions, the compiled and Triton kernels available, the backend switches set, and the
    backend each op resolves to on CPU and (with a GPU) CUDA tensors."""
    triton = None
    if _backend.triton_available():
        import triton as triton_module

        triton = triton_module.__version__
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "capability": f"{props.major}.{props.minor}"}
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if gpu else [])
    return {
        "kvpo_kernels": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": gpu,
        "triton": triton,
        "triton_interpret": _backend.triton_interpreted(),
        "native_extension": _backend.native_available(),
        "native_cuda_kernels": sorted(
            op for op in _backend._NATIVE_CUDA if _backend.native_cuda_available(op)
        ),
        "switches": {k: v for k, v in sorted(os.environ.items()) if k.startswith("KVPO_")},
        "deterministic_backward": _deterministic(),
        "backends": {
            op: {d.type: _pick(op, native, d) for d in devices} for op, native in OPS.items()
        },
    }


def _no_cuda(env: dict) -> str:
    """What the report says of a build without CUDA kernels: with a CUDA torch, how to get them
    (pip shows setup.py's advice only under -v, so a build on a machine without a GPU and without
    TORCH_CUDA_ARCH_LIST left them out in silence)."""
    if not env["torch_cuda"] or env["switches"].get("KVPO_NATIVE_LIBRARY"):
        return "none"
    serves = "Triton" if env["triton"] else "the PyTorch reference"
    return (
        "none (torch has CUDA: rebuild with `pip install --no-build-isolation -e .` where a GPU "
        f"is visible or TORCH_CUDA_ARCH_LIST is set; meanwhile {serves} serves every op on CUDA "
        "tensors)"
    )


def report(env: dict) -> str:
    """:func:`environment` as the lines ``python -m kvpo_kernels.info`` prints."""
    gpu = env["gpu"]
    lines = [
        f"kvpo_kernels {env['kvpo_kernels']}, python {env['python']}, torch {env['torch']} "
        f"(CUDA {env['torch_cuda'] or 'none'})",
        "GPU: " + (f"{gpu['name']} (sm {gpu['capability']})" if gpu else "none"),
        "triton: "
        + (env["triton"] or "not installed")
        + (
            " (TRITON_INTERPRET=1: Triton kernels run on CPU tensors)"
            if env["triton_interpret"]
            else ""
        ),
        (
            f"compiled kernels from KVPO_NATIVE_LIBRARY={library}: "
            if (library := env["switches"].get("KVPO_NATIVE_LIBRARY"))
            else "compiled extension kvpo_kernels._C: "
        )
        + (
            "built; CUDA kernels: " + (", ".join(env["native_cuda_kernels"]) or _no_cuda(env))
            if env["native_extension"]
            else "not built (pip install --no-build-isolation -e .)"
        ),
        "switches: " + (", ".join(f"{k}={v}" for k, v in env["switches"].items()) or "none set"),
        f"routed_attention backward deterministic: {env['deterministic_backward']}",
        "backend per op:",
    ]
    for op, picks in env["backends"].items():
        lines.append(f"  {op:<18}" + "  ".join(f"{dev} tensors -> {b}" for dev, b in picks.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        prog="python -m kvpo_kernels.info", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    env = environment()
    print(json.dumps(env, indent=2) if args.json else report(env))
    return env


if __name__ == "__main__":
    main()
