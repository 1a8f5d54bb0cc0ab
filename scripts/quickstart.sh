#!/usr/bin/env bash
# Set up, then the main job on the shipped PickCube demos: pretrain, a short fine-tune, evaluation.
# Prints success before (pretrained) and after (fine-tuned). Extra key=value overrides apply to both stages.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONWARNINGS="ignore::FutureWarning"
RECIPE=${RECIPE:-recipes/pickcube.yaml}
OUT=${OUT:-runs/quickstart}
EPISODES=${EPISODES:-50}
FM=".venv/bin/flowmanip"
$FM pretrain --overwrite "$RECIPE" out_dir="$OUT" "$@"
$FM finetune --overwrite "$RECIPE" out_dir="$OUT" finetune.total_env_steps="${FINETUNE_STEPS:-10000}" "$@"
before=$($FM eval "$OUT/pretrain" --episodes "$EPISODES" --json)
after=$($FM eval "$OUT/finetune" --episodes "$EPISODES" --json)
.venv/bin/python - "$before" "$after" <<'PY'
import json, sys
before, after = (json.loads(s) for s in sys.argv[1:3])
print(f"{'':>12} {'success_once':>13} {'success_at_end':>15} {'return':>8}")
for name, r in (("pretrained", before), ("fine-tuned", after)):
    print(f"{name:>12} {r['success_once']:>13.3f} {r['success_at_end']:>15.3f} {r['return_mean']:>8.2f}")
PY
