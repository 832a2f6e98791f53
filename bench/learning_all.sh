#!/usr/bin/env bash
# The learning evidence of README "Results", end to end (about 3.5-4 hours on 2 cores):
#
#     bash bench/learning_all.sh                 # seeds 0-4 of every method, then one evaluation
#     SEEDS="0 1" bash bench/learning_all.sh     # fewer seeds
#
# Every method trains through the shipped configs with the same seeds, data schedule and
# 400 environment steps; then bench/learning_compare.py evaluates the base model and every
# seed's hf-best and hf-last in one run with the same sampling seed (192 programs each) and
# writes bench/results/learning_compare.{json,md,png}. One torch thread per run: the 1M-
# parameter model gains nothing from a second thread, and fixed threading keeps float
# reductions, hence the run, the same for a seed (docs/results.md, "Reproducibility").
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"0 1 2 3 4"}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
python bench/learning.py --train-only --reuse --seeds $SEEDS --out runs/bench_learning/etpo_lam0.9 --label "ETPO(lambda=0.9)"
python bench/learning.py --train-only --reuse --seeds $SEEDS --out runs/bench_learning/ppo --label PPO \
    --config configs/ppo_quickstart.yaml
python bench/learning.py --train-only --reuse --seeds $SEEDS --out runs/bench_learning/grpo --label GRPO \
    --config configs/grpo_quickstart.yaml
python bench/learning.py --train-only --reuse --seeds $SEEDS --out runs/bench_learning/etpo_lam0 --label "ETPO(lambda=0)" \
    -- --model.init_args.lam=0
python bench/learning_compare.py --samples 192 \
    --run "ETPO(lambda=0.9)=runs/bench_learning/etpo_lam0.9" \
    --run "PPO=runs/bench_learning/ppo" \
    --run "GRPO=runs/bench_learning/grpo" \
    --run "ETPO(lambda=0)=runs/bench_learning/etpo_lam0"
