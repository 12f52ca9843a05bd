#!/usr/bin/env bash
# The runs of benchmarks/RESULTS.md "The public recipe, this project's recipes and a fair
# Flow-GRPO": 20 iterations each on the built-in generator, two at a time on one thread each.
#   bash benchmarks/recipes.sh ROOT compare       # 3 seeds of three recipes; Flow-GRPO's lr sweep
#   bash benchmarks/recipes.sh ROOT pieces        # the public pieces; Flow-GRPO's sweep, finer
#   bash benchmarks/recipes.sh ROOT flow LR       # Flow-GRPO at its best LR, seeds 1-2
#   python -m benchmarks.recipes ROOT             # the table
set -euo pipefail
ROOT=$1
PHASE=$2
COMMON="--threads 1 --samples false --progress false"
run() {  # NAME SEED FLAGS...
  local name=$1 seed=$2; shift 2
  [ -f "$ROOT/$name-s$seed/checkpoint.safetensors" ] && return 0
  python -m kvpo.train $COMMON --seed "$seed" --out_dir "$ROOT/$name-s$seed" "$@" \
    > "$ROOT/$name-s$seed.log" 2>&1
}
export -f run; export ROOT COMMON
mkdir -p "$ROOT"
PUBLIC="--config configs/kvpo_public_builtin.yaml"
# Flow-GRPO: its clip range (1e-4), its noise level (a = 0.7), KVPO's prompts, G and iterations
FLOW="--explore sde --clip_low 1e-4 --clip_high 1e-4"
{
  if [ "$PHASE" = compare ]; then
    for s in 0 1 2; do
      echo "default $s"
      echo "sample-nearest1 $s --local_window 4 --routing sample --recent_frames 1"
      echo "public $s $PUBLIC"
    done
    for lr in 1e-5 1e-4 1e-3; do echo "flowgrpo-lr$lr 0 $FLOW --lr $lr"; done
  elif [ "$PHASE" = flow ]; then
    for s in 1 2; do echo "flowgrpo-lr$3 $s $FLOW --lr $3"; done
  else
    for lr in 3e-5 3e-4; do echo "flowgrpo-lr$lr 0 $FLOW --lr $lr"; done
    # the public recipe with one piece at a time put back to this project's default
    echo "public-branch-tve 0 $PUBLIC --likelihood branch --log_prob_grad_steps 0 --score_stream false"
    echo "public-no-old-policy 0 $PUBLIC --old_policy_sync 0 --lr_schedule constant --lr_warmup 0 --log_ratio_clamp 0 --epochs 2"
    echo "public-group-adv 0 $PUBLIC --advantage group --protect skip --reward_scopes video=1"
    echo "public-sample-routing 0 $PUBLIC --routing sample --routed_cache_pass false"
    echo "public-velocity-kl 0 $PUBLIC --kl velocity"
    echo "public-single-prompt 0 $PUBLIC --switch_chunks [] --recache none"
  fi
} | xargs -P 2 -L 1 bash -c 'run "$@"' _
