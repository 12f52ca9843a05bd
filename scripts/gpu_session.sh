#!/usr/bin/env bash
# What a session with a lent GPU machine runs, in few long calls; logs and tables go under $OUT.
#
#   bash scripts/gpu_session.sh check   # ~6 min: build with CUDA, GPU tests, the quick suite,
#                                       # 2 trainer iterations on the GPU
#   bash scripts/gpu_session.sh suite   # ~8 min: the full GPU suite (cache length and G sweep)
#   bash scripts/gpu_session.sh wan     # Wan2.1-1.3B's shape (random weights): the adapter's
#                                       # chunk step against diffusers, one KVPO iteration
#
# Each stage builds the extension first (a fresh machine is bare). TRITON_INTERPRET=0: the test
# suite's default (1, for CPU-only CI) would run the Triton kernels in the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
stage=${1:-check}

{
  nvidia-smi
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install -q --no-build-isolation --no-deps -e . \
  > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import kvpo_kernels as k; from kvpo_kernels import _backend as b; print('native', k.native_available(), 'cuda kernels', b.native_cuda_available('routed_attn_fwd'), b.native_cuda_available('velocity_energy_fwd'))" \
  | tee -a "$OUT/env.txt"

case "$stage" in
  check)
    python3 -m pytest -q -ra tests/kernels/test_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -40
    python3 -m benchmarks.gpu_suite --quick --out "$OUT/gpu_quick.md" 2>&1 | tail -60
    # The trainer end to end on the GPU (Triton kernels under it); its log has per-stage seconds.
    python3 -m kvpo.train --device cuda --iterations 2 --eval_every 2 --samples false \
      --progress false --out_dir "$OUT/train" 2>&1 | tee "$OUT/train.log" | tail -8
    ;;
  suite)
    python3 -m benchmarks.gpu_suite --out "$OUT/gpu.md" 2>&1 | tail -80
    ;;
  wan)
    # The device reaches no index: diffusers, if the image lacks it, comes from wheels carried
    # in wheels/ (here: pip download --no-deps -d wheels diffusers accelerate huggingface_hub,
    # plus what `pip install` then names as missing; carry=["wheels"]).
    if ! python3 -c "import diffusers" 2>/dev/null; then
      python3 -m pip install -q --no-index --find-links wheels diffusers accelerate \
        > "$OUT/pip-diffusers.log" 2>&1 \
        || { echo "no diffusers on the device:"; tail -5 "$OUT/pip-diffusers.log"; exit 1; }
    fi
    python3 -m benchmarks.wan_bench --out "$OUT/wan.md" --run_dir "$OUT/wan_run" 2>&1 \
      | tee "$OUT/wan.log" | tail -30
    ;;
  *)
    echo "usage: $0 check|suite|wan" >&2
    exit 2
    ;;
esac
