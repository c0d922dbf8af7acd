"""The bad-input matrix, the DeepSpeed path (conflicting DeepSpeed JSON, the loop's options): one row per bad input, checked by
`tests.support.bad_inputs.run_case`."""

import pytest

from tests.support.bad_inputs import (
    ZERO3_JSON,
    Bad,
    ds_json,
    ds_train,
    no_process_group,
    run_case,
)


def _deepspeed():
    from prores_algo.integrations.deepspeed import check_deepspeed_config, lr_lambda_from

    return [
        Bad(
            'ds-micro-batch-conflict',
            lambda c: check_deepspeed_config(ds_json(), train_micro_batch_size_per_gpu=3),
            ValueError,
            (
                r'`train_micro_batch_size_per_gpu` = 2 but the training config asks for 3',
                r'set "train_micro_batch_size_per_gpu": 3',
            ),
        ),
        Bad(
            'ds-batch-product-conflict',
            lambda c: check_deepspeed_config(ds_json(train_batch_size=6), world_size=2),
            ValueError,
            (r'`train_batch_size` = 6', r'set "train_batch_size": 8'),
        ),
        Bad(
            'ds-stage3-required',
            lambda c: check_deepspeed_config(ds_json(zero_optimization={'stage': 2}), require_stage3=True),
            ValueError,
            (r'`zero_optimization\.stage` = 2', r'"stage": 3'),
        ),
        Bad(
            'ds-lr-schedule-unknown',
            lambda c: lr_lambda_from('nope', max_steps=10),
            ValueError,
            (r"unknown scheduler 'nope'", r"'wsd'"),
        ),
        Bad(
            'ds-train-scheduler-in-json',
            ds_train({'deepspeed_config': ds_json(scheduler={'type': 'WarmupLR'})}),
            ValueError,
            (r'DeepSpeed config `scheduler` is set', r'remove "scheduler" from the JSON'),
            no_process_group,
        ),
        Bad(
            'ds-train-lr-conflict',
            ds_train({'deepspeed_config': ds_json(optimizer={'type': 'AdamW', 'params': {'lr': 1e-3}}), 'lr': 2e-3}),
            ValueError,
            (r'`optimizer\.params\.lr` = 0\.001 but lr = 0\.002', r'set one of them'),
            no_process_group,
        ),
        Bad(
            'ds-train-unknown-option',
            ds_train({'deepspeed_config': str(ZERO3_JSON), 'n_layer': 3}),
            ValueError,
            (r"unknown ds_train option\(s\) \['n_layer'\]", r"'n_layers'"),
            no_process_group,
        ),
    ]


CASES = _deepspeed()


@pytest.mark.parametrize('case', CASES, ids=lambda c: c.id)
def test_bad_input(case, tmp_path, request, capsys, monkeypatch):
    run_case(case, tmp_path, request, capsys, monkeypatch)
