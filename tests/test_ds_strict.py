"""Nothing a user writes to the DeepSpeed entry is silently dropped.

  * a misspelt key under `algorithms.prores` or `scheduler` is refused with prores-train's own message;
  * with `--config`, a flag that would set what the YAML sets is an error naming the key=value override
    (the documented rule, in `--help`); the DeepSpeed flags still apply;
  * a user's mistake is one line on stderr, exit status 2, no traceback, from `prores-ds-train` and, for a
    file that is not a YAML config, from `prores-train` too.

The subprocess rows run the entries as a user does (`python -m ...`); none of them trains.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prores_algo.training import composer_train as composer_entry
from prores_algo.training.deepspeed import loop as ds_train
from tests.support.helpers import env_without_dist

ROOT = Path(__file__).resolve().parents[1]
QS = str(ROOT / 'yamls' / 'quickstart.yaml')
ZERO3_JSON = str(ROOT / 'yamls' / 'deepspeed' / 'zero3.json')
SMALL = ['model.n_layers=2', 'model.d_model=32', 'model.max_seq_len=32', 'data.seq_len=32', 'max_duration=2ba']


def _run(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**env_without_dist(), 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}
    return subprocess.run(
        [sys.executable, '-m', module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The run stopped with exit status 2 and one line on stderr, no traceback; that line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith('config error: '), proc.stderr[-3000:]
    return lines[0]


@pytest.fixture
def no_training(monkeypatch):
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(ds_train, 'train', lambda *a: pytest.fail('the DeepSpeed loop started'))


# ------------------------------------------------------------------------------------ 1. misspelt keys


def test_misspelt_prores_key_in_a_yaml_file_stops_both_entries(tmp_path):
    """A misspelt key, `t_wramup: 0.3dur`, must stop prores-ds-train instead of training with the default W."""
    typo = tmp_path / 'typo.yaml'
    typo.write_text(Path(QS).read_text().replace('t_warmup: 0.3dur', 't_wramup: 0.3dur'))
    expected = "config error: algorithms.prores: unknown key 't_wramup' (did you mean 't_warmup'?)"
    ds = _one_line_error(_run('prores_algo.training.deepspeed.loop', ['--config', str(typo)], tmp_path))
    assert ds.startswith(expected)
    assert ds == _one_line_error(_run('prores_algo.training.composer_train', [str(typo)], tmp_path))


@pytest.mark.parametrize(
    'override,expected',
    [
        ('algorithms.prores.t_wramup=0.3dur', "algorithms.prores: unknown key 't_wramup' (did you mean 't_warmup'?)"),
        ('algorithms.prores.shedule=equal', "algorithms.prores: unknown key 'shedule' (did you mean 'schedule'?)"),
        ('scheduler.lr_wramup=0.05dur', "scheduler (wsd): unknown key 'lr_wramup' (did you mean 'lr_warmup'?)"),
        ('scheduler.t_warmup=0.05dur', "scheduler (wsd): unknown key 't_warmup': the LR warmup is `lr_warmup`"),
        ('scheduler.alpha=0.1', "scheduler (wsd): unknown key 'alpha' (did you mean 'alpha_f'?)"),
        ('scheduler.name=wsdd', "scheduler.name: unknown scheduler 'wsdd' (did you mean 'wsd'?)"),
        ('algorithms.prorez={}', "algorithms: unknown name 'prorez' (did you mean 'prores'?)"),
        ('algorithms.gradient_clipping.clipping_treshold=1', "unknown key 'clipping_treshold'"),
    ],
)
def test_misspelt_key_gets_prores_trains_message(override, expected, no_training, capsys):
    assert composer_entry.main([QS, override]) == 2
    composer_msg = capsys.readouterr().err
    assert ds_train.main(['--config', QS, override]) == 2
    assert capsys.readouterr().err == composer_msg
    assert composer_msg.startswith('config error: ') and expected in composer_msg


@pytest.mark.parametrize(
    'override,expected',
    [
        ('algorithms.prores.branches=[attn]', r"algorithms\.prores: the DeepSpeed loop does not take \['branches'\]"),
        ('algorithms.prores.remove_when_done=false', r"does not take \['remove_when_done'\]"),
        (
            'scheduler: {name: constant_with_warmup, t_warmup: 2ba, t_max: 1dur}',
            r"scheduler \(constant_with_warmup\): unknown key 't_max'; constant_with_warmup takes \['alpha', 'lr_warmup'\]",
        ),
    ],
)
def test_keys_the_deepspeed_loop_would_drop_are_refused(override, expected, tmp_path):
    from prores_algo.training.config import ConfigError
    from prores_algo.training.deepspeed.settings import from_yaml, resolve

    path, overrides = QS, [override]
    if override.startswith('scheduler:'):  # a whole section: written into a copy of the YAML
        path, overrides = tmp_path / 'q.yaml', []
        text = Path(QS).read_text()
        path.write_text(text[: text.index('scheduler:')] + override + '\n' + text[text.index('algorithms:') :])
    with pytest.raises(ConfigError, match=expected):
        resolve(from_yaml(str(path), overrides)[0])


def test_llm_foundry_scheduler_names_are_checked_too(no_training, capsys, tmp_path):
    path = tmp_path / 'q.yaml'
    text = Path(QS).read_text()
    block = 'scheduler: {name: linear_decay_with_warmup, lr_warmpu: 2ba}\n'
    path.write_text(text[: text.index('scheduler:')] + block + text[text.index('algorithms:') :])
    assert ds_train.main(['--config', str(path)]) == 2
    assert "scheduler (linear_decay_with_warmup): unknown key 'lr_warmpu' (did you mean 'lr_warmup'?)" in (
        capsys.readouterr().err
    )


# ------------------------------------------------------------------------ 2. flags given with --config


@pytest.mark.parametrize(
    'flags,expected',
    [
        (
            ['--norm', 'post'],
            '--norm has no effect with --config (the YAML sets model.norm): give the override model.norm=post instead',
        ),
        (
            ['--no_prores'],
            '--no_prores has no effect with --config (ProRes is on when the YAML lists '
            'algorithms.prores): remove algorithms.prores from the YAML',
        ),
        (['--steps', '5'], 'give the override max_duration=5ba instead'),
        (['--prores_warmup', '30'], 'give the override algorithms.prores.t_warmup=30ba instead'),
        (['--schedule', 'equal'], 'give the override algorithms.prores.schedule=equal instead'),
        (['--schedule', 'none'], '--schedule none has no effect with --config'),
        (['--lr', '0.01'], 'give the override optimizer.lr=0.01 instead'),
        (['--n_layers', '3'], 'give the override model.n_layers=3 instead'),
        (['--data', '/x'], 'give the override data.path=/x instead'),
        (['--seed', '3'], 'give the override seed=3 instead'),
        (['--no_measure_init'], 'give the override algorithms.prores.measure_init=false instead'),
        (['--lr_warmup', '10'], 'give the override scheduler.lr_warmup=10ba instead'),
        (['--norm', 'pre'], '--norm has no effect'),  # even when it equals the YAML: given, so refused
    ],
)
def test_a_flag_the_yaml_sets_stops_the_run(flags, expected, no_training, capsys):
    assert ds_train.main(['--config', QS, *flags]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith('config error: ') and expected in err, err


@pytest.mark.parametrize('value', [True, False])
def test_measure_init_is_taken_by_the_deepspeed_loop(value):
    """One vocabulary: `algorithms.prores.measure_init` means in prores-ds-train what it means in prores-train."""
    from prores_algo.training.deepspeed.settings import from_yaml, resolve

    plan = resolve(from_yaml(QS, [f'algorithms.prores.measure_init={str(value).lower()}'])[0])
    assert plan.prores.measure_init is value


def test_the_flat_flag_turns_measure_init_off():
    from prores_algo.training.deepspeed.cli import parse
    from prores_algo.training.deepspeed.settings import resolve

    assert resolve(parse([])[0]).prores.measure_init is True
    assert resolve(parse(['--no_measure_init'])[0]).prores.measure_init is False


def test_a_bad_measure_init_gets_prores_trains_message(no_training, capsys):
    assert composer_entry.main([QS, 'algorithms.prores.measure_init=sometimes']) == 2
    composer_msg = capsys.readouterr().err
    assert ds_train.main(['--config', QS, 'algorithms.prores.measure_init=sometimes']) == 2
    assert capsys.readouterr().err == composer_msg and 'measure_init must be true or false' in composer_msg


def test_the_deepspeed_flags_still_apply_with_a_yaml(monkeypatch):
    seen = {}
    monkeypatch.setattr(ds_train, 'train', lambda c, o: seen.update(c=c, o=o) or {'rank': 1, 'final_eval_loss': None})
    argv = ['--config', QS, '--deepspeed_config', ZERO3_JSON, '--summary', 's.json', '--log_interval', '5']
    assert ds_train.main([*argv, '--no_zero_init', '--eval_samples', '8', '--verbose', 'max_duration=7ba']) == 0
    o = seen['o']
    assert (o.deepspeed_config, o.summary, o.log_interval, o.zero_init, o.eval_samples, o.verbose) == (
        ZERO3_JSON,
        's.json',
        5,
        False,
        8,
        True,
    )
    assert seen['c'].max_duration == '7ba' and seen['c'].model.kwargs['norm'] == 'pre'


def test_the_rule_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        ds_train.main(['--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert 'With --config the YAML sets the model, data, optimizer, LR schedule, ProRes and loop' in text
    assert 'is an error naming the key=value override to use instead' in text


def test_the_issue_command_does_not_train(tmp_path):
    """`--config yamls/quickstart.yaml --norm post --no_prores` trained a Pre-LN model with ProRes on."""
    proc = _run(
        'prores_algo.training.deepspeed.loop', ['--config', QS, '--norm', 'post', '--no_prores', *SMALL], tmp_path
    )
    assert '--norm has no effect with --config' in _one_line_error(proc)
    assert not (tmp_path / 'data').exists()


# ---------------------------------------------------------------------- 3. one line, exit 2, no traceback


def test_missing_deepspeed_json_is_named(tmp_path):
    proc = _run('prores_algo.training.deepspeed.loop', ['--deepspeed_config', 'nope.json', '--steps', '1'], tmp_path)
    line = _one_line_error(proc)
    assert "deepspeed_config: file 'nope.json' does not exist" in line and 'yamls/deepspeed/zero3.json' in line


def test_deepspeed_json_that_is_not_json(tmp_path):
    (tmp_path / 'ds.json').write_text('{"train_micro_batch_size_per_gpu": 2,,}')
    line = _one_line_error(_run('prores_algo.training.deepspeed.loop', ['--deepspeed_config', 'ds.json'], tmp_path))
    assert "deepspeed_config: 'ds.json' is not valid JSON" in line


def test_batch_size_conflict_between_yaml_and_json(tmp_path):
    args = ['--config', QS, *SMALL, f'data.path={tmp_path}/d', 'global_train_batch_size=16']
    line = _one_line_error(
        _run('prores_algo.training.deepspeed.loop', [*args, '--deepspeed_config', ZERO3_JSON], tmp_path)
    )
    assert 'global_train_batch_size=16 conflicts with the DeepSpeed config' in line
    assert 'make them agree in the JSON or the YAML' in line
    assert not (tmp_path / 'd').exists()


def test_data_source_not_found(tmp_path):
    args = ['--config', QS, *SMALL, f'data.path={tmp_path}/d', 'data.source=/no/such/text', 'global_train_batch_size=4']
    line = _one_line_error(
        _run('prores_algo.training.deepspeed.loop', [*args, '--deepspeed_config', ZERO3_JSON], tmp_path)
    )
    assert "data: `source` '/no/such/text' does not exist" in line


def test_a_bad_json_value_found_by_the_loop_is_one_line(tmp_path):
    (tmp_path / 'ds.json').write_text(json.dumps({'train_micro_batch_size_per_gpu': 2, 'scheduler': {'type': 'x'}}))
    line = _one_line_error(_run('prores_algo.training.deepspeed.loop', ['--deepspeed_config', 'ds.json'], tmp_path))
    assert 'remove "scheduler" from the JSON' in line


@pytest.fixture
def not_yaml(tmp_path):
    (tmp_path / 'script.py').write_text('x = 1\nprint(x)\n')
    (tmp_path / 'weights.dat').write_bytes(bytes(range(256)) * 4)
    (tmp_path / 'noext').write_bytes(b'\x7fELF\x02\x01\x01\x00' + bytes(100))
    return tmp_path


@pytest.mark.parametrize('name,what', [('script.py', 'a .py file'), ('weights.dat', 'binary'), ('noext', 'binary')])
@pytest.mark.parametrize('entry', ['prores_algo.training.deepspeed.loop', 'prores_algo.training.composer_train'])
def test_a_file_that_is_not_a_yaml_config(entry, name, what, not_yaml):
    args = ['--config', name] if entry == 'prores_algo.training.deepspeed.loop' else [name]
    line = _one_line_error(_run(entry, args, not_yaml))
    assert f'{name}: not a YAML config ({what}' in line, line


def test_yaml_syntax_error_is_one_line(tmp_path):
    (tmp_path / 'broken.yaml').write_text('model: [unclosed\nseed: 1\n')
    for entry, args in (
        ('prores_algo.training.composer_train', ['broken.yaml']),
        ('prores_algo.training.deepspeed.loop', ['--config', 'broken.yaml']),
    ):
        assert 'broken.yaml: not valid YAML' in _one_line_error(_run(entry, args, tmp_path))


def test_the_flat_flags_report_a_mistake_in_one_line(tmp_path):
    line = _one_line_error(_run('prores_algo.training.deepspeed.loop', ['--steps', '0'], tmp_path))
    assert line == 'config error: steps must be >= 1, got 0'
    assert os.listdir(tmp_path) == []
