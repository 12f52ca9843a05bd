#!/usr/bin/env bash
# What a session with a lent GPU machine runs, in few long calls; logs and tables go under $OUT.
#
#   bash scripts/gpu_session.sh all     # one call (a 15-minute lease): build, velocity_energy's
#                                       # tables (first: issue 3's last goal), the GPU tests, the
#                                       # main tables, 2 trainer iterations, the random-input
#                                       # tests on the GPU backends, then the sweep with
#                                       # whatever time is left (BUDGET_S, default 560 s)
#   bash scripts/gpu_session.sh kernels # routed_attention alone (about 8 minutes): build, its GPU
#                                       # tests (every backend, both backward modes, the Hopper
#                                       # CUDA path), the attention tables (forward, forward +
#                                       # backward, the backward alone; 1536-token frames), the
#                                       # Triton compile table of this card, its random draws
#   bash scripts/gpu_session.sh check   # build with CUDA, GPU tests, the main tables, 2 trainer
#                                       # iterations, the random-input tests
#   bash scripts/gpu_session.sh suite   # the full GPU suite (main tables, cache length x G sweep)
#   bash scripts/gpu_session.sh velocity  # build, velocity_energy's GPU tests and tables (about
#                                       # 2 minutes: no FlexAttention compile), its random draws
#   bash scripts/gpu_session.sh wan     # Wan2.1-1.3B's shape (random weights): the adapter's
#                                       # chunk step against diffusers, one KVPO iteration
#                                       # (WAN_ARGS="--group_size 8 --rollout_branches 3": its
#                                       # options)
#
# Each stage builds the extension first (a fresh machine is bare); if the CUDA build fails, the
# extension is rebuilt without CUDA so the Triton measurements still run. TRITON_INTERPRET=0: the
# test suite's default (1, for CPU-only CI) would run the Triton kernels in the interpreter.
# Every step has a time limit and writes its own file under $OUT, so a step that fails or runs
# long costs only itself.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
stage=${1:-check}
deadline=$(($(date +%s) + ${BUDGET_S:-560}))

# step NAME CAP_S CMD...: runs CMD for at most CAP_S seconds and never past the deadline; logs
# its wall time and exit status to $OUT/steps.txt.
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((deadline - $(date +%s)))
  ((left < cap)) && cap=$left
  if ((cap < 20)); then
    echo "$name: skipped, ${left}s left" | tee -a "$OUT/steps.txt"
    return 0
  fi
  local t0=$(date +%s)
  timeout -k 10 "$cap" "$@"
  local rc=$?
  echo "$name: rc=$rc, $(($(date +%s) - t0))s (limit ${cap}s)" | tee -a "$OUT/steps.txt"
}

{
  nvidia-smi
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  nvcc --version | tail -2
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

build() {
  MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install -q --no-build-isolation --no-deps -e . \
    > "$OUT/build.log" 2>&1 && return 0
  tail -40 "$OUT/build.log"
  echo "== CUDA build failed; building without CUDA (Triton runs on) ==" | tee -a "$OUT/steps.txt"
  KVPO_NO_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps -e . \
    >> "$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }
}
t0=$(date +%s)
build
echo "build: $(($(date +%s) - t0))s" | tee -a "$OUT/steps.txt"
python3 -c "import kvpo_kernels as k; from kvpo_kernels import _backend as b; print('native', k.native_available(), 'cuda kernels', b.native_cuda_available('routed_attn_fwd'), b.native_cuda_available('velocity_energy_fwd'))" \
  | tee -a "$OUT/env.txt"

gpu_tests() {  # extra arguments go to pytest (-k velocity)
  local par=()
  python3 -c "import xdist" 2>/dev/null && par=(-n 4)
  local rc=0
  python3 -m pytest -q -ra --tb=short "${par[@]}" tests/kernels/test_cuda.py "$@" \
    > "$OUT/tests.log" 2>&1 || rc=$?
  tail -25 "$OUT/tests.log"
  return $rc
}
gpu_random() {  # random draws on the GPU backends (Triton compiles and autotunes each new shape:
  # a step of its own, after the measurements); the argument narrows pytest's -k
  local rc=0
  python3 -m pytest -q -ra --tb=short tests/kernels/test_random_inputs.py -k "cuda ${1:-}" \
    > "$OUT/random.log" 2>&1 || rc=$?
  tail -25 "$OUT/random.log"
  return $rc
}
train_two() {
  # The trainer end to end on the GPU (Triton kernels under it; two micro-batches of groups;
  # a CUDA profiler trace of its second iteration); its log has per-stage seconds. Then the
  # checkpoint's evaluation and samples, and a few pretraining steps, on the GPU.
  local rc=0
  {
    python3 -m kvpo.train --device cuda --iterations 2 --eval_every 2 --samples false \
      --micro_batch 2 --eval_batch 16 --progress false --out_dir /tmp/kvpo-train \
      --profile_iteration 1 &&
      head -16 /tmp/kvpo-train/profile/iter_1_rank_0.txt &&
      cp /tmp/kvpo-train/profile/iter_1_rank_0.txt "$OUT/train_profile.txt" &&
      python3 -m kvpo.evaluate --device cuda --checkpoint /tmp/kvpo-train/checkpoint.safetensors &&
      python3 -m kvpo.sample --device cuda --checkpoint /tmp/kvpo-train/checkpoint.safetensors \
        --out /tmp/kvpo-samples &&
      python3 -m kvpo.pretrain --device cuda --steps 20 --out /tmp/kvpo-pretrain.safetensors
  } > "$OUT/train.log" 2>&1 || rc=$?
  tail -12 "$OUT/train.log"
  return $rc
}
export -f gpu_tests gpu_random train_two  # `timeout` runs them through `bash -c`

case "$stage" in
  all)
    step velocity 120 python3 -m benchmarks.gpu_suite --part velocity --out "$OUT/gpu_velocity.md"
    step tests 170 bash -c gpu_tests
    step main 240 python3 -m benchmarks.gpu_suite --part main --out "$OUT/gpu_main.md"
    step train 120 bash -c train_two
    step random 120 bash -c gpu_random
    step sweep 600 python3 -m benchmarks.gpu_suite --part sweep --out "$OUT/gpu_sweep.md"
    ;;
  kernels)
    step tests 200 bash -c "gpu_tests -k 'not velocity'"
    step attention 330 python3 -m benchmarks.gpu_suite --part attention \
      --out "$OUT/gpu_attention.md"
    step random 90 bash -c "gpu_random 'and routed'"
    ;;
  check)
    step tests 300 bash -c gpu_tests
    step main 300 python3 -m benchmarks.gpu_suite --part main --out "$OUT/gpu_main.md"
    step train 180 bash -c train_two
    step random 180 bash -c gpu_random
    ;;
  suite)
    step suite 600 python3 -m benchmarks.gpu_suite --out "$OUT/gpu.md"
    ;;
  velocity)
    step tests 120 bash -c "gpu_tests -k velocity"
    step velocity 120 python3 -m benchmarks.gpu_suite --part velocity --out "$OUT/gpu_velocity.md"
    step random 90 bash -c "gpu_random 'and velocity'"
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
    # shellcheck disable=SC2086  # WAN_ARGS is a list of options
    step wan 600 python3 -m benchmarks.wan_bench --out "$OUT/wan.md" --run_dir /tmp/kvpo-wan-run \
      ${WAN_ARGS:-}
    ;;
  *)
    echo "usage: $0 all|kernels|check|suite|velocity|wan" >&2
    exit 2
    ;;
esac
