#!/usr/bin/env bash
# The GPU path checked in one command, at most 5 minutes on one GPU, in four sections, each under its own time limit
# (a section past its limit fails the check, saying so; on a GPU the limits add up to 300 s):
#   preflight  20 s   the GPUs nvidia-smi lists against those torch sees: GPUs torch cannot see end the check in one
#                     line (the driver's and the torch wheel's CUDA versions), never a quiet dry run
#   tests     110 s   pytest -m gpu (tests/test_gpu.py): each CUDA path against the CPU, bf16 and compile checked
#   benchmark  90 s   scripts/benchmark.py --preset gpu --students deit_small: deit-train against the bare loop and
#                     the official step, eval, the cache, compile (DeiT-S distilled from RegNetY-16GF at batch 256,
#                     bf16-mixed); the CPU's pipeline row is left to scripts/benchmark_data.py
#   real run   80 s   the real_run row: deit-train itself on JPEGs from disk (uint8 path, DDP on 2+ GPUs), 2 epochs:
#                     images/s per GPU, loader wait and host syncs per step, validation and checkpoint seconds per
#                     epoch, peak memory, dynamo graphs and recompiles
# GPU_CHECK_{PREFLIGHT,TESTS,BENCH,RUN}_S change a limit; a dry run allows 300 s a section (a slow CPU).
#
#   bash scripts/gpu_check.sh [OUT]    (OUT defaults to outputs/gpu_check; run it in the project's environment)
#
# Writes OUT/gpu_check.json and OUT/real_run.json (the figures), OUT/gpu_check.md (the tables for
# docs/performance.md) and OUT/pytest.txt. Without a GPU (no nvidia-smi, or CUDA_VISIBLE_DEVICES set empty) it is a
# dry run: the GPU tests skip, each with its reason, and the benchmark runs the same rows at tiny sizes on the CPU
# (--preset dry), so that this script is itself tested (tests/test_benchmark.py).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
out="${1:-outputs/gpu_check}"
mkdir -p "$out"
start=$SECONDS
PREFLIGHT_S=${GPU_CHECK_PREFLIGHT_S:-20}

fail() {  # one line, on stderr, and exit status 2 (refused before any work)
    echo "gpu_check: error: $*" >&2
    exit 2
}

# ---- preflight: what the driver lists against what torch sees ----
listed=""
if command -v nvidia-smi >/dev/null 2>&1; then
    listed=$(timeout "$PREFLIGHT_S" nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)
    [ $? -eq 124 ] && fail "nvidia-smi did not answer within ${PREFLIGHT_S} s: the driver is not healthy (run nvidia-smi)"
    driver_cuda=$(timeout "$PREFLIGHT_S" nvidia-smi 2>/dev/null | grep -o 'CUDA Version: *[0-9.]*' | grep -o '[0-9.]*$' | head -n 1)
fi
seen=$(timeout "$PREFLIGHT_S" "$PYTHON" -c 'import torch; print(torch.cuda.device_count(), torch.version.cuda, torch.__version__)' 2>&1 | tail -n 1)
read -r torch_gpus wheel_cuda torch_version <<<"$seen"
[[ "$torch_gpus" =~ ^[0-9]+$ ]] || fail "torch did not import within ${PREFLIGHT_S} s with $PYTHON: ${seen:-no output}"
listed_count=$(printf '%s' "$listed" | grep -c . || true)
hidden=$([[ -v CUDA_VISIBLE_DEVICES && -z "$CUDA_VISIBLE_DEVICES" ]] && echo yes || echo no)
if [ "$listed_count" -gt 0 ] && [ "$torch_gpus" -eq 0 ] && [ "$hidden" = no ]; then
    first=$(printf '%s' "$listed" | head -n 1)
    fail "nvidia-smi lists $listed_count GPU(s) ($first; driver CUDA ${driver_cuda:-unknown}) but torch $torch_version (built for CUDA $wheel_cuda) sees none: install a torch wheel built for CUDA ${driver_cuda:-of the driver} or older, or update the driver (CUDA_VISIBLE_DEVICES= bash $0 for a deliberate dry run)"
fi
if [ "$torch_gpus" -gt 0 ]; then
    preset=gpu
    echo "gpu_check: $torch_gpus GPU(s): $(printf '%s' "$listed" | head -n 1); torch $torch_version, CUDA $wheel_cuda (driver ${driver_cuda:-?})"
else
    preset=dry
    echo "gpu_check: no CUDA device here: a dry run (GPU tests skipped with their reason, the benchmark at tiny sizes)"
fi
dry_limit=$([ "$preset" = dry ] && echo 300 || echo 0)
TESTS_S=${GPU_CHECK_TESTS_S:-$((dry_limit > 0 ? dry_limit : 110))}
BENCH_S=${GPU_CHECK_BENCH_S:-$((dry_limit > 0 ? dry_limit : 90))}
RUN_S=${GPU_CHECK_RUN_S:-$((dry_limit > 0 ? dry_limit : 80))}

# ---- the sections, each under its limit (timeout's 124: past it) ----
section() {  # name, limit, command...: runs it, prints its status and seconds, returns its status
    local name=$1 limit=$2 begin=$SECONDS status
    shift 2
    timeout -k 10 "$limit" "$@"
    status=$?
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        echo "gpu_check: $name ran past its ${limit} s limit" >&2
    fi
    echo "gpu_check: $name exit status $status after $((SECONDS - begin)) s (limit $limit s)"
    return "$status"
}

# The GPU tests live in tests/test_gpu.py: collecting only it keeps the dry run short.
section tests "$TESTS_S" "$PYTHON" -m pytest -m gpu -rs -q --junitxml="$out/pytest.xml" tests/test_gpu.py \
    > >(tee "$out/pytest.txt") 2>&1
tests=$?

section benchmark "$BENCH_S" "$PYTHON" scripts/benchmark.py --preset "$preset" --students deit_small \
    --skip pipeline real_run --gpu-tests "$out/pytest.xml" --json "$out/gpu_check.json" --markdown "$out/benchmark.md"
bench=$?

section "real run" "$RUN_S" "$PYTHON" scripts/benchmark.py --preset "$preset" --rows real_run \
    --json "$out/real_run.json" --markdown "$out/real_run.md"
run=$?

cat "$out/benchmark.md" "$out/real_run.md" >"$out/gpu_check.md" 2>/dev/null
echo "gpu_check: $((SECONDS - start)) s in all; tests exit $tests, benchmark exit $bench, real run exit $run;" \
     "wrote $out/gpu_check.json, $out/real_run.json and $out/gpu_check.md"
for status in "$tests" "$bench" "$run"; do
    if [ "$status" -ne 0 ]; then exit "$status"; fi
done
