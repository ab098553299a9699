#!/usr/bin/env bash
# The GPU benchmark in one prepared script: under 8 minutes on one H100 (16 cores).
#
#   bash bench/gpu.sh                 # figures in runs/bench-gpu (or $OUT/bench-gpu when OUT is set)
#
# Prints, for each backbone at 512 px (batch 8): training images/s with the fast path (bf16,
# channels_last, TF32, cudnn.benchmark, fused SGD, no per-step host syncs) and with plain fp32
# of the same code, their ratio, inference images/s and peak GPU memory; the training loader's
# images/s with 8 workers; the end-to-end prediction of a 559-image 2048 px test set with 16
# workers; then, if time is left, ResNet101-FPN with torch.compile of the backbone.
#
# Set-up: uses the python3 on PATH. If hpa_scc does not import, installs the repo in editable
# mode without the network (wheels the image lacks can be put in .whl/ beside this repo:
# pycocotools, iterative-stratification).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
OUT_DIR="${OUT:-runs}/bench-gpu"
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}

if ! "$PY" -c "import hpa_scc, pycocotools, iterstrat" 2>/dev/null; then
  echo "== installing hpa_scc (no network)"
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl
  fi
  "$PY" -m pip install -q --no-index --no-build-isolation --no-deps -e .
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda)"

# The figures the targets name; each benchmark has its own timeout inside run.py.
"$PY" bench/run.py --profile gpu --only train_step loader predict --out "$OUT_DIR" || echo "some benchmark failed: see $OUT_DIR/*.log"

# torch.compile of the backbone: worth it only if it beats the fast path above (compiling costs minutes).
LEFT=$(( 450 - (SECONDS - START) ))
if (( LEFT > 120 )); then
  echo "== ResNet101-FPN fast path + torch.compile (${LEFT}s left)"
  timeout "$LEFT" "$PY" bench/train_step.py --device cuda --size 512 --batch 8 --steps 15 --warmup 5 --mode fast \
    --compile --backbones resnet101_fpn --json "$OUT_DIR/train_step_compile.json" || echo "compile run stopped (time or error)"
else
  echo "== skipped torch.compile run: ${LEFT}s left"
fi
cat "$OUT_DIR/table.txt" 2>/dev/null || true
echo "total $(( SECONDS - START )) s; JSON and logs in $OUT_DIR"
