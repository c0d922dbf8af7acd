"""The small runs the kill / resume tests share (test_reliability and the object-store checkpoint
tests): a 4-layer reference decoder under ZeRO-3 in 2 processes, checkpoints every few steps."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DS_ENTRY = ROOT / 'tests' / 'support' / 'slow_ds_train.py'
ZERO3_JSON = ROOT / 'yamls' / 'deepspeed' / 'zero3.json'
N_LAYERS, T_WARMUP, STEPS, SAVE_EVERY = 3, 8, 12, 3

DS_ARGS = [
    '--deepspeed_config',
    str(ZERO3_JSON),
    '--n_layers',
    '4',
    '--d_model',
    '32',
    '--n_heads',
    '4',
    '--seq_len',
    '16',
    '--vocab_size',
    '64',
    '--steps',
    str(STEPS),
    '--prores_warmup',
    str(T_WARMUP),
    '--lr',
    '1e-2',
    '--lr_warmup',
    '1',
    '--eval_samples',
    '16',
    '--seed',
    '0',
    '--save_interval',
    str(SAVE_EVERY),
    '--log_interval',
    '100',
]
