#!/usr/bin/env bash
# Run THERE, on the GPU machine, in the repository root: every GPU measurement of issue 14 in one call.
#
# Before (here, with the registry): bash benchmarks/gpu_prepare.sh     -> .gpu/ (wheels + MNIST)
# Then one device call:  carry [".gpu"], timeout_s 600, command
#     bash benchmarks/gpu_session.sh all
# or one stage at a time (each installs what it needs first):
#     bash benchmarks/gpu_session.sh checks|speed|speed-fast|reference|iw|profile|tests
#     (profile = profile-plain, profile-fast and phases, each also a stage of its own)
#
# Results go to $OUT (at most 8 files come back): results.md (every table, with device, torch
# and command), session.log (all output), stderr.log (progress bars and warnings),
# metrics-gpu_fast.csv, trace-plain.json.gz, trace-fast.json.gz.
# `all` runs the stages in order of importance and stops starting new ones when fewer
# than a stage's minimum seconds remain of SESSION_BUDGET_S (default 560, under the tool's 600).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for results (the device tool sets it)}"
BUDGET="${SESSION_BUDGET_S:-560}"
DEVICE="${GPU_SESSION_DEVICE:-cuda}"  # cpu: try the script's mechanics on a machine without a GPU
START=$SECONDS
RESULTS="$OUT/results.md"
FAST=(train.amp=true train.compile=true train.channels_last=true optim.fused=true)
exec > >(tee -a "$OUT/session.log") 2>>"$OUT/stderr.log"

setup() {
    [[ -d .gpu/wheels ]] || { echo "no .gpu/wheels: run benchmarks/gpu_prepare.sh here first and carry .gpu" >&2; exit 2; }
    if ! python3 -c "import hydra, omegaconf, pythae" 2>/dev/null; then  # the GPU image has none of them
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .gpu/wheels/*.whl || exit 2
    fi
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 VAE_LAB_DATA=/tmp/data
    mkdir -p /tmp/data/MNIST/raw
    for f in .gpu/data/MNIST/raw/*.gz; do gunzip -c "$f" > "/tmp/data/MNIST/raw/$(basename "$f" .gz)"; done
    {
        echo "# GPU session $(date -u +%FT%TZ)"; echo
        echo '```'
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
        python3 -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| cudnn', torch.backends.cudnn.version(), '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
        python3 -c "import pythae, importlib.metadata as m; print('pythae', m.version('pythae'))"
        echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | grep -qv '^??' && echo '(with local changes)')"
        echo '```'
    } >> "$RESULTS"
}

# stage NAME MIN_SECONDS MAX_SECONDS COMMAND...: run under a time limit, append its output to results.md.
stage() {
    local name="$1" least="$2" most="$3"; shift 3
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < least)); then
        printf '\n## %s\n\nNot run: %ss left of the session budget; run `bash benchmarks/gpu_session.sh %s` in its own call.\n' \
            "$name" "$left" "$name" >> "$RESULTS"
        return
    fi
    local limit=$((left < most ? left : most)) began=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    printf '\n## %s\n\n`%s`\n\n' "$name" "$*" >> "$RESULTS"
    timeout --kill-after=10 "$limit" "$@" > "/tmp/stage.out"
    local status=$?
    cat /tmp/stage.out
    cat /tmp/stage.out >> "$RESULTS"
    printf '\n(exit status %s, %ss wall)\n' "$status" "$((SECONDS - began))" >> "$RESULTS"
}

checks()     { stage checks 60 200 python3 benchmarks/cuda_checks.py --data-root /tmp/data; }
speed()      { stage speed 60 200 python3 benchmarks/speed.py --data-root /tmp/data --device $DEVICE --repeats 5; }
speed_fast() { stage speed-fast 60 200 python3 benchmarks/speed.py --data-root /tmp/data --device $DEVICE --repeats 5 "${FAST[@]}"; }
iw()         { stage iw 30 150 python3 benchmarks/speed.py --data-root /tmp/data --device $DEVICE --iw-only 5000 --iw-images 10000; }
reference() {
    # The full reference run on the GPU recipe: 90 epochs with their test passes, no final evaluation.
    stage reference 60 240 python3 benchmarks/reference_timing.py --run-dir /tmp/reference \
        experiment=gpu_fast train.evaluate_at_end=false data.root=/tmp/data data.download=false
    cp /tmp/reference/metrics.csv "$OUT/metrics-gpu_fast.csv" 2>/dev/null
}
profile_plain() {
    stage profile-plain 30 90 python3 benchmarks/speed.py --data-root /tmp/data --device $DEVICE --torch-profile /tmp/trace-plain.json
    [[ -f /tmp/trace-plain.json ]] && gzip -c /tmp/trace-plain.json > "$OUT/trace-plain.json.gz"
}
profile_fast() {
    stage profile-fast 30 120 python3 benchmarks/speed.py --data-root /tmp/data --device $DEVICE --torch-profile /tmp/trace-fast.json "${FAST[@]}"
    [[ -f /tmp/trace-fast.json ]] && gzip -c /tmp/trace-fast.json > "$OUT/trace-fast.json.gz"
}
phases() { stage phases 20 60 python3 benchmarks/speed.py --data-root /tmp/data --device $DEVICE --profile; }
profile() { profile_plain; profile_fast; phases; }
tests() {
    # The suite's fast tier. Its tests run on the device conftest.py gives them (TINY's device=cpu),
    # unless conftest honours VAE_LAB_TEST_DEVICE.
    grep -q VAE_LAB_TEST_DEVICE tests/conftest.py || echo "note: tests/conftest.py ignores VAE_LAB_TEST_DEVICE: these tests ran on the CPU" >> "$RESULTS"
    VAE_LAB_TEST_DEVICE=cuda stage tests 60 400 python3 -m pytest -q -x -m "not slow" -p no:cacheprovider
}

what="${1:-all}"
case "$what" in
    all | checks | speed | speed-fast | reference | iw | profile | profile-plain | profile-fast | phases | tests) ;;
    *) echo "unknown stage $what; one of: all checks speed speed-fast reference iw profile" \
            "(profile-plain profile-fast phases) tests" >&2; exit 2 ;;
esac
setup
case "$what" in
    all) checks; speed; reference; iw; speed_fast; profile ;;
    checks) checks ;; speed) speed ;; speed-fast) speed_fast ;; reference) reference ;; iw) iw ;;
    profile) profile ;; profile-plain) profile_plain ;; profile-fast) profile_fast ;; phases) phases ;;
    tests) tests ;;
esac
echo "results: $RESULTS ($((SECONDS - START)) s)"
