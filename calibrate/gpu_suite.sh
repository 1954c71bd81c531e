#!/usr/bin/env bash
# The GPU suite: one command of at most ~9 minutes (GPU_SUITE_SECONDS, default 530 s) that runs the stage for the GPU it
# finds, its steps in order of what matters most, each in a time box of its own: a step that breaks or runs long costs
# only its box, one that would get under 30 s is skipped, and the suite as a whole never fails over a step. Run it as
#
#   PYTHONPATH=. bash calibrate/gpu_suite.sh "$OUT"
#
# The stage (GPU_SUITE_STAGE=new-gpu|h200|serve overrides it): `h200` where profiles/<this GPU>/ ships profiles (only the
# H200 does), else `new-gpu`.
#
# new-gpu (a GPU with no shipped profiles, an H100 say): what a user of that GPU lacks, then what can be judged there
#    1. the CUDA tests; the matmul-rate probe against matmuls timed directly; auto's per-call cost, piece by piece;
#    2. `calibrate` of the 7 presets, bfloat16, uncompiled, full grid (one process: calibrate_presets.py), the profiles
#       to ship under profiles/<gpu>/;
#    3. the bfloat16 device model, timed (target <= 180 s), and its picks on those 7 profiles (<= 1.05 median, <= 1.10);
#    4. qwen1.5's forward table with >= 20 interleaved rounds per cell (auto within 2 % of the backend it runs);
#    5. generate() at batch 64, 1 and 8 against Transformers' default; the layer sweep and dispatch overhead;
#    6. a calibration with Transformers' other backends where registered (sonicmoe, deepgemm); tune; serve.
# h200 (the H200, whose presets' profiles ship): what its runs left open
#    1. the CUDA tests, the probe, the per-call cost;
#    2. the bfloat16 device model re-timed against 180 s, and its picks on the shipped profiles;
#    3. the uncompiled forward table with >= 20 rounds (the shipped profiles);
#    4. the float16 device model, timed; its held-out regrets (from its JSON) decide whether it ships;
#    5. the forward table under torch.compile mode `default` (the shipped `default` profiles);
#    6. the crossovers: qwen3 and qwen1.5 calibrated afresh (with the crossover refinement), qwen3's layer sweep on them;
#    7. a `max-autotune-no-cudagraphs` calibration of qwen1.5; other backends where registered; tune; serve.
#
# GPU_SUITE_STAGE=serve: continuous batching (`bench --parts serve`: a 64-request trace, auto tuned in place against
# every fixed backend and Transformers' default) on the qwen3-30b-a3b shape, its layer calibrated first (no shipped
# profile is assumed: any GPU), steps of up to 2048 tokens, spanning the GPU's batched_mm -> grouped_mm crossover at
# a few tokens; then the same on gpt-oss-20b while time is left.
#
# Everything goes to one folder ($1, else $OUT, else ./gpu-suite-results): suite.log, and results.tar.gz, rewritten
# after every step, holding env.txt, <step>.log for every step, and the results: profiles/<gpu>/ (copy into the
# repository's profiles/), bench-like folders <step>/<gpu>/*.{json,md,png}, probe.json, per-call-cost.md,
# <calibration step>-summary.json, device-model-check-*.{json,md}, profiles-other-backends/, tune/tune-in-place.json.
#
# On a CPU, to try a stage (tiny models, the grid cut to 64 tokens; see "Next GPU run" in docs/results.md;
# GPU_SUITE_STAGE=h200 there calibrates stand-ins for the shipped profiles first):
#
#   GPU_SUITE_DEVICE=cpu GPU_SUITE_DTYPE=float32 GPU_SUITE_STAGE=new-gpu GPU_SUITE_PRESETS="small-moe olmoe-1b-7b" \
#   GPU_SUITE_TABLE_MODEL=small-moe GPU_SUITE_CROSSOVER_MODELS=small-moe GPU_SUITE_EXTRA_MODEL=small-moe \
#   GPU_SUITE_TOKENS=1,2,3,4,6,8,12,16,24,32,48,64 GPU_SUITE_LONG_PREFILL=256 GPU_SUITE_GENERATE_ROUNDS=2 \
#   PYTHONPATH=. bash calibrate/gpu_suite.sh /tmp/dry-new-gpu
#
# GPU_SUITE_SKIP="step ..." skips the named steps; GPU_SUITE_BOX_PERCENT scales every box (and the 30 s minimum).
set -uo pipefail
cd "$(dirname "$0")/.."

out=${1:-${OUT:-gpu-suite-results}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=${GPU_SUITE_WORK:-$(mktemp -d)}  # the results, packed into $out/results.tar.gz after every step
mkdir -p "$work"
budget_seconds=${GPU_SUITE_SECONDS:-530}  # one device command may run 600 s: leave room to pack and return
box_percent=${GPU_SUITE_BOX_PERCENT:-100}  # every step's box scaled (a dry run's)
device=${GPU_SUITE_DEVICE:-cuda}  # cpu only to try the script itself
dtype=${GPU_SUITE_DTYPE:-bfloat16}
presets=${GPU_SUITE_PRESETS:-"qwen1.5-moe-a2.7b qwen3-30b-a3b olmoe-1b-7b mixtral-8x7b gpt-oss-20b deepseek-v3 solar-open-100b"}
table_model=${GPU_SUITE_TABLE_MODEL:-qwen1.5-moe-a2.7b}
crossover_models=${GPU_SUITE_CROSSOVER_MODELS:-"qwen3-30b-a3b qwen1.5-moe-a2.7b"}
extra_model=${GPU_SUITE_EXTRA_MODEL:-qwen3-30b-a3b}
shipped=${GPU_SUITE_SHIPPED:-profiles}
long_prefill=${GPU_SUITE_LONG_PREFILL:-8192}
forward_rounds=${GPU_SUITE_FORWARD_ROUNDS:-20}
generate_rounds=${GPU_SUITE_GENERATE_ROUNDS:-10}
tokens=${GPU_SUITE_TOKENS:-}  # a dry run's short list of counts for every calibration (default: the full grid)
skip=" ${GPU_SUITE_SKIP:-} "  # step names not to run (a second run that goes on where a first stopped, a dry run)
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

exec > >(tee -a "$out/suite.log") 2>&1

pack() {
    tar -czf "$out/results.tar.gz.part" -C "$work" . && mv "$out/results.tar.gz.part" "$out/results.tar.gz"
}

# step NAME CAP COMMAND...: runs COMMAND with its output in $work/NAME.log, for at most CAP seconds and never past the
# suite's budget; skipped when under 30 s would be left for it (CAP and the 30 s scaled by GPU_SUITE_BOX_PERCENT).
step() {
    local name=$1 cap=$(($2 * box_percent / 100)) least=$((30 * box_percent / 100))
    shift 2
    if [[ "$skip" == *" $name "* ]]; then
        echo "== $name: skipped (GPU_SUITE_SKIP)"
        return 0
    fi
    local left=$((budget_seconds - SECONDS))
    local box=$((cap < left ? cap : left))
    if [ "$box" -lt "$least" ]; then
        echo "== $name: skipped (${left}s left of the suite's ${budget_seconds}s)"
        return 0
    fi
    echo "== $name (box ${box}s, ${SECONDS}s elapsed): $*"
    local started=$SECONDS
    # SIGINT first, so that a calibration keeps its checkpoint; continuous batching's thread took 8 s to stop on a
    # CPU dry run, so the kill comes 30 s later (within the 70 s the budget leaves below the command's 600 s)
    timeout --signal INT --kill-after 30 "$box" "$@" >"$work/$name.log" 2>&1
    local status=$?
    echo "   exit $status after $((SECONDS - started))s$([ "$status" = 124 ] && echo ' (cut off by its box)')"
    grep -E "^(met|MISSED|n/a)|Error|error:|FAILED|calibrated in|^[a-z0-9.-]+: .* s by the tool|^held out|^Device model" \
        "$work/$name.log" | head -n 16
    pack
    return 0
}

# bench NAME CAP PROFILE_DIR [ARGS...]: `autoexperts bench` into $work/NAME with the profiles of PROFILE_DIR.
bench() {
    local name=$1 cap=$2 profile_dir=$3
    shift 3
    step "$name" "$cap" "$python" -m autoexperts bench --device "$device" --dtype "$dtype" --out "$work/$name" \
        --profile-dir "$profile_dir" --seconds-per-point 0.25 --long-prefill "$long_prefill" --prompt-length 128 \
        --new-tokens 64 --no-progress "$@"
}

# calibrate NAME CAP PRESETS [ARGS...]: calibrate_presets.py of the comma-separated PRESETS into $work/profiles (one
# process; the full grid, or GPU_SUITE_TOKENS; crossovers refined).
calibrate() {
    local name=$1 cap=$2 models=$3
    shift 3
    step "$name" "$cap" "$python" calibrate/calibrate_presets.py --presets "$models" --device "$device" \
        --dtype "$dtype" --out "$work/profiles" --summary "$work/$name-summary.json" --seconds-per-point 0.2 \
        --full-grid ${tokens:+--tokens "$tokens"} "$@"
}

# device_model DTYPE CAP: the device model of DTYPE, timed by the tool (it prints "calibrated in N s").
device_model() {
    step "device-model-$1" "$2" "$python" -m autoexperts calibrate --device-model --device "$device" --dtype "$1" \
        --out "$work/profiles" --no-progress
}

# check_device_model DTYPE PROFILES: its held-out regrets per form (from its JSON), then its picks on the exact
# profiles of PROFILES/<gpu>/ (nothing timed; $work/profiles is the trusted profile folder, so nothing is refit).
check_device_model() {
    local model
    model=$(ls "$work"/profiles/*/device-model-"$1"-none.json 2>/dev/null | head -n 1)
    if [ -z "$model" ]; then
        echo "== device-model-check-$1: skipped (no $1 device model came out)"
        return 0
    fi
    step "device-model-held-out-$1" 30 "$python" -c "import json, sys
model = json.load(open(sys.argv[1]))
print(f\"{sys.argv[1]}: form {model['form']}, calibrated in {model['sweep']['wall_seconds']} s, matmul rate \"
      f\"{model['device']['matmul_flops_per_second'] / 1e12:.1f} TFLOP/s\")
for form in model['leave_one_shape_out']:
    print(f\"held out, {form['form']:<9}: median {form['median_regret']:.3f}, worst {form['worst_regret']:.3f}\")" "$model"
    AUTOEXPERTS_PROFILE_DIR=$work/profiles step "device-model-check-$1" 60 "$python" calibrate/device_model_check.py \
        --device-model "$model" --against-profiles "$2/$slug" --out "$work/device-model-check-$1.json"
}

# Transformers' experts backends beyond the default three (sonicmoe, deepgemm on SM90+; their kernels come from the
# Hub, which a machine without network cannot reach): one calibration with them where any is registered.
other_backends() {
    local others
    others=$("$python" -c "import transformers.integrations.moe
from autoexperts.layer import DEFAULT_BACKENDS, registered_backends
print(','.join(b for b in registered_backends() if b not in DEFAULT_BACKENDS and b != 'deepgemm_megamoe'))")
    if [ -z "$others" ]; then
        echo "== other-backends: skipped (only $("$python" -c "from autoexperts.layer import registered_backends
import transformers.integrations.moe; print(', '.join(registered_backends()))") registered here)"
        return 0
    fi
    step other-backends 90 "$python" -m autoexperts calibrate --model "$extra_model" --device "$device" \
        --dtype "$dtype" --backends "eager,batched_mm,grouped_mm,$others" --out "$work/profiles-other-backends" \
        --seconds-per-point 0.2 --no-progress --full-grid ${tokens:+--tokens "$tokens"} -v
}

tune() {
    step tune 90 "$python" calibrate/tune_in_place.py --model "$table_model" --device "$device" --dtype "$dtype" \
        --out "$work/tune"
}

serve() {  # continuous batching: auto tuned in place against every fixed backend and the default
    bench serve 90 "$1" --model "$table_model" --parts serve --rounds 3 --max-batch-tokens 2048 \
        --calibration-seconds-per-point 0.2
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    "$python" -c "import torch, transformers, sklearn
import transformers.integrations.moe
from autoexperts.layer import registered_backends
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'sklearn',
      sklearn.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print('experts backends:', ', '.join(registered_backends()))"
} >"$work/env.txt" 2>&1
cat "$work/env.txt"

slug=$("$python" -c "import torch
from autoexperts.device import device_name, device_slug
print(device_slug(device_name(torch.device('$device'))))")
stage=${GPU_SUITE_STAGE:-}
if [ -z "$stage" ]; then
    stage=new-gpu
    ls "$shipped/$slug"/*-none.json >/dev/null 2>&1 && stage=h200
fi
echo "== stage $stage on $slug (shipped profiles: $(ls "$shipped/$slug" 2>/dev/null | grep -c '\.json$'))"

step pytest-cuda 60 "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py
step matmul-probe 45 "$python" calibrate/matmul_probe_check.py --device "$device" --dtype "$dtype" \
    --out "$work/probe.json"
step per-call-cost 45 "$python" calibrate/per_call_cost.py --model "$table_model" --device "$device" --dtype "$dtype" \
    --out "$work/per-call-cost.md"

if [ "$stage" = new-gpu ]; then
    calibrate calibrate-presets 200 "${presets// /,}"
    device_model "$dtype" 200
    check_device_model "$dtype" "$work/profiles"
    bench table-forward 100 "$work/profiles" --model "$table_model" --parts forward --forward-rounds "$forward_rounds"
    for batch in 64 1 8; do
        bench "table-generate-b$batch" 70 "$work/profiles" --model "$table_model" --parts generate \
            --batch-size "$batch" --rounds "$generate_rounds"
    done
    bench table-sweep 75 "$work/profiles" --model "$table_model" --parts overhead,sweep
    other_backends
    tune
    serve "$work/profiles"
elif [ "$stage" = h200 ]; then
    if [ ! -d "$shipped/$slug" ]; then  # a dry run on a machine without shipped profiles: stand-ins for them
        calibrate shipped-stand-ins 100 "$table_model" --out "$work/shipped"
        calibrate shipped-stand-ins-compiled 100 "$table_model" --out "$work/shipped" --compile default
        shipped=$work/shipped
    fi
    device_model "$dtype" 200
    check_device_model "$dtype" "$shipped"
    bench table-forward 100 "$shipped" --model "$table_model" --parts forward --forward-rounds "$forward_rounds"
    device_model float16 200
    check_device_model float16 "$shipped"
    bench table-forward-compile-default 120 "$shipped" --model "$table_model" --parts forward --compile default \
        --forward-rounds "$forward_rounds"
    calibrate crossovers 90 "${crossover_models// /,}"
    bench crossovers-sweep 90 "$work/profiles" --model "${crossover_models%% *}" --parts overhead,sweep
    calibrate calibrate-max-autotune 150 "$table_model" --compile max-autotune-no-cudagraphs
    other_backends
    tune
    serve "$shipped"
elif [ "$stage" = serve ]; then
    for model in ${GPU_SUITE_SERVE_MODELS:-qwen3-30b-a3b gpt-oss-20b}; do
        # shellcheck disable=SC2086  # the extra arguments are words
        step "serve-$model" 300 "$python" -m autoexperts bench --model "$model" --device "$device" --dtype "$dtype" \
            --out "$work/serve-$model" --parts serve --calibration-seconds-per-point 0.2 --no-progress \
            ${GPU_SUITE_SERVE_ARGS:---max-batch-tokens 2048 --rounds 5}
    done
else
    echo "unknown GPU_SUITE_STAGE=$stage: use new-gpu, h200 or serve"
fi

echo "suite finished in ${SECONDS}s"
pack
