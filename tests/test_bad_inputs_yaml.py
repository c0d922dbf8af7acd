"""The bad-input matrix, the YAML entry: load_config (wrong types, unknown keys, out-of-range values, malformed files and
overrides) and build_trainer (unknown names, conflicting settings, a model without residual branches): one row per bad input, checked by
`tests.support.bad_inputs.run_case`."""

import pytest

from prores_algo.training.config import ConfigError, load_config
from tests.support.bad_inputs import (
    Bad,
    build,
    model_untouched,
    no_dataset,
    run_case,
    then,
    trainer_without_layers,
    truncate_shard,
    write,
    yaml_load,
)


def _yaml():
    d = no_dataset('d')
    return [
        # --- load_config ---------------------------------------------------------------------------------
        Bad(
            'yaml-typo-key',
            yaml_load('max_duraton=10ba'),
            ConfigError,
            (r"unknown key 'max_duraton'", r"did you mean 'max_duration'", r'valid keys here'),
        ),
        Bad(
            'yaml-nested-typo-key',
            yaml_load('data.seq_lenn=64'),
            ConfigError,
            (r"unknown key 'data\.seq_lenn'", r"did you mean 'data\.seq_len'"),
        ),
        Bad(
            'yaml-wrong-type',
            yaml_load('global_train_batch_size=abc'),
            ConfigError,
            (r"'global_train_batch_size'", r'valid integer', r"got 'abc'"),
        ),
        Bad(
            'yaml-unknown-precision',
            yaml_load('precision=fp64'),
            ConfigError,
            (r"'precision'", r"'fp32', 'amp_bf16', 'amp_fp16' or 'amp_fp8'", r"got 'fp64'"),
        ),
        Bad(
            'yaml-unknown-model-family',
            yaml_load('model.name=gpt5'),
            ConfigError,
            (r"'model\.name'", r"'reference' or 'hf_causal_lm'"),
        ),
        Bad(
            'yaml-batch-size-zero',
            yaml_load('global_train_batch_size=0'),
            ConfigError,
            (r"'global_train_batch_size'", r'must be a positive int'),
        ),
        Bad(
            'yaml-negative-lr',
            yaml_load('optimizer.lr=-1e-3'),
            ConfigError,
            (r"'optimizer\.lr'", r'positive finite number, e\.g\. 1\.0e-3'),
        ),
        Bad(
            'yaml-beta-out-of-range',
            yaml_load('optimizer.betas=[0.9,1.5]'),
            ConfigError,
            (r"'optimizer\.betas'", r'\[0, 1\), e\.g\. \[0\.9, 0\.95\]'),
        ),
        Bad(
            'yaml-bad-time-string',
            yaml_load('max_duration=forever'),
            ConfigError,
            (r"'max_duration'", r"e\.g\. '600ba'", r"got 'forever'"),
        ),
        Bad(
            'yaml-list-over-mapping',
            yaml_load('algorithms=[prores]'),
            ConfigError,
            (r"override 'algorithms=\[prores\]' cannot be applied", r'algorithms\.<name>=<value>'),
        ),
        Bad('yaml-bool-expected', yaml_load('autoresume=maybe'), ConfigError, (r"'autoresume'", r'valid boolean')),
        Bad(
            'yaml-override-without-equals',
            yaml_load('max_duration'),
            ConfigError,
            (r"override 'max_duration' must look like key=value", r'e\.g\. max_duration=100ba'),
        ),
        Bad(
            'yaml-top-level-not-mapping',
            then(write('list.yaml', '- a\n- b\n'), lambda c: load_config(c.tmp / 'list.yaml')),
            ConfigError,
            (r'list\.yaml', r'top level of the YAML must be a mapping'),
        ),
        Bad(
            'yaml-syntax-error',
            then(write('broken.yaml', 'model: [unclosed\n'), lambda c: load_config(c.tmp / 'broken.yaml')),
            ConfigError,
            (r'broken\.yaml: not valid YAML',),
        ),
        Bad(
            'yaml-missing-file',
            lambda c: load_config(c.tmp / 'nope.yaml'),
            ConfigError,
            (r"config file '.*nope\.yaml' not found", r'yamls/'),
        ),
        # --- build_trainer: names, conflicts (fail before any data is built) -------------------------------
        Bad(
            'build-unknown-algorithm',
            build('algorithms.prorez={}'),
            ConfigError,
            (r"algorithms: unknown name 'prorez'", r"did you mean 'prores'", r'available: \['),
            d,
        ),
        Bad(
            'build-unknown-algorithm-key',
            build('algorithms.prores.t_warmpu=10ba'),
            ConfigError,
            (r"algorithms\.prores: unknown key 't_warmpu'", r"did you mean 't_warmup'", r'accepted'),
            d,
        ),
        Bad(
            'build-unknown-prores-schedule',
            build('algorithms.prores.schedule=cosine'),
            ConfigError,
            (r'algorithms\.prores', r"unknown schedule 'cosine'", r"'linear'"),
            d,
        ),
        Bad(
            'build-unknown-scheduler',
            build('scheduler.name=wsdd'),
            ConfigError,
            (r"scheduler\.name: unknown scheduler 'wsdd'", r"did you mean 'wsd'", r'available'),
            d,
        ),
        Bad(
            'build-unknown-callback',
            build('callbacks.lr_monitr={}'),
            ConfigError,
            (r"callbacks: unknown name 'lr_monitr'", r"did you mean 'lr_monitor'"),
            d,
        ),
        Bad(
            'build-vocab-smaller-than-tokenizer',
            build('model.vocab_size=200'),
            ConfigError,
            (r'model\.vocab_size=200 is smaller than the tokenizer', r'set model\.vocab_size >= 257'),
            d,
        ),
        Bad(
            'build-seq-len-over-model',
            build('data.seq_len=4096'),
            ConfigError,
            (r'data\.seq_len=4096 exceeds model\.max_seq_len=128', r'raise model\.max_seq_len or lower data\.seq_len'),
            d,
        ),
        Bad(
            'build-model-norm',
            build('model.norm=middle'),
            ConfigError,
            (r'DecoderConfig\.norm must be one of', r"'pre', 'post'"),
            d,
        ),
        Bad(
            'build-parallelism-conflict',
            build('parallelism={fsdp: {}, fsdp2: {}}'),
            ConfigError,
            (r'parallelism: use one of fsdp', r'or fsdp2', r"\['fsdp', 'fsdp2'\]"),
            d,
        ),
        Bad(
            'build-no-data-no-source',
            build('data.source=null'),
            ConfigError,
            (r"data\.path='.*/d' does not exist and data\.source is null", r'`prores-data`', r'set data\.source'),
            d,
        ),
        Bad(
            'build-val-fraction',
            build('data.val_fraction=1.5'),
            ValueError,
            (r'`val_fraction` must be in \[0, 1\)',),
            d,
        ),
        # --- build_trainer on real data: conflicts found when the Trainer is assembled / starts -----------
        Bad(
            'build-delay-without-scheduler',
            build('scheduler=null', 'algorithms.prores.lr_warmup_delay=2ba', data=True, fit=True),
            ValueError,
            (
                r'lr_warmup_delay is set but the Trainer has no LR scheduler',
                r'set lr_warmup_delay to "0ba"',
                r'WSDScheduler',
            ),
        ),
        Bad(
            'trainer-model-without-residual-branches',
            trainer_without_layers,
            ValueError,
            (
                r'ProRes found no residual branch in ComposerClassifier',
                r"layer_class='YourBlock'",
                r"branches=\['attn.out_proj', 'mlp.down_proj'\]",
                r'register_policy',
            ),
            model_untouched,
        ),
        Bad(
            'build-truncated-shard',
            lambda c: build(f'data.path={truncate_shard(c)}', data=True)(c),
            ValueError,
            (r'shard .*shard\.00000\.mds.* has \d+ bytes but its index\.json lists \d+', r'truncated', r'--overwrite'),
        ),
    ]


CASES = _yaml()


@pytest.mark.parametrize('case', CASES, ids=lambda c: c.id)
def test_bad_input(case, tmp_path, request, capsys, monkeypatch):
    run_case(case, tmp_path, request, capsys, monkeypatch)
