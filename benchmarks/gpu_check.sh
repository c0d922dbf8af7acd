#!/usr/bin/env bash
# ProRes GPU check for the occasional GPU machine (one H100/H200; Python 3.12, torch, no Composer,
# DeepSpeed or streaming; no network). Run from anywhere; it cds to the repo root:
#     OUT=/some/dir bash benchmarks/gpu_check.sh [gpu_check.py options]
# Prints the machine and versions, then runs benchmarks/gpu_check.py (well under 8 minutes by default)
# and leaves $OUT/gpu_check.json. Optional: PRORES_WHEELS=<folder of carried .whl files> installs them
# offline (--no-index --no-deps) into a temporary folder first, e.g. to try the DeepSpeed part.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

echo "== nvidia-smi"
nvidia-smi || echo "(nvidia-smi not available)"

if [ -n "${PRORES_WHEELS:-}" ] && ls "$PRORES_WHEELS"/*.whl >/dev/null 2>&1; then
  target=$(mktemp -d)
  echo "== installing carried wheels from $PRORES_WHEELS (offline) into $target"
  if $PY -m pip install --quiet --no-index --no-deps --target "$target" "$PRORES_WHEELS"/*.whl; then
    export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "(wheel install failed; continuing without them)"
  fi
fi

echo "== versions"
$PY - <<'PYEOF'
import importlib.util, platform, sys
import torch
print('python', platform.python_version(), sys.executable)
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(),
      'devices', torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')
for name in ('transformers', 'composer', 'deepspeed', 'streaming', 'triton'):
    spec = importlib.util.find_spec(name)
    if spec is None:
        print(name, 'not installed')
        continue
    try:
        from importlib.metadata import version
        dist = {'composer': 'mosaicml', 'streaming': 'mosaicml-streaming'}.get(name, name)
        print(name, version(dist))
    except Exception as e:
        print(name, 'present (version unknown:', e, ')')
PYEOF

echo "== gpu_check.py $*"
# run as a module from the repository root: prores_algo and benchmarks import from the source tree (no install)
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout "${GPU_CHECK_TIMEOUT:-470}" $PY -m benchmarks.gpu_check "$@"
rc=$?
if [ -n "${OUT:-}" ] && [ -f "$OUT/gpu_check.json" ]; then echo "results written to $OUT/gpu_check.json"; fi
exit $rc
