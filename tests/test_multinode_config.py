"""The multi-node YAMLs and what the DeepSpeed entry takes from a YAML / its command line (in-process, fast).

The launches themselves are in tests/test_multinode.py; the memory table in tests/test_memory_estimate.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prores_algo.training.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
MULTINODE = {
    '1.3b': (ROOT / 'yamls' / 'multinode' / '1.3b.yaml', 1_364_297_728, 24),
    '7b': (ROOT / 'yamls' / 'multinode' / '7b.yaml', 6_738_415_616, 32),
}


@pytest.mark.parametrize('size', sorted(MULTINODE))
def test_multinode_yamls_build_the_documented_models_for_both_entries(size):
    from prores_algo.training.composer_train import build_model as composer_model
    from prores_algo.training.deepspeed.loop import build_model
    from prores_algo.training.deepspeed.settings import resolve

    path, params, layers = MULTINODE[size]
    cfg = load_config(path)
    assert cfg.data.path.startswith('s3://') and cfg.data.local_cache and cfg.data.source is None
    assert cfg.save_folder.startswith('s3://') and cfg.autoresume
    assert cfg.parallelism['fsdp']['sharding_strategy'] == 'FULL_SHARD'
    assert cfg.algorithms['prores']['t_warmup'] == f'{1000 * layers}ba'
    with torch.device('meta'):
        assert sum(p.numel() for p in composer_model(cfg).parameters()) == params
    # DeepSpeed: the same YAML (checkpoints in the same object store), the same model, d_ffn included
    with pytest.raises(ConfigError, match=r"save_folder='gs://.*a folder or in an s3:// object store"):
        resolve(load_config(path, ['save_folder=gs://bucket/runs/x']))
    ds = resolve(cfg)
    assert (ds.save_dir, ds.autoresume, ds.data, ds.local_cache) == (
        cfg.save_folder,
        True,
        cfg.data.path,
        cfg.data.local_cache,
    )
    with torch.device('meta'):
        assert sum(p.numel() for p in build_model(ds).parameters()) == params


def test_deepspeed_loop_refuses_model_keys_it_would_drop():
    from prores_algo.training.deepspeed.settings import resolve

    qs = str(ROOT / 'yamls' / 'quickstart.yaml')
    assert resolve(load_config(qs, ['model.d_ffn=96'])).model.d_ffn == 96
    # the default: harmless
    assert resolve(load_config(qs, ['model.norm_eps=1e-5'])).model == resolve(load_config(qs)).model
    with pytest.raises(ConfigError, match=r"does not take \['tie_embeddings'\]"):
        resolve(load_config(qs, ['model.tie_embeddings=true']))


def test_deepspeed_cli_options_reach_the_loop_with_a_yaml(monkeypatch, tmp_path):
    """--micro_batch_size / --grad_accum / --local_cache / --record_samples pass through with --config, and the
    YAML's autoresume is kept unless --autoresume is given."""
    from prores_algo.training.deepspeed import loop as ds_train

    seen = {}

    def fake_train(config, options):
        seen.update(config=config, options=options)
        return {'rank': 1, 'final_eval_loss': None}

    monkeypatch.setattr(ds_train, 'train', fake_train)
    qs = str(ROOT / 'yamls' / 'quickstart.yaml')
    ds_train.main(
        [
            '--config',
            qs,
            '--micro_batch_size',
            '8',
            '--grad_accum',
            '2',
            '--local_cache',
            str(tmp_path),
            '--record_samples',
            'data.path=s3://bucket/ds',
            'autoresume=true',
            'save_folder=/shared/x',
        ]
    )
    config, options = seen['config'], seen['options']
    assert (options.micro_batch_size, options.grad_accum, config.data.local_cache, options.record_samples) == (
        8,
        2,
        str(tmp_path),
        True,
    )
    assert config.autoresume and config.data.path == 's3://bucket/ds' and config.save_folder == '/shared/x'
    ds_train.main(['--config', qs, 'data.local_cache=/yaml/cache'])
    config, options = seen['config'], seen['options']
    assert config.data.local_cache == '/yaml/cache' and options.micro_batch_size is None and not config.autoresume
