#!/usr/bin/env bash
# The GPU path checked in one command, at most 5 minutes on one GPU: the GPU tests (pytest -m gpu, tests/test_gpu.py),
# then the GPU benchmark (scripts/benchmark.py --preset gpu: DeiT-S and DeiT-B distilled from RegNetY-16GF at the
# official per-GPU batches, bf16-mixed): images/s of deit-train, the bare PyTorch loop and the official DeiT step,
# the teacher's share, with and without teacher.cache and compile=true, and peak memory.
#
#   bash scripts/gpu_check.sh [OUT]    (OUT defaults to outputs/gpu_check; run it in the project's environment)
#
# Writes OUT/gpu_check.json (the benchmark and the tests' counts), OUT/gpu_check.md (the table for docs/performance.md)
# and OUT/pytest.txt. Without CUDA it is a dry run: the GPU tests skip, each with its reason, and the benchmark runs
# the same rows at tiny sizes on the CPU (--preset dry), so that this script is itself tested (tests/test_benchmark.py).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
out="${1:-outputs/gpu_check}"
mkdir -p "$out"
start=$SECONDS

if "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    preset=gpu
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
else
    preset=dry
    echo "gpu_check: no CUDA device here: a dry run (GPU tests skipped with their reason, the benchmark at tiny sizes)"
fi

# The GPU tests live in tests/test_gpu.py: collecting only it keeps the dry run short.
"$PYTHON" -m pytest -m gpu -rs -q --junitxml="$out/pytest.xml" tests/test_gpu.py 2>&1 | tee "$out/pytest.txt"
tests=${PIPESTATUS[0]}
echo "gpu_check: pytest -m gpu exit status $tests after $((SECONDS - start)) s"

"$PYTHON" scripts/benchmark.py --preset "$preset" --gpu-tests "$out/pytest.xml" \
    --json "$out/gpu_check.json" --markdown "$out/gpu_check.md"
bench=$?

echo "gpu_check: $((SECONDS - start)) s in all; pytest exit $tests, benchmark exit $bench; wrote $out/gpu_check.json" \
     "and $out/gpu_check.md"
if [ "$tests" -ne 0 ]; then exit "$tests"; fi
exit "$bench"
