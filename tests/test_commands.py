"""What every prores-* command shares: --version, one-line errors with exit 2, one flag spelling; and
prores-train's --help names every key."""

import pytest

from prores_algo import __version__, preview
from prores_algo.training import compare, composer_train
from prores_algo.training.data import cli as data_cli
from prores_algo.training.deepspeed import cli as ds_cli

COMMANDS = {
    'prores-preview': preview.main,
    'prores-data': data_cli.main,
    'prores-compare': compare.main,
    'prores-ds-train': lambda argv: ds_cli.parse(argv),
}


@pytest.mark.parametrize('name', sorted(COMMANDS))
def test_version_and_one_line_errors(name, capsys):
    with pytest.raises(SystemExit) as e:
        COMMANDS[name](['--version'])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f'{name} (prores_algo) {__version__}'
    with pytest.raises(SystemExit) as e:
        COMMANDS[name](['--no_such_flag'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and err.startswith(f'{name}: error: ')


def test_prores_train_version_help_and_unknown_option(capsys):
    assert composer_train.main(['--version']) == 0
    assert capsys.readouterr().out.strip() == f'prores-train (prores_algo) {__version__}'
    assert composer_train.main(['--help']) == 0
    out = capsys.readouterr().out
    for key in ('max_duration: required', 'optimizer.lr: None', 'data.seq_len: 128', 'model.*:', 'n_layers'):
        assert key in out, key
    assert 'yamls/quickstart.yaml' in out
    assert composer_train.main(['--verbose']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and "unknown option '--verbose'" in err


def test_hyphenated_flags_read_as_their_underscore_form(capsys):
    argv = ['--layers', '4', '--max_duration', '400', '--steps', '2']
    assert preview.main([*argv, '--t_warmup', '100']) == 0
    underscore = capsys.readouterr().out
    assert preview.main([*argv, '--t-warmup', '100']) == 0
    assert capsys.readouterr().out == underscore and 'W=100' in underscore
    assert ds_cli.parser().parse_args(['--lr-warmup', '10', '--micro-batch-size', '3']).lr_warmup == 10
    assert ds_cli.parser().parse_args(['--lr_warmup', '10', '--micro_batch_size', '3']).micro_batch_size == 3
