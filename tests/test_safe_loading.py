"""What a user writes is data, never code: YAML python tags, names of classes, checkpoints and
indexes are read without running anything."""

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import prores_algo
from prores_algo.training.config import ConfigError, load_config
from tests.support.bad_inputs import QS


def test_yaml_python_tags_are_rejected_and_run_nothing(tmp_path):
    """OmegaConf's loader is a safe loader: python object tags are an error, in files and in overrides."""
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.yaml'
    evil.write_text(QS.read_text() + f'\npayload: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match='not valid YAML') as info:
        load_config(evil)
    assert 'python/object/apply' in str(info.value)
    for text in (
        f'!!python/object/apply:os.system ["touch {marker}"]',
        f'!!python/object/new:subprocess.Popen [["touch", "{marker}"]]',
    ):
        evil.write_text(f'run_name: {text}\n')
        with pytest.raises(ConfigError):
            load_config(evil)
        with pytest.raises(ConfigError, match=r"override 'run_name=!!python/object.*cannot be applied"):
            load_config(QS, [f'run_name={text}'])
    assert not marker.exists()


@pytest.mark.parametrize(
    'section,name',
    [
        ('algorithms', 'os.system'),
        ('algorithms', 'composer.algorithms.GradientClipping'),
        ('callbacks', 'builtins.eval'),
        ('loggers', 'prores_algo.training.composer_train.main'),
    ],
)
def test_names_are_never_imported_from_strings(section, name, tmp_path):
    from prores_algo.training.composer_train import build_trainer

    raw = load_config(QS, [f'data.path={tmp_path}/d']).model_dump()
    raw[section] = {name: {}}
    with pytest.raises(ConfigError, match=rf"{section}: unknown name '{re.escape(name)}'.*available: \["):
        build_trainer(load_config(data=raw))
    assert not (tmp_path / 'd').exists()


def test_scheduler_name_is_not_imported(tmp_path):
    from prores_algo.training.composer_train import build_trainer

    raw = load_config(QS, [f'data.path={tmp_path}/d']).model_dump()
    raw['scheduler'] = {'name': 'torch.optim.lr_scheduler.StepLR'}
    with pytest.raises(ConfigError, match=r"unknown scheduler 'torch\.optim\.lr_scheduler\.StepLR'; available"):
        build_trainer(load_config(data=raw))


def _calls(tree):
    import ast

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else (f.id if isinstance(f, ast.Name) else '')
            base = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ''
            yield node, base, name


def test_package_source_has_no_unsafe_loading():
    """Over every module of prores_algo: torch.load only with weights_only=True; no pickle loading, no
    unsafe yaml loaders, no eval/exec, no import of a name that comes from configuration."""
    import ast

    pkg = Path(prores_algo.__file__).parent
    files = sorted(pkg.rglob('*.py'))
    assert len(files) > 10
    problems = []
    for path in files:
        rel = path.relative_to(pkg).as_posix()
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, base, name in _calls(tree):
            where = f'{rel}:{node.lineno}'
            if name == 'load' and base == 'torch':
                kw = {k.arg: k.value for k in node.keywords}
                ok = (
                    'weights_only' in kw
                    and isinstance(kw['weights_only'], ast.Constant)
                    and kw['weights_only'].value is True
                )
                if not ok:
                    problems.append(f'{where}: torch.load without weights_only=True')
            elif base in ('pickle', 'dill', 'cloudpickle', 'marshal') and name in ('load', 'loads'):
                problems.append(f'{where}: {base}.{name}')
            elif base == 'yaml' and name in ('load', 'unsafe_load', 'full_load', 'load_all', 'unsafe_load_all'):
                problems.append(f'{where}: yaml.{name} (use yaml.safe_load / OmegaConf)')
            elif base == '' and name in ('eval', 'exec', '__import__'):
                problems.append(f'{where}: {name}()')
            elif name == 'import_module':
                # allowed only with a module name taken from a fixed table in the package itself
                if rel != '__init__.py':
                    problems.append(f'{where}: import_module outside the lazy-import table')
            elif name == 'instantiate' or name == 'locate':
                problems.append(f'{where}: {name}() builds objects from strings')
        if "'_target_'" in path.read_text() or '"_target_"' in path.read_text():
            problems.append(f'{rel}: _target_ (hydra-style instantiation)')
    assert not problems, '\n'.join(problems)
    # The lazy table maps fixed attribute names to fixed modules of this package only.
    assert all(v.startswith('prores_algo.') for v in prores_algo._LAZY.values())


def test_what_we_load_ourselves_is_data_not_code(tmp_path, monkeypatch, bad_inputs_dataset):
    """Everything prores_algo reads by itself (configs, dataset metadata and indexes, the DeepSpeed ProRes
    sidecar) is YAML/JSON parsed as data; torch.load is never called by it, and a pickle planted where
    JSON is expected is an error, not code that runs."""
    import pickle

    from prores_algo.integrations.deepspeed import SIDECAR_FILE, check_checkpoint
    from prores_algo.training.data import build_dataloader, read_metadata

    calls = []
    real_load = torch.load

    def spy(*a, **k):
        calls.append(k.get('weights_only'))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, 'load', spy)
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    payload = pickle.dumps(Evil())
    # a dataset whose metadata and index are pickles
    ds = tmp_path / 'ds'
    shutil.copytree(bad_inputs_dataset, ds)
    (ds / 'prores_data.json').write_bytes(payload)
    assert read_metadata(ds) is None
    (ds / 'train' / 'index.json').write_bytes(payload)
    with pytest.raises(ValueError, match='not a valid MDS index'):
        build_dataloader(str(ds), 'train', 2)
    # a DeepSpeed checkpoint whose ProRes sidecar is a pickle
    tag = tmp_path / 'ck' / 'step1'
    tag.mkdir(parents=True)
    (tag / SIDECAR_FILE).write_bytes(payload)
    with pytest.raises(ValueError):
        check_checkpoint(str(tmp_path / 'ck'), None, 'step1')
    # a config file that is a pickle
    (tmp_path / 'cfg.yaml').write_bytes(payload)
    with pytest.raises(ConfigError):
        load_config(tmp_path / 'cfg.yaml')
    # and the regular paths: load a real dataset and config
    build_dataloader(str(bad_inputs_dataset), 'train', 2, seq_len=32)
    load_config(QS)
    assert calls == [] and not marker.exists()
