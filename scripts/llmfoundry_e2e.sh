#!/usr/bin/env bash
# End-to-end check of prores_algo inside llm-foundry 0.22's own environment, on CPU, offline after the
# pip install. Not run in CI (it builds a separate virtualenv: foundry pins mosaicml-streaming < 0.13 and
# transformers < 4.52, which our own pins exclude).
#
#   bash scripts/llmfoundry_e2e.sh            # venv in /tmp/foundry-venv, work files in /tmp/foundry-e2e
#
# Stages (each prints PASS/FAIL in the summary at the end; the exit status is 0 only if all pass):
#   venv       python -m venv + pip install llm-foundry==0.22.0 (skipped if that venv already has it)
#   install    pip install --no-deps <this repo>  (docs/llm-foundry.md), then foundry's own algorithm
#              registry must resolve `prores` through our `llmfoundry_algorithms` entry point
#   tokenizer  a 512-token byte-level BPE trained with `tokenizers` on local text, saved as a HF folder
#   data       `llmfoundry data_prep convert_text_to_mds` on Python standard-library sources (train, val)
#   train-1p   `llmfoundry train yamls/llmfoundry/mpt-tiny-cpu-prores.yaml`: 4-layer MPT, d_model 64,
#              seq 128, 40 batches; ProRes W = 20 batches, so it ends (and removes its hooks) mid-run
#   train-2p-midrun     the same under `composer -n 2` (DDP over gloo), ProRes ending mid-run
#   train-2p-fullwarmup only if train-2p-midrun failed: DDP with W = the whole run (ProRes never removed)
# A training stage passes when the run exits 0, every layer's α is logged for every batch and equals
# the `linear` schedule's value at that step (0 at the first batch, 1 from W on), and the mean training
# loss of the last 5 batches is at least 0.5 nats below that of the first 5.
#
# Environment: FOUNDRY_VENV (/tmp/foundry-venv), FOUNDRY_WORK (/tmp/foundry-e2e), PYTHON (python3),
# PRORES_SRC (this repo: what gets installed with --no-deps), CLEAN=1 (delete venv and work dir at the end).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${FOUNDRY_VENV:-/tmp/foundry-venv}
WORK=${FOUNDRY_WORK:-/tmp/foundry-e2e}
PY=${PYTHON:-python3}
SRC=${PRORES_SRC:-$REPO}
YAML=$REPO/yamls/llmfoundry/mpt-tiny-cpu-prores.yaml
LOGS=$WORK/logs
mkdir -p "$LOGS"

# offline from here on (the pip install is the only network access), quiet, one thread per process
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export WANDB_MODE=disabled OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore::DeprecationWarning

STAGES=() ; declare -A RESULT ; declare -A SECS
record() { STAGES+=("$1"); RESULT[$1]=$2; SECS[$1]=$3; echo ">>> stage $1: $2 (${3}s)"; }
now() { date +%s; }

# ---------------------------------------------------------------------------------------------- venv
t0=$(now)
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import importlib.metadata as m; assert m.version("llm-foundry") == "0.22.0"' 2>/dev/null; then
    echo ">>> $VENV already has llm-foundry 0.22.0"
    record venv PASS $(( $(now) - t0 ))
else
    echo ">>> creating $VENV and installing llm-foundry==0.22.0 (several GB: torch and its CUDA wheels)"
    if "$PY" -m venv "$VENV" && "$VENV/bin/pip" install --progress-bar off llm-foundry==0.22.0 > "$LOGS/pip-foundry.log" 2>&1; then
        record venv PASS $(( $(now) - t0 ))
    else
        tail -20 "$LOGS/pip-foundry.log"; record venv FAIL $(( $(now) - t0 ))
    fi
fi
FPY=$VENV/bin/python
export PATH="$VENV/bin:$PATH"

# ------------------------------------------------------------------------------------------- install
t0=$(now)
had_build=0; [ -e "$SRC/build" ] && had_build=1
echo ">>> pip install --no-deps $SRC"
if "$VENV/bin/pip" install --no-deps --force-reinstall "$SRC" > "$LOGS/pip-prores.log" 2>&1 \
   && (cd "$WORK" && "$FPY" - <<'EOF'
from importlib.metadata import version
from llmfoundry import registry
from llmfoundry.utils.builders import build_algorithm
cls = registry.algorithms.get('prores')
algo = build_algorithm('prores', {'schedule': 'linear', 't_warmup': '0.5dur'})
print(f'foundry registry: prores -> {cls.__module__}.{cls.__qualname__}; built {algo!r}')
import composer, streaming, torch, transformers
print('versions: llm-foundry', version('llm-foundry'), '| prores_algo', version('prores_algo'), '| composer',
      composer.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__,
      '| mosaicml-streaming', streaming.__version__, '| tokenizers', version('tokenizers'))
EOF
   ) 2>&1 | tee "$LOGS/install-check.log"; [ "${PIPESTATUS[0]}" -eq 0 ] && grep -q '^foundry registry: prores' "$LOGS/install-check.log"; then
    record install PASS $(( $(now) - t0 ))
else
    tail -20 "$LOGS/pip-prores.log"; record install FAIL $(( $(now) - t0 ))
fi
[ $had_build -eq 0 ] && rm -rf "$SRC/build"   # pip builds the wheel in the source tree

# ----------------------------------------------------------------------------------------- tokenizer
# Text: the standard library's top-level .py files (on every machine), saved as .txt (what
# convert_text_to_mds reads); one file in ten goes to val.
t0=$(now)
rm -rf "$WORK/text" "$WORK/tokenizer" "$WORK/mds"
if "$FPY" - "$WORK" <<'EOF' 2>&1 | tee "$LOGS/tokenizer.log"; [ "${PIPESTATUS[0]}" -eq 0 ]; then
import os, sys, sysconfig, zlib
from pathlib import Path
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

work = Path(sys.argv[1])
budget = {'train': 1_500_000, 'val': 150_000}   # bytes of text per split
used = {'train': 0, 'val': 0}
for split in budget:
    (work / 'text' / split).mkdir(parents=True, exist_ok=True)
for src in sorted(Path(sysconfig.get_paths()['stdlib']).glob('*.py')):
    text = src.read_text(encoding='utf-8', errors='ignore')
    split = 'val' if zlib.crc32(src.name.encode()) % 10 == 0 else 'train'
    if used[split] >= budget[split] or not text.strip():
        continue
    (work / 'text' / split / (src.stem + '.txt')).write_text(text, encoding='utf-8')
    used[split] += len(text.encode())
print(f'text: {used["train"]} bytes train, {used["val"]} bytes val, from {sysconfig.get_paths()["stdlib"]}')

eos = '<|endoftext|>'
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=[eos], show_progress=False,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train([str(p) for p in sorted((work / 'text' / 'train').glob('*.txt'))], trainer)
hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, unk_token=eos, pad_token=eos)
hf.save_pretrained(work / 'tokenizer')
back = AutoTokenizer.from_pretrained(work / 'tokenizer')
sample = 'def f(x):\n    return x + 1\n'
ids = back(sample)['input_ids']
assert back.decode(ids) == sample and len(back) <= 512, (len(back), back.decode(ids))
print(f'tokenizer: {type(back).__name__}, {len(back)} tokens, eos {back.eos_token!r}; '
      f'{len(sample.encode())} bytes -> {len(ids)} tokens')
EOF
    record tokenizer PASS $(( $(now) - t0 ))
else
    record tokenizer FAIL $(( $(now) - t0 ))
fi

# ---------------------------------------------------------------------------------------------- data
t0=$(now)
ok=1
for split in train val; do
    echo ">>> llmfoundry data_prep convert_text_to_mds ($split)"
    llmfoundry data_prep convert_text_to_mds --input-folder "$WORK/text/$split" \
        --output-folder "$WORK/mds/$split" --tokenizer "$WORK/tokenizer" --concat-tokens 128 \
        --use-tokenizer-eos --processes 1 > "$LOGS/data-$split.log" 2>&1 || { ok=0; tail -20 "$LOGS/data-$split.log"; }
done
if [ $ok -eq 1 ] && "$FPY" - "$WORK/mds" <<'EOF' 2>&1 | tee "$LOGS/data-check.log"; [ "${PIPESTATUS[0]}" -eq 0 ]; then
import json, sys
from pathlib import Path
for split in ('train', 'val'):
    index = json.loads((Path(sys.argv[1]) / split / 'index.json').read_text())
    n = sum(s['samples'] for s in index['shards'])
    print(f'mds {split}: {n} samples of 128 tokens in {len(index["shards"])} shard(s)')
    assert n > 0
EOF
    record data PASS $(( $(now) - t0 ))
else
    record data FAIL $(( $(now) - t0 ))
fi

# ---------------------------------------------------------------------------------------- checks
cat > "$WORK/check_log.py" <<'EOF'
"""Parse Composer's console log (rank 0) of a foundry run: α per batch and the training loss."""
import re, sys
log, max_batches, n_layers, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rows, cur = {}, None
for line in open(log, errors='replace'):
    m = re.match(r'\[batch=(\d+)/(\d+)\]:', line)
    if m:
        cur = rows.setdefault(int(m.group(1)), {})
        continue
    m = re.match(r'\s+Train (\S+): (\S+)', line)
    if m and cur is not None:
        try:
            cur[m.group(1)] = float(m.group(2))
        except ValueError:
            pass
    elif not line.startswith((' ', '\t')):
        cur = None
keys = [f'prores/alpha/layer_{i}' for i in range(n_layers)]
fails = []
batches = [b for b in sorted(rows) if 'prores/alpha/mean' in rows[b]]
if batches != list(range(1, max_batches + 1)):
    fails.append(f'alpha logged for batches {batches[:3]}..{batches[-3:]} (want 1..{max_batches})')
losses = [rows[b].get('loss/train/total') for b in sorted(rows)]
losses = [x for x in losses if x is not None]
# batch b (1-based in the log) ran its forward at step t = b - 1
for b in batches:
    t, r = b - 1, rows[b]
    want = [min(1.0, t / (warmup * (i + 1) / n_layers)) for i in range(n_layers)]   # linear schedule
    got = [r.get(k, float('nan')) for k in keys]
    if any(not abs(g - w) < 1e-3 for g, w in zip(got, want)):
        fails.append(f'batch {b}: alpha {got} != linear schedule {want}')
        break
if len(losses) < 10:
    fails.append(f'only {len(losses)} loss values logged')
else:
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f'loss: first 5 batches {first:.3f}, last 5 {last:.3f}')
    if not last < first - 0.5:
        fails.append(f'loss did not fall (first 5 {first:.3f}, last 5 {last:.3f})')
show = sorted({1, 2, 3, max(1, warmup // 4), max(1, warmup // 2), warmup, warmup + 1, warmup + 2, max_batches}
              & set(batches))
for b in show:
    r = rows[b]
    a = ' '.join(f'{r[k]:.3f}' for k in keys)
    print(f'  batch {b:3d} (t={b - 1:3d}): alpha [{a}] mean {r["prores/alpha/mean"]:.3f}  '
          f'loss {r.get("loss/train/total", float("nan")):.3f}')
evals, after = {}, 0   # eval cross-entropy, keyed by the training batch it followed
for line in open(log, errors='replace'):
    m = re.match(r'\[batch=(\d+)/', line)
    if m:
        after = int(m.group(1))
    m = re.match(r'\s+Eval metrics/eval/LanguageCrossEntropy: (\S+)', line)
    if m:
        evals.setdefault(after, m.group(1))
for b, ce in evals.items():
    print(f'  eval after batch {b}: LanguageCrossEntropy {ce}')
print('CHECK', 'FAIL: ' + '; '.join(fails) if fails else 'PASS')
sys.exit(1 if fails else 0)
EOF

MAXB=40; LAYERS=4
COMMON=(variables.data_local="$WORK/mds" variables.tokenizer="$WORK/tokenizer")

train_stage() {   # name nproc t_warmup_batches
    local name=$1 nproc=$2 w=$3 log=$LOGS/$1.log t0 rc
    t0=$(now)
    local cmd
    if [ "$nproc" -eq 1 ]; then
        cmd=(llmfoundry train "$YAML" "${COMMON[@]}" algorithms.prores.t_warmup="${w}ba")
    else
        cmd=(composer -n "$nproc" --stdout "$LOGS/$name.rank{rank}.stdout.txt" --stderr "$LOGS/$name.rank{rank}.stderr.txt"
             -m llmfoundry.cli.cli train "$YAML" "${COMMON[@]}" algorithms.prores.t_warmup="${w}ba")
    fi
    echo ">>> [$name] (cd $WORK && ${cmd[*]})"
    (cd "$WORK" && "${cmd[@]}") > "$log" 2>&1
    rc=$?
    echo ">>> [$name] exit status $rc after $(( $(now) - t0 ))s; log: $log"
    "$FPY" "$WORK/check_log.py" "$log" $MAXB $LAYERS "$w" > "$LOGS/$name.check.txt"
    local chk=$?
    if [ $rc -ne 0 ]; then   # the error each rank raised (rank 0's console and the other ranks' files)
        { echo "  exit status $rc; errors:"
          cat "$log" "$LOGS/$name".rank*.std*.txt 2>/dev/null | grep -E '^(\[rank[0-9]+\]: )?[A-Za-z_.]*(Error|Exception)\b' \
              | sort -u | head -6 | sed 's/^/    /'; } >> "$LOGS/$name.check.txt"
    fi
    cat "$LOGS/$name.check.txt"
    if [ $rc -eq 0 ] && [ "$chk" -eq 0 ]; then record "$name" PASS $(( $(now) - t0 ))
    else record "$name" "FAIL(exit $rc)" $(( $(now) - t0 )); fi
}

if [ "${RESULT[install]}" = PASS ] && [ "${RESULT[data]}" = PASS ] && [ "${RESULT[tokenizer]}" = PASS ]; then
    train_stage train-1p 1 20
    train_stage train-2p-midrun 2 20
    if [ "${RESULT[train-2p-midrun]}" != PASS ]; then
        echo ">>> DDP with ProRes ending mid-run failed: rerunning DDP with the warmup lasting the whole run"
        train_stage train-2p-fullwarmup 2 $MAXB
    fi
fi

# ------------------------------------------------------------------------------------------- summary
echo
echo "================================ llm-foundry e2e summary ================================"
grep -h '^versions:' "$LOGS/install-check.log" 2>/dev/null
overall=PASS
for s in "${STAGES[@]}"; do
    printf '  %-22s %-14s %6ss\n' "$s" "${RESULT[$s]}" "${SECS[$s]}"
    [ "${RESULT[$s]}" = PASS ] || overall=FAIL
done
for s in train-1p train-2p-midrun train-2p-fullwarmup; do
    [ -f "$LOGS/$s.check.txt" ] && { echo "--- $s"; cat "$LOGS/$s.check.txt"; }
done
echo "OVERALL: $overall   (logs: $LOGS)"
if [ "${CLEAN:-0}" = 1 ]; then rm -rf "$VENV" "$WORK"; echo "removed $VENV and $WORK"; fi
[ $overall = PASS ]
