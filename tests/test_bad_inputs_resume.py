"""The bad-input matrix, resuming under a different ProRes configuration (Composer load_path and autoresume, DeepSpeed): one row per bad input, checked by
`tests.support.bad_inputs.run_case`."""

import pytest

from tests.support.bad_inputs import (
    ZERO3_JSON,
    Bad,
    autoresume_copy,
    autoresume_folder_unchanged,
    composer_resume,
    ds_train,
    fake_ds_checkpoint,
    no_process_group,
    resume_refused_and_weights_only_works,
    run_case,
    then,
)


def _resume():
    return [
        Bad(
            'resume-composer-other-t_warmup',
            composer_resume(
                'algorithms.prores.t_warmup=8ba',
                'load_path={ckpt}/ep0-ba2-rank0.pt',
                'save_folder={tmp}/new_ckpt',
                'save_interval=1ba',
            ),
            ValueError,
            (
                r'cannot resume from this checkpoint: it was trained with a different ProRes configuration',
                r"t_warmup: checkpoint '4ba' vs now '8ba'",
                r'Resume with the same ProRes settings',
                r'load_weights_only=True',
            ),
            resume_refused_and_weights_only_works,
        ),
        Bad(
            'resume-composer-autoresume-other-schedule',
            lambda c: composer_resume(
                'algorithms.prores.schedule=equal',
                'autoresume=true',
                'run_name=ckpt-run',
                f'save_folder={autoresume_copy(c)}',
                'save_interval=1ba',
            )(c),
            ValueError,
            (r"schedule: checkpoint 'linear' vs now 'equal'", r'Resume with the same ProRes settings'),
            autoresume_folder_unchanged,
        ),
        Bad(
            'resume-deepspeed-other-t_warmup',
            then(
                fake_ds_checkpoint,
                ds_train(
                    {
                        'deepspeed_config': str(ZERO3_JSON),
                        'n_layers': 4,
                        'd_model': 32,
                        'seq_len': 16,
                        'vocab_size': 64,
                        'steps': 8,
                        't_warmup': 16,
                        'load_dir': '{tmp}/ds_ckpt',
                    }
                ),
            ),
            ValueError,
            (
                r'different ProRes configuration',
                r"differs in \['t_warmup'\]",
                r't_warmup=8\.0',
                r't_warmup=16\.0',
                r"Resume with the checkpoint's ProRes settings",
            ),
            no_process_group,
        ),
    ]


CASES = _resume()


@pytest.mark.parametrize('case', CASES, ids=lambda c: c.id)
def test_bad_input(case, tmp_path, request, capsys, monkeypatch):
    run_case(case, tmp_path, request, capsys, monkeypatch)
