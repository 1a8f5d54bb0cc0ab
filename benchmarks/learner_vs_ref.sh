#!/usr/bin/env bash
# The learner's cost per update and the loop's throughput, for an earlier commit REF and for the working
# tree, measured one after the other on the same machine (run it alone: both are wall-clock numbers).
#   bash benchmarks/learner_vs_ref.sh REF [NAME]
# Writes results/<NAME>_ref_update_ops.json, results/<NAME>_update_ops.json and the two throughput files.
set -euo pipefail
cd "$(dirname "$0")/.."
REF=${1:?usage: learner_vs_ref.sh REF [NAME]}
NAME=${2:-learner}
PY=${PYTHON:-.venv/bin/python}
RESULTS=$PWD/results
WT=$(mktemp -d)
trap 'git worktree remove --force "$WT" >/dev/null 2>&1 || true' EXIT
git worktree add --detach "$WT" "$REF" >/dev/null
export PYTHONWARNINGS="ignore::FutureWarning"
for side in ref head; do
  if [ "$side" = ref ]; then dir=$WT; tag=${NAME}_ref; else dir=$PWD; tag=$NAME; fi
  (cd "$dir" && PYTHONPATH="$dir" "$OLDPWD/$PY" benchmarks/update_ops.py --recipes recipes/pickcube.yaml \
      --repeats 20 --results "$RESULTS" --name "${tag}_update_ops")
  (cd "$dir" && PYTHONPATH="$dir" "$OLDPWD/$PY" benchmarks/throughput.py --steps 4000 --results "$RESULTS" \
      --name "${tag}_throughput")
done
