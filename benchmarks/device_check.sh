#!/usr/bin/env bash
# The prepared device check (issue #16): CUDA parity tests, then the GPU throughput benchmark (GPT-2 124M
# shape, block 1024, bf16, compiled, fused AdamW, SDPA flash attention). Run from the repository root on a
# machine with one CUDA GPU (written for an H200) and a Python that has torch 2.13 with CUDA and lmforge's
# dependencies:   PYTHON=/path/to/python bash benchmarks/device_check.sh
# Output goes to ${OUT:-/tmp/lmforge-device-check}: pytest's log and the benchmark's table and RESULT line.
set -uo pipefail
PY="${PYTHON:-python}"
OUTDIR="${OUT:-/tmp/lmforge-device-check}"
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export LMFORGE_CACHE_DIR="$OUTDIR/cache"   # compiled artefacts and the compile ledger stay with the check
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 2
status=0
timeout 300 "$PY" -m pytest -q -x tests/train/test_train_cuda.py 2>&1 | tee "$OUTDIR/pytest.log" || status=1
timeout 240 "$PY" benchmarks/gpu_throughput.py --batch 16 --steps 30 2>&1 | tee "$OUTDIR/gpu_throughput.log" || status=1
exit $status
