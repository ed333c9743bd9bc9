#!/usr/bin/env bash
# The first run on an NVIDIA GPU, in one command (under 8 minutes on one GPU):
#   1. the CUDA tests (pytest -m cuda) and the Triton tests at small shapes, which run on the GPU when
#      one is present;
#   2. bench/run.py, forward+backward, bfloat16, Qwen2.5-7B's vocabulary (V = 152,064) at N = 4096 and
#      16384 tokens, providers eager, compiled, triton and triton-inplace.
# Everything goes to the folder given as the argument: pytest.txt, nvidia-smi.txt, and the benchmark's
# results.csv, results.md (the table, with device, date and command), time.png and memory.png.
# Without a GPU that torch can use, it stops at once and says why. Exit status: 0 when the tests
# passed and the benchmark ran; otherwise that of the first step that failed.
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: bash bench/gpu_check.sh OUT_FOLDER" >&2
  exit 2
fi
out=$1
cd "$(dirname "$0")/.."

if ! python - <<'PY'
import sys
try:
    import torch
except ImportError as error:
    sys.exit(f"bench/gpu_check.sh needs torch ({error}); install it and the package first. Nothing was run.")
if torch.cuda.is_available():
    sys.exit(0)
if torch.version.cuda is None:
    why = f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch (it brings Triton)"
else:
    why = f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device (driver, CUDA_VISIBLE_DEVICES?)"
print(f"bench/gpu_check.sh needs an NVIDIA GPU: {why}. Nothing was run.", file=sys.stderr)
sys.exit(1)
PY
then
  exit 3
fi

mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true

status=0
echo "== 1/2 tests on the GPU (log: $out/pytest.txt)"
{ python -m pytest -q -rs -m cuda && python -m pytest -q -rs tests/test_triton.py -m "not cuda"; } \
  2>&1 | tee "$out/pytest.txt" || status=$?

echo "== 2/2 benchmark (results in $out)"
python bench/run.py --device cuda --models Qwen2.5-7B --tokens 4096 16384 --dtype bfloat16 \
  --mode forward+backward --providers eager compiled triton triton-inplace --timeout 180 --no-progress \
  --out "$out" || { [ "$status" -ne 0 ] || status=$?; }
exit "$status"
