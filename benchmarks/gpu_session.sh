#!/usr/bin/env bash
# Every prepared GPU check in one call of at most ~9.5 minutes (one H100/H200: Python 3.12, torch, transformers,
# no Composer, DeepSpeed or streaming; no network). From the repository root:
#     OUT=/some/dir bash benchmarks/gpu_session.sh
# 1. gpu_check, reference 369M decoder (24 x 1024, seq 1024, bf16): ProRes off / hook / in-GEMM, eager then
#    compiled; $OUT/ref/gpu_check.json
# 2. gpu_check, transformers' GPT-2 of the same size (Conv1D branches ending in a dropout), eager;
#    $OUT/gpt2/gpu_check.json
# 3. gpu_quality: paired ProRes vs baseline on a 12 x 512 decoder, W / L 100 and 250, 3 seeds, every run a
#    process on the one GPU; $OUT/gpu_quality.json
# Each step has its own time limit, so a slow step cannot take the others' time; logs go to $OUT/*.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:?set OUT to a folder for the results}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT/ref" "$OUT/gpt2"

nvidia-smi -L || true
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# MPS lets the gpu_quality processes share the GPU instead of time-slicing it; without it they still run
if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d 2>/dev/null; then
  echo "MPS daemon started"
  MPS=1
fi

OUT="$OUT/ref" timeout "${REF_S:-200}" $PY -m benchmarks.gpu_check --skip_deepspeed --time_budget 80 \
  >"$OUT/ref.log" 2>&1
echo "== reference (rc $?)"; grep -E 'ratio|graph|MFU|status|Error' "$OUT/ref.log" | tail -20

OUT="$OUT/gpt2" timeout "${GPT2_S:-110}" $PY -m benchmarks.gpu_check --arch gpt2 --vocab 50257 --compile none \
  --skip_deepspeed >"$OUT/gpt2.log" 2>&1
echo "== gpt2 (rc $?)"; grep -E 'ratio|MFU|status|Error|mechanism' "$OUT/gpt2.log" | tail -12

timeout "${QUALITY_S:-270}" $PY -m benchmarks.gpu_quality --budget_s "${QUALITY_BUDGET_S:-240}" \
  --out "$OUT/gpu_quality.json" >"$OUT/quality.log" 2>&1
echo "== gpu_quality (rc $?)"; tail -14 "$OUT/quality.log"

if [ -n "${MPS:-}" ]; then echo quit | nvidia-cuda-mps-control; fi
