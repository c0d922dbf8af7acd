"""llm-foundry finds `prores` through the `llmfoundry_algorithms` entry point (foundry itself cannot be
installed beside our pins, so we check what foundry's registry does: resolve the entry point by name,
load it, build it from the YAML's kwargs)."""

from importlib.metadata import entry_points
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_entry_point_resolves_to_the_algorithm_class():
    eps = entry_points(group='llmfoundry_algorithms')
    (ep,) = [e for e in eps if e.name == 'prores']
    assert ep.value == 'prores_algo.algorithm:ProRes'
    cls = ep.load()
    from composer.core import Algorithm

    from prores_algo import ProRes
    assert cls is ProRes and issubclass(cls, Algorithm)


def test_foundry_yaml_kwargs_build_the_algorithm():
    cfg = yaml.safe_load((ROOT / 'yamls' / 'llmfoundry' / 'mpt-125m-prores.yaml').read_text())
    kwargs = cfg['algorithms']['prores']
    (ep,) = [e for e in entry_points(group='llmfoundry_algorithms') if e.name == 'prores']
    algo = ep.load()(**kwargs)  # what foundry's build_algorithm(name, kwargs) does
    assert algo.schedule == 'linear' and str(algo.t_warmup) == '0.25dur' and algo.log_interval == 10


def test_mpt_block_policy_is_known():
    from prores_algo.policies import LAYER_POLICIES
    assert LAYER_POLICIES['MPTBlock'] == ('resid_attn_dropout', 'resid_ffn_dropout')
