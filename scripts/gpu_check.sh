#!/usr/bin/env bash
# The GPU checks in one short run, for a machine with an NVIDIA GPU and a CUDA build of
# PyTorch (nothing is downloaded): builds ldm._C with its CUDA kernels for this GPU, then runs
# the CUDA tests, the kernel benchmark on the GPU and a timed 512 px, 20-step guided txt2img of
# the SD 2.1-base architecture (random weights) in fp16 and bf16. Each step's output is printed
# and kept in OUT_DIR/<step>.log; a failed step is reported and the others still run; the exit
# status is non-zero when any failed.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default OUT_DIR: runs/gpu
#
# PYTHON picks the interpreter (default python3). The txt2img step needs open_clip (the SD 2.x
# text tower); packages the machine lacks can come as wheels in WHEELS (default .whl, ignored
# by git), made on a machine with an index, e.g. for Python 3.12:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 -d .whl open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth
# About 5 minutes on one H100 with 16 cores, most of it the build.
set -uo pipefail
out=${1:-runs/gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
failed=()

wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" > /dev/null; then
  site=$(mktemp -d)
  "$py" -m pip install -q --no-index --no-deps --target "$site" "$wheels"/*.whl &&
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

step() {  # step NAME COMMAND...: run it, keep its output in $out/NAME.log
  local name=$1
  shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ]; then
    echo "== $name failed (exit $rc)"
    failed+=("$name")
  fi
}

step device nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step torch "$py" -c "import torch; print(torch.__version__, 'CUDA', torch.version.cuda,
  torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
# Only this GPU's architecture: a quicker build than the default list.
arch=$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || arch=9.0
step build env LDM_REQUIRE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" \
  MAX_JOBS="$(nproc)" "$py" setup.py -q build_ext --inplace
step tests "$py" -m pytest -q -rs tests/test_kernels_cuda.py tests/test_cuda_graph.py
if grep -q "^SKIPPED" "$out/tests.log"; then  # a skipped GPU test checked nothing
  echo "== tests: some skipped (no GPU, or ldm._C without CUDA)"
  failed+=(tests-skipped)
fi
step bench_kernels "$py" scripts/bench_kernels.py --device cuda
for precision in fp16 bf16; do
  step "txt2img_$precision" "$py" scripts/bench_txt2img.py --device cuda --precision "$precision" \
    --repeats 3
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: failed: ${failed[*]} (logs in $out)"
  exit 1
fi
echo "gpu_check: every step passed (logs in $out)"
