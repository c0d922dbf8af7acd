"""llm-foundry finds `prores` through the `llmfoundry_algorithms` entry point (foundry itself cannot be
installed beside our pins, so we check what foundry's registry does: resolve the entry point by name,
load it, build it from the YAML's kwargs)."""

from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_entry_point_resolves_to_the_algorithm_class():
    eps = entry_points(group='llmfoundry_algorithms')
    (ep,) = [e for e in eps if e.name == 'prores']
    assert ep.value == 'prores_algo.integrations.composer:ProRes'
    cls = ep.load()
    from composer.core import Algorithm

    from prores_algo import ProRes

    assert cls is ProRes and issubclass(cls, Algorithm)


FOUNDRY_YAMLS = {'mpt-125m-prores.yaml': ('0.25dur', 10), 'mpt-tiny-cpu-prores.yaml': ('0.5dur', 1)}


@pytest.mark.parametrize('name', sorted(FOUNDRY_YAMLS))
def test_foundry_yaml_kwargs_build_the_algorithm(name):
    cfg = yaml.safe_load((ROOT / 'yamls' / 'llmfoundry' / name).read_text())
    kwargs = cfg['algorithms']['prores']
    (ep,) = [e for e in entry_points(group='llmfoundry_algorithms') if e.name == 'prores']
    algo = ep.load()(**kwargs)  # what foundry's build_algorithm(name, kwargs) does
    t_warmup, log_interval = FOUNDRY_YAMLS[name]
    assert algo.schedule == 'linear' and str(algo.t_warmup) == t_warmup and algo.log_interval == log_interval


def test_foundry_yamls_run_without_llm_foundry_gpu_extra():
    """Foundry's default loss, fused_crossentropy, needs llm-foundry[gpu] (flash-attn): with plain
    `pip install llm-foundry` the run stops with "Fused Cross Entropy is not installed"."""
    assert set(FOUNDRY_YAMLS) == {p.name for p in (ROOT / 'yamls' / 'llmfoundry').glob('*.yaml')}
    for name in FOUNDRY_YAMLS:
        model = yaml.safe_load((ROOT / 'yamls' / 'llmfoundry' / name).read_text())['model']
        assert model['attn_config']['attn_impl'] == 'torch' and model['loss_fn'] == 'torch_crossentropy', name


def test_mpt_block_policy_is_known():
    from prores_algo.policies import LAYER_POLICIES

    assert LAYER_POLICIES['MPTBlock'] == ('resid_attn_dropout', 'resid_ffn_dropout')
