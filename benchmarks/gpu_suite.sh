#!/usr/bin/env bash
# The GPU rows of docs/results.md in one command. Needs a CUDA GPU and the pretrained checkpoints that
# benchmarks/pretrain_pickcube.py leaves in <results>/runs/pretrain_<velocity>.
#
#   bash benchmarks/gpu_suite.sh [results_dir]
#   SIM=gpu (default): physx_cuda envs in one process (NUM_ENVS=256), replay buffer and updates on the GPU;
#                      SAPIEN needs its PhysX GPU library in ~/.sapien/physx
#   SIM=cpu:           physx_cpu worker processes (NUM_ENVS = the core count), networks on the GPU
#   EXTRA="finetune.utd=2"     extra recipe overrides for every stage; STAGE_TIMEOUT=900 (s) per stage
#
# 0. a smoke fine-tune (two chunks of updates, a 4-episode eval): stops the suite at once if the path breaks
# 1. PickCube offline-to-online, Flow-G then Flow-T, 100 eval episodes every 5k (gpu) or 10k (cpu) env steps
#    -> <results>/gpu_pickcube_<sim><N>.json/.png (steps and wall time to 0.90)
# 2. fine-tune loop throughput                          -> <results>/throughput_<sim><N>_gpu_learner.json
#    (SIM=cpu also with the networks on the CPU)        -> <results>/throughput_<sim><N>_cpu_learner.json
# 3. SIM=gpu: raw physx_cuda stepping at 1024 and 4096 envs -> <results>/throughput_gpu_raw_<n>.json
set -uo pipefail
cd "$(dirname "$0")/.."
R=${1:-results}
SIM=${SIM:-gpu}
if [ "$SIM" = gpu ]; then N=${NUM_ENVS:-256}; EVAL_EVERY=5000; else N=${NUM_ENVS:-$(nproc)}; EVAL_EVERY=10000; fi
PY=${PYTHON:-python}
T=${STAGE_TIMEOUT:-900}
read -r -a extra <<< "${EXTRA:-}"
sim=("env.backend=$SIM" "env.num_envs=$N" "${extra[@]}")
tag="$SIM$N"

stage() {  # stage <command...>: a stage that fails or runs out of time is reported, the rest still run
  echo "== $(date +%T) $*"
  timeout "$T" "$@"
  local rc=$?
  [ $rc -eq 0 ] || echo "!! exit $rc: $*"
  return $rc
}

$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: this suite measures the GPU')" \
  || exit 1
stage $PY -m flowmanip finetune recipes/pickcube.yaml "${sim[@]}" "out_dir=$R/runs/gpu_smoke" \
  "finetune.init=$R/runs/pretrain_gated/pretrain/checkpoints/last" finetune.total_env_steps=$((N * 16)) \
  finetune.learning_starts=0 finetune.critic_warmup=10 finetune.eval_episodes=4 env.num_eval_envs=4 --overwrite \
  || { echo "!! the smoke fine-tune failed: stopping"; exit 1; }
for v in gated decoded; do
  stage $PY benchmarks/finetune_curves.py --variants $v --steps 50000 --name "gpu_pickcube_$tag" --results "$R" \
    "${sim[@]}" "env.num_eval_envs=$((N < 100 ? N : 100))" finetune.eval_episodes=100 "finetune.eval_every=$EVAL_EVERY"
done
stage $PY benchmarks/throughput.py --backend "$SIM" --num-envs "$N" --steps $((N * 8 * 40)) \
  --name "throughput_${tag}_gpu_learner" --results "$R" "${extra[@]}"
if [ "$SIM" = cpu ]; then
  stage $PY benchmarks/throughput.py --backend cpu --num-envs "$N" --steps $((N * 8 * 40)) \
    --name "throughput_${tag}_cpu_learner" --results "$R" device=cpu "${extra[@]}"
else
  for n in 1024 4096; do
    stage $PY benchmarks/throughput.py --backend gpu --num-envs $n --steps $((n * 8 * 10)) --raw-only \
      --name "throughput_gpu_raw_$n" --results "$R" "${extra[@]}"
  done
fi
echo "== $(date +%T) done"
