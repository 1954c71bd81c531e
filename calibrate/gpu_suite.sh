#!/usr/bin/env bash
# The GPU suite: the CUDA tests, then `autoexperts bench` (which calibrates first) for several presets, all within
# one 10-minute command. Everything goes to one folder: $1, else $OUT, else ./gpu-suite-results.
#
#   PYTHONPATH=. bash calibrate/gpu_suite.sh "$OUT"
#
# Layout of the folder: env.txt, pytest-cuda.txt, <preset>.log, <device>/<preset>-bfloat16-none.{json,md,png},
# <device>/profiles/<device>/*.json|joblib (copy <device>/profiles/* into the repository's profiles/ to ship them).
set -uo pipefail
cd "$(dirname "$0")/.."

out=${1:-${OUT:-gpu-suite-results}}
mkdir -p "$out"
budget_seconds=${GPU_SUITE_SECONDS:-560}  # leave room under a 600 s limit to flush files
presets=${GPU_SUITE_PRESETS:-"qwen3-30b-a3b olmoe-1b-7b gpt-oss-20b mixtral-8x7b"}
python=${PYTHON:-python}
device=${GPU_SUITE_DEVICE:-cuda}  # cpu only to try the script itself

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    "$python" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name())"
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

timeout 90 "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py >"$out/pytest-cuda.txt" 2>&1
echo "CUDA tests: exit $? ($(tail -n 1 "$out/pytest-cuda.txt"))"

for preset in $presets; do
    left=$((budget_seconds - SECONDS))
    if [ "$left" -lt 60 ]; then
        echo "skipping $preset: ${left}s left" | tee -a "$out/skipped.txt"
        continue
    fi
    echo "== $preset (${left}s left)"
    timeout "$left" "$python" -m autoexperts bench --model "$preset" --device "$device" --dtype bfloat16 --out "$out" \
        --seconds-per-point 0.3 --calibration-seconds-per-point 0.25 --long-prefill 8192 --new-tokens 64 \
        --no-progress >"$out/$preset.log" 2>&1
    status=$?
    echo "   exit $status after $((SECONDS))s"
    grep -E "^(met|MISSED|n/a)" "$out/$preset.log"
done
echo "suite finished in ${SECONDS}s"
