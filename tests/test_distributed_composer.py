"""ProRes under Composer DDP and FSDP2 with `composer -n 2` on CPU (gloo): α on every rank at every
step equals the schedule, the first-batch measurement agrees across ranks, FSDP2 really shards, and N
batches straight == N/2 + checkpoint + resume."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from prores_algo import alpha_schedules
from tests.support.helpers import composer_launch

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / 'tests' / 'support' / 'dist_driver.py'


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    from prores_algo.training.data import write_mds

    out = tmp_path_factory.mktemp('dist') / 'mds'
    write_mds('stdlib', out, tokenizer='byte', seq_len=32, val_fraction=0.05, max_tokens=100_000, progress=False)
    return str(out)


def launch(yaml, out, data, *overrides):
    base = [
        f'data.path={data}',
        'data.source=null',
        'data.seq_len=32',
        'model.max_seq_len=32',
        'model.d_model=32',
        'model.n_heads=4',
        'model.n_layers=3',
        'global_train_batch_size=8',
        'eval_batch_size=8',
        'eval_interval=100ba',
        'eval_subset_num_batches=1',
        'algorithms.prores.t_warmup=8ba',
        'algorithms.prores.log_interval=1',
        'console_log_interval=100ba',
        'data.shuffle=false',
    ]
    cmd = composer_launch(2, out, str(DRIVER), str(out), str(yaml), *base, *overrides)
    Path(out).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        cmd, env={**os.environ, 'OMP_NUM_THREADS': '1'}, capture_output=True, text=True, timeout=600, cwd=out
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return [json.loads(Path(out, f'rank{r}.json').read_text()) for r in (0, 1)]


def check_alphas(ranks, batches):
    assert ranks[0]['alphas'] == ranks[1]['alphas'], 'α must be identical on every rank'
    for b in batches:
        bufs = ranks[0]['alphas'][str(b)]
        expected = alpha_schedules.alphas('linear', 3, b, 8)
        for path, value in bufs.items():
            layer = int(path.split('blocks.')[1].split('.')[0])
            assert value == pytest.approx(expected[layer]), (b, path)
        assert len(bufs) == 6


def model_state(ckpt):
    sd = torch.load(ckpt, map_location='cpu', weights_only=False)['state']['model']
    return {k: v for k, v in sd.items()}


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['ddp', 'fsdp2'])
def test_two_process_training_and_exact_resume(kind, data, tmp_path):
    yaml = ROOT / 'yamls' / ('quickstart.yaml' if kind == 'ddp' else 'sharding/fsdp2-cpu.yaml')
    straight = launch(
        yaml, tmp_path / 'a', data, 'max_duration=6ba', f'save_folder={tmp_path}/ck_a', 'save_interval=3ba'
    )
    check_alphas(straight, range(6))
    # measured on each rank's own first batch and averaged over the ranks: one answer, the same advice
    assert straight[0]['init_measure'] == straight[1]['init_measure'] is not None
    assert straight[0]['init_measure']['normalised_stream'] is False and straight[0]['init_measure']['ratio'] > 0
    if kind == 'fsdp2':
        shards = straight[0]['shards']
        assert shards, 'FSDP2 must turn parameters into DTensors'
        for name, (local, full) in shards.items():
            assert local < full, name  # dim-0 shards: ceil(rows / 2) rows on rank 0
        assert sum(l for l, _ in shards.values()) < 0.6 * sum(f for _, f in shards.values())
    else:
        assert straight[0]['shards'] == {}
    assert straight[0]['losses'][-1] < straight[0]['losses'][0]
    resumed = launch(
        yaml,
        tmp_path / 'b',
        data,
        'max_duration=6ba',
        f'save_folder={tmp_path}/ck_b',
        'save_interval=3ba',
        f'load_path={tmp_path}/ck_a/ep0-ba3-rank0.pt',
    )
    assert sorted(resumed[0]['alphas'], key=int) == ['3', '4', '5']
    assert {b: resumed[0]['alphas'][b] for b in ('3', '4', '5')} == {
        b: straight[0]['alphas'][b] for b in ('3', '4', '5')
    }
    assert resumed[0]['losses'] == straight[0]['losses'][3:]
    a, b = model_state(tmp_path / 'ck_a' / 'ep0-ba6-rank0.pt'), model_state(tmp_path / 'ck_b' / 'ep0-ba6-rank0.pt')
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
