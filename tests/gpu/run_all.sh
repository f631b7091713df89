#!/usr/bin/env bash
# Builds the test library, then runs the stages named on the command line, from the repository
# root, on a machine with a CUDA GPU and nvcc, python3 with torch, numpy, pytest:
#   tests/gpu/run_all.sh [tests] [sanitize] [bench] [bench-quick]
# LOG (default: .) receives the logs and the benchmark JSON. UPG_CUDA_LIB: a prebuilt library.
set -uo pipefail
cd "$(dirname "$0")/../.."
LOG=${LOG:-.}
mkdir -p "$LOG"
if [ -z "${UPG_CUDA_LIB:-}" ] || ! python3 -c "import ctypes, sys; ctypes.CDLL(sys.argv[1])" "$UPG_CUDA_LIB"; then
  export UPG_CUDA_LIB=$PWD/build-cuda-test/libupg_cuda_test.so
  mkdir -p build-cuda-test
  arch=$(python3 -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")')
  nvcc -std=c++17 -O3 -arch=sm_$arch -shared -Xcompiler -fPIC -Icpp/cuda -Icpp $(ls cpp/cuda/*.cu | grep -v backend.cu) tests/gpu/capi.cu \
    -o "$UPG_CUDA_LIB" || exit 1
fi
export UPG_GPU_TESTS=1 PYTHONUNBUFFERED=1
status=0
for stage in "$@"; do
  case $stage in
    tests)
      python3 -P -m pytest -q -rA -p no:cacheprovider tests/gpu 2>&1 | tee "$LOG/tests.log" || status=1 ;;
    sanitize)
      # No caching allocator: every tensor is its own cudaMalloc, so memcheck sees each bound.
      for tool in memcheck racecheck; do
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 UPG_GPU_SMALL=1 compute-sanitizer --tool $tool --error-exitcode 3 \
          --print-limit 20 python3 -P -m pytest -q -p no:cacheprovider -x tests/gpu \
          2>&1 | tee "$LOG/sanitize_$tool.log" | tail -5 || status=1
      done ;;
    bench) python3 benchmarks/cuda_ops.py --json "$LOG/bench.json" 2>&1 | tee "$LOG/bench.log" || status=1 ;;
    bench-quick) python3 benchmarks/cuda_ops.py --quick --json "$LOG/bench.json" 2>&1 | tee "$LOG/bench.log" || status=1 ;;
  esac
done
exit $status
