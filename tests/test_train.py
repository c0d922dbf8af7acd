"""The YAML entry end to end: every YAML builds, every norm placement trains, DDP via the composer
launcher, and bad input gets a message that names what to change."""

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prores_algo.training.composer_train import build_model, run
from prores_algo.training.config import ConfigError, load_config
from tests.support.helpers import composer_launch

ROOT = Path(__file__).resolve().parents[1]
# every YAML of ours (yamls/llmfoundry/ holds llm-foundry's format; tests/test_llmfoundry_plugin.py checks it)
YAMLS = sorted(p for p in glob.glob(str(ROOT / 'yamls' / '**' / '*.yaml'), recursive=True) if '/llmfoundry/' not in p)


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """Byte-level MDS shards of the stdlib corpus (the quickstart's data, smaller)."""
    from prores_algo.training.data import write_mds

    out = tmp_path_factory.mktemp('data') / 'stdlib-32'
    write_mds('stdlib', out, tokenizer='byte', seq_len=32, val_fraction=0.05, max_tokens=150_000, progress=False)
    return str(out)


def small_overrides(data_path, **extra):
    o = {
        'data.path': data_path,
        'data.source': 'null',
        'data.seq_len': 32,
        'model.d_model': 32,
        'model.n_heads': 4,
        'model.n_layers': 3,
        'model.max_seq_len': 32,
        'max_duration': '6ba',
        'eval_interval': '3ba',
        'eval_subset_num_batches': 2,
        'global_train_batch_size': 8,
        'eval_batch_size': 8,
        'algorithms.prores.t_warmup': '4ba',
        'algorithms.prores.log_interval': 1,
        'console_log_interval': '100ba',
    }
    o.update(extra)
    return [f'{k}={v}' for k, v in o.items()]


def test_yamls_exist():
    names = {Path(p).relative_to(ROOT / 'yamls').as_posix() for p in YAMLS}
    assert 'quickstart.yaml' in names
    for size in ('130m', '350m', '1.3b'):
        for norm in ('preln', 'postln'):
            assert f'paper/{size}-{norm}.yaml' in names and f'paper/{size}-{norm}-prores.yaml' in names
    for depth in (12, 24, 48, 72, 96, 120):
        assert f'depth/depth{depth}-preln-prores.yaml' in names


@pytest.mark.parametrize('path', YAMLS, ids=lambda p: Path(p).relative_to(ROOT / 'yamls').as_posix())
def test_every_yaml_parses_and_builds(path):
    """GPU configs build their model on the meta device; data/tokenizer fields are checked, nothing fetched."""
    from prores_algo.training import composer_train

    cfg = load_config(path)
    composer_train._build_named('algorithms', composer_train._algorithms(), cfg.algorithms)
    composer_train._build_named('callbacks', composer_train._callbacks(), cfg.callbacks)
    composer_train._build_named('loggers', composer_train._loggers(), cfg.loggers)
    composer_train._build_scheduler(cfg)
    with torch.device('meta'):
        model = build_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n > 0
    if 'paper' in path:
        expected = {'130m': 134e6, '350m': 367e6, '1.3b': 1.35e9}[Path(path).name.split('-')[0]]
        assert abs(n - expected) / expected < 0.05, n
        assert cfg.data.source.startswith('hf:') and cfg.data.seq_len == 1024
        assert '/' in cfg.tokenizer  # a hub id: loaded where the run happens, not here
        prores = cfg.algorithms.get('prores')
        assert (prores is not None) == Path(path).stem.endswith('-prores')
        if prores:
            assert prores['t_warmup'] == f'{1000 * cfg.model.kwargs["n_layers"]}ba'
        # the official scripts: 2000 LR-warmup steps for every norm placement (test_official_fidelity has the rest)
        assert cfg.scheduler.kwargs['lr_warmup'] == '2000ba'
    if 'depth' in path and Path(path).stem.endswith('-prores'):
        layers = cfg.model.kwargs['n_layers']
        assert cfg.algorithms['prores']['t_warmup'] == f'{(1000 if layers <= 72 else 500) * layers}ba'


@pytest.mark.parametrize('norm', ['pre', 'post', 'sandwich', 'deepnorm', 'lns'])
def test_every_norm_placement_trains_with_prores(norm, tiny_data):
    from composer.loggers import InMemoryLogger

    mem = InMemoryLogger()
    cfg = load_config(ROOT / 'yamls' / 'quickstart.yaml', small_overrides(tiny_data, **{'model.norm': norm}))
    result = run(cfg, extra_loggers=(mem,))
    assert torch.isfinite(torch.tensor(result['val_loss']))
    assert result['val_loss'] < result['val_loss_start']
    alphas = [v for _, v in mem.data['prores/alpha/layer_2']]
    assert alphas[0] == 0.0 and 0 < alphas[2] < 1 and alphas[-1] == 1.0


@pytest.mark.parametrize('eval_interval,evals', [('3ba', [0, 3, 6]), ('4ba', [0, 4, 6])])
def test_the_final_evaluation_runs_once(eval_interval, evals, tiny_data):
    """When fit ends on an evaluation (the interval divides the run) run() reports it, not a second one."""
    from composer.core import Callback

    class Evals(Callback):
        batches: list = []

        def eval_end(self, state, logger):
            self.batches = [*self.batches, int(state.timestamp.batch)]

    seen = Evals()
    cfg = load_config(ROOT / 'yamls' / 'quickstart.yaml', small_overrides(tiny_data, eval_interval=eval_interval))
    result = run(cfg, extra_callbacks=(seen,))
    assert seen.batches == evals
    assert result['val_loss'] < result['val_loss_start']


def test_hf_causal_lm_family_trains(tiny_data):
    over = small_overrides(tiny_data)
    over = [o for o in over if not o.startswith('model.')] + [
        'model={name: hf_causal_lm, model_type: llama, vocab_size: 257, hidden_size: 32, intermediate_size: 64, '
        'num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64}'
    ]
    cfg = load_config(ROOT / 'yamls' / 'quickstart.yaml', over)
    result = run(cfg)
    assert result['val_loss'] < result['val_loss_start']


@pytest.mark.slow
def test_quickstart_under_composer_launcher_ddp(tiny_data, tmp_path):
    """`composer -n 2 -m prores_algo.training.composer_train yamls/quickstart.yaml` (DDP over gloo on CPU), a few batches."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = composer_launch(
        2,
        tmp_path,
        '-m',
        'prores_algo.training.composer_train',
        str(ROOT / 'yamls' / 'quickstart.yaml'),
        *small_overrides(tiny_data, max_duration='4ba'),
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    # the launcher streams rank 0 to its own stdout and the other ranks to --stdout files
    out0 = proc.stdout
    assert proc.returncode == 0, out0[-3000:] + proc.stderr[-3000:]
    assert 'validation loss after 4 batches' in out0
    assert 'prores/num_layers: 3' in out0 + proc.stderr  # ProRes was applied (its hyperparameters are logged)
    log1 = (tmp_path / 'stdout1.txt').read_text()
    assert 'Train time/batch: 4' in log1 or 'batch=4/4' in log1 or log1 == '' or 'validation loss' not in log1


# --- bad input ---------------------------------------------------------------------------------------

QS = ROOT / 'yamls' / 'quickstart.yaml'


@pytest.mark.parametrize(
    'overrides,match',
    [
        (['max_duraton=10ba'], r"unknown key 'max_duraton' \(did you mean 'max_duration'\?\)"),
        (['data.seq_lenn=64'], r"unknown key 'data.seq_lenn' \(did you mean 'data.seq_len'"),
        (['model.name=gpt5'], r'model.name'),
        (['optimizer.name=adamww'], r'optimizer.name'),
        (['global_train_batch_size=0'], 'global_train_batch_size'),
        (['precision=fp64'], 'precision'),
        (['maxduration'], 'key=value'),
    ],
)
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(QS, overrides)


def test_missing_config_file():
    with pytest.raises(ConfigError, match='not found'):
        load_config('yamls/nope.yaml')


@pytest.mark.parametrize(
    'overrides,match',
    [
        (['algorithms.prorez={}'], r"algorithms: unknown name 'prorez' \(did you mean 'prores'\?\)"),
        (['algorithms.prores.t_warmpu=10ba'], r"algorithms.prores: unknown key 't_warmpu' \(did you mean 't_warmup'"),
        (['algorithms.prores.schedule=cosine'], 'unknown schedule'),
        (['scheduler.name=wsdd'], r"scheduler.name: unknown scheduler 'wsdd'"),
        (['scheduler.t_decy=0.1dur'], r"scheduler \(wsd\): unknown key 't_decy'"),
        (['callbacks.lr_monitr={}'], r"callbacks: unknown name 'lr_monitr'"),
        (['model.vocab_size=200'], r'model.vocab_size=200 is smaller than the tokenizer'),
        (['model.n_layer=3'], r"model \(reference\): unknown key 'n_layer' \(did you mean 'n_layers'"),
        (['data.seq_len=4096'], r'data.seq_len=4096 exceeds model.max_seq_len'),
        (['tokenizer=/no/such/tokenizer'], r'tokenizer'),
    ],
)
def test_build_errors_name_what_to_change(overrides, match, tmp_path):
    from prores_algo.training.composer_train import build_trainer

    cfg = load_config(QS, [f'data.path={tmp_path}/d', 'model.max_seq_len=128', *overrides])
    with pytest.raises(ValueError, match=match):
        build_trainer(cfg)
    assert not (tmp_path / 'd').exists()  # failed before touching data


def test_missing_data_without_source(tmp_path):
    from prores_algo.training.composer_train import build_trainer

    cfg = load_config(QS, [f'data.path={tmp_path}/missing', 'data.source=null'])
    with pytest.raises(ValueError, match=r'data.path=.*does not exist and data.source is null'):
        build_trainer(cfg)


def test_empty_corpus_and_seq_len_larger_than_data(tmp_path):
    from prores_algo.training.composer_train import build_trainer

    (tmp_path / 'empty').mkdir()
    cfg = load_config(QS, [f'data.path={tmp_path}/d1', f'data.source={tmp_path}/empty'])
    with pytest.raises(ValueError, match='empty'):
        build_trainer(cfg)
    (tmp_path / 'small').mkdir()
    (tmp_path / 'small' / 'a.txt').write_text('tiny corpus ' * 10)
    cfg = load_config(QS, [f'data.path={tmp_path}/d2', f'data.source={tmp_path}/small'])
    with pytest.raises(ValueError, match='seq_len'):
        build_trainer(cfg)
    assert not (tmp_path / 'd1').exists() and not (tmp_path / 'd2').exists()


def test_data_build_errors_are_one_line_from_the_command(tmp_path, capsys):
    from prores_algo.training.composer_train import main

    (tmp_path / 'small').mkdir()
    (tmp_path / 'small' / 'a.txt').write_text('tiny corpus ' * 10)
    assert main([str(QS), f'data.path={tmp_path}/d', f'data.source={tmp_path}/small']) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # after the progress bar: the error, one line, no traceback
    assert last.startswith('config error: data: ') and 'seq_len' in last and 'Traceback' not in err


def test_cli_returns_2_with_message_on_config_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, '-m', 'prores_algo.training.composer_train', str(QS), 'max_duraton=1ba'],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "did you mean 'max_duration'" in proc.stderr
