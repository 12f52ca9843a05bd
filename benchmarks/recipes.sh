#!/usr/bin/env bash
# The runs of benchmarks/RESULTS.md "The public recipe, this project's recipes and a fair
# Flow-GRPO": 20 iterations each on the built-in generator, two at a time on one thread each.
#   bash benchmarks/recipes.sh [ROOT]      # then: python -m benchmarks.recipes ROOT
set -euo pipefail
ROOT=${1:-runs/recipes}
COMMON="--threads 1 --samples false --progress false"
run() {  # NAME SEED FLAGS...
  local name=$1 seed=$2; shift 2
  [ -f "$ROOT/$name-s$seed/checkpoint.safetensors" ] && return 0
  python -m kvpo.train $COMMON --seed "$seed" --out_dir "$ROOT/$name-s$seed" "$@" \
    > "$ROOT/$name-s$seed.log" 2>&1
}
export -f run; export ROOT COMMON
mkdir -p "$ROOT"
{
  for s in 0 1 2; do
    echo "default $s"
    echo "sample-nearest1 $s --local_window 4 --routing sample --recent_frames 1"
    echo "public $s --config configs/kvpo_public_builtin.yaml"
  done
  # Flow-GRPO: its clip range (1e-4), its noise level (a = 0.7), an lr sweep on seed 0
  for lr in 1e-5 1e-4 1e-3; do
    echo "flowgrpo-lr$lr 0 --explore sde --clip_low 1e-4 --clip_high 1e-4 --lr $lr"
  done
} | xargs -P 2 -L 1 bash -c 'run "$@"' _
