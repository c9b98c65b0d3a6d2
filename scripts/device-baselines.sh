#!/usr/bin/env bash
# The evidence grid's baselines (BC CQL PLAS BCQ, 3 seeds, 10k steps: the `baselines` stage of
# scripts/evidence-grid.sh) on a lent GPU machine, all lanes at once: CQL and BCQ (many small
# kernels per update, BCQ's 100 sampled actions per state) on the GPU, BC and PLAS on CPU
# cores, one lane per dataset and method, one torch thread each. Finished runs come back as
# $OUT/runs.tar.gz (without their model.pt, which the report does not read), to unpack in the
# repository root; a run cut off by the time limit is left out and runs again later.
#
#   scripts/device-baselines.sh SECONDS DATASET...   # on the device, after `scripts/gpu-bundle.sh` here
#
# SECONDS: no new run starts after it, and lanes still running at 1.5x it are stopped.
# GPU_METHODS / CPU_METHODS (default "CQL BCQ" / "BC PLAS") pick the lanes, e.g. only the
# methods with runs left. On an H100 with 16 cores, 4 datasets (16 lanes, 8 on the GPU) in
# 495 s: BC ~85 s a run, PLAS ~190 s, BCQ ~440 s, and no CQL run finished. BC and PLAS also
# fit this project's CPU (evidence-grid.sh with LMENCODERS_BASELINES="BC PLAS"): with
# CPU_METHODS="" the GPU lanes keep a host core each.
# What travels: the repository, .gpu/whl (no LM weights: baselines read none) and the
# datasets, under the machine's 64 MiB; Hopper's three files and one FinRL file fit together.
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:?seconds}
shift
out=${OUT:-/tmp/out}
steps=${LMENCODERS_STEPS:-10000}  # fewer only to try the script out
mkdir -p "$out" /tmp/lanes
# the machine's Python has torch and transformers; the rest travels as wheels (.gpu/whl)
python3 -c "import d3rlpy" 2> /dev/null || python3 -m pip install -q --no-index --no-deps \
  --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
python3 -c "import gymnasium, lmencoders.cli; gymnasium.make('Hopper-v5').reset()" || exit 1
gpu=cuda:0
python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || gpu=cpu
echo "GPU lanes on $gpu: $(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null)"

lane() {  # dataset method device
  local log episodes=10
  log=/tmp/lanes/$(basename "$1" .npz)-$2.log
  [[ $(basename "$1") == finance* ]] && episodes=1  # FinRL's episodes are deterministic
  timeout $((budget * 3 / 2)) python3 -m lmencoders experiment --datasets "$1" \
    --out experiments/grid --methods "$2" --seeds 0 1 2 --steps "$steps" \
    --eval-every $((steps / 2)) --eval-episodes "$episodes" --device "$3" --time-budget "$budget" > "$log" 2>&1
  local status=$?
  echo "$(date +%T) lane $(basename "$1") $2 on $3 ended: $status"
}
for dataset in "$@"; do
  for method in ${GPU_METHODS:-CQL BCQ}; do lane "$dataset" "$method" "$gpu" & done
  for method in ${CPU_METHODS:-BC PLAS}; do lane "$dataset" "$method" cpu & done
done
wait
finished=$(cd experiments/grid/runs 2> /dev/null && for r in */result.json; do
  [[ -f $r ]] && echo "experiments/grid/runs/$(dirname "$r")"; done)
[[ -n $finished ]] && tar czf "$out/runs.tar.gz" --exclude model.pt $finished
tail -n 3 /tmp/lanes/*.log > "$out/lanes.log"
echo "$(echo "$finished" | wc -w) finished runs in runs.tar.gz"
