#!/usr/bin/env bash
# Reproduce the shipped default model (ldm/assets/shapes.safetensors) from scratch on the CPU:
# render the shapes data sets, train the VAE (stage 1), train the text-conditioned U-Net on its
# latents (stage 2), export the EMA weights as fp16, and score the result.
#   bash scripts/train_default_model.sh [WORK_DIR]      (default WORK_DIR: runs/default_model)
# Environment: PYTHON (default .venv/bin/python). Data goes under WORK_DIR/data (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
WORK="${1:-runs/default_model}"
DATA="$WORK/data"

if [ ! -x "$PY" ] && ! command -v "$PY" >/dev/null; then
    echo "error: python interpreter '$PY' not found (set PYTHON=...)" >&2
    exit 2
fi
mkdir -p "$DATA"

# 1. Data: 20k random 32x32 crops for the (fully convolutional) VAE, 12k full images for stage 2.
[ -f "$DATA/crops32/019999.txt" ] || \
    "$PY" scripts/make_shapes.py --out "$DATA/crops32" --num 20000 --seed 1 --crop 32 --overwrite --quiet
[ -f "$DATA/shapes64/011999.txt" ] || \
    "$PY" scripts/make_shapes.py --out "$DATA/shapes64" --num 12000 --seed 0 --overwrite --quiet

# 2. Stage 1: the 4x VAE (2500 steps, about 15 minutes with two threads).
"$PY" scripts/train_vae.py --config configs/shapes_vae.yaml --out "$WORK/vae" data.path="$DATA/crops32"

# 3. Stage 2: U-Net + text tower on cached latents of the frozen VAE (6000 steps, about 90 minutes).
"$PY" scripts/train_ldm.py --config configs/shapes_ldm.yaml --out "$WORK/ldm" \
    data.path="$DATA/shapes64" ldm.vae="$WORK/vae/vae.safetensors"

# 4. Ship: EMA weights in fp16 (config inside), then the evaluation on all 168 triples.
"$PY" scripts/export_default_model.py "$WORK/ldm/model.safetensors" --out ldm/assets/shapes.safetensors \
    --note "bash scripts/train_default_model.sh (configs/shapes_vae.yaml 2500 steps; configs/shapes_ldm.yaml 6000 steps)"
"$PY" scripts/eval_shapes.py --outdir "$WORK/eval"
