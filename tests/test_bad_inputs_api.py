"""The bad-input matrix, the Python API: apply_prores / ProResController, the Composer algorithm ProRes, the alpha schedules,
register_policy, WSDScheduler / wsd_multiplier: one row per bad input, checked by
`tests.support.bad_inputs.run_case`."""

import pytest
from torch import nn

from prores_algo import alpha_schedules, apply_prores, register_policy
from tests.support.bad_inputs import (
    Bad,
    assert_hooks,
    keep_model,
    llama_policy_unchanged,
    model_untouched,
    policy_absent,
    run_case,
    schedules_unchanged,
    snapshot_schedules,
    then_set_back,
    tiny,
)


def _api():
    from prores_algo import ProRes, WSDScheduler, wsd_multiplier

    return [
        # --- apply_prores / the controller ------------------------------------------------------------
        Bad(
            'api-unknown-schedule',
            lambda c: keep_model(c, lambda m: apply_prores(m, 'cosine')),
            ValueError,
            (r"unknown schedule 'cosine'", r'`schedule`', r"'linear'", r'register'),
            model_untouched,
        ),
        Bad(
            'api-t_warmup-zero',
            lambda c: keep_model(c, lambda m: apply_prores(m, t_warmup=0)),
            ValueError,
            (r't_warmup', r'positive, finite number of steps'),
            model_untouched,
        ),
        Bad(
            'api-t_warmup-nan',
            lambda c: keep_model(c, lambda m: apply_prores(m, t_warmup=float('nan'))),
            ValueError,
            (r't_warmup', r'positive, finite'),
            model_untouched,
        ),
        Bad(
            'api-t_warmup-timestring',
            lambda c: keep_model(c, lambda m: apply_prores(m, t_warmup='24000ba')),
            ValueError,
            (r"t_warmup='24000ba'", r'number of steps', r'prores_algo\.ProRes'),
            model_untouched,
        ),
        Bad(
            'api-no-residual-branch',
            lambda c: apply_prores(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))),
            ValueError,
            (r'no residual branch', r"layer_class='YourBlock'", r"branches=\['attn.out_proj'", r'register_policy'),
        ),
        Bad(
            'api-branch-not-found',
            lambda c: keep_model(
                c, lambda m: apply_prores(m, layer_class='Block', branches=['attn.o_proj', 'mlp.nope'])
            ),
            ValueError,
            (r"branch 'mlp\.nope' not found", r'fix `branches`', r"'mlp\.down_proj'"),
            model_untouched,
        ),
        Bad(
            'api-branches-string',
            lambda c: keep_model(c, lambda m: apply_prores(m, branches='attn.o_proj')),
            ValueError,
            (r'branches must be a non-empty list', r"e\.g\. \['attn\.o_proj', 'mlp\.down_proj'\]"),
            model_untouched,
        ),
        Bad(
            'api-class-and-pattern',
            lambda c: keep_model(c, lambda m: apply_prores(m, layer_class='Block', layer_pattern='blocks.*')),
            ValueError,
            (r'either layer_class or layer_pattern, not both',),
            model_untouched,
        ),
        Bad(
            'api-layer-without-known-branches',
            lambda c: keep_model(c, lambda m: apply_prores(m, layer_class='Linear')),
            ValueError,
            (r'matched layer_class', r'pass branches=\[', r"register_policy\('Linear'"),
            model_untouched,
        ),
        Bad(
            'api-applied-twice',
            lambda c: keep_model(c, lambda m: (apply_prores(m), apply_prores(m))),
            ValueError,
            (r'already applied', r'call remove\(\) on the first controller'),
            lambda c: assert_hooks(c.state['model'], 4),
        ),
        Bad(
            'api-set_step-not-a-number',
            lambda c: apply_prores(tiny(), t_warmup=10).set_step('10'),
            ValueError,
            (r'step must be a number', r"got '10'"),
        ),
        Bad(
            'api-set_step-back-after-removal',
            lambda c: then_set_back(),
            RuntimeError,
            (r'cannot go back to step 3', r'Apply ProRes again to a fresh model'),
        ),
        # --- the Composer algorithm -------------------------------------------------------------------
        Bad(
            'algo-unknown-schedule',
            lambda c: ProRes(schedule='cosine'),
            ValueError,
            (r"unknown schedule 'cosine'", r"'linear_square'", r'aliases'),
        ),
        Bad(
            'algo-t_warmup-epochs',
            lambda c: ProRes(t_warmup='10ep'),
            ValueError,
            (r"t_warmup='10ep'", r'"24000ba"', r'"0\.2dur"'),
        ),
        Bad(
            'algo-t_warmup-over-whole-run',
            lambda c: ProRes(t_warmup='1.5dur'),
            ValueError,
            (r"t_warmup='1\.5dur'", r'fraction in \(0, 1\]'),
        ),
        Bad(
            'algo-t_warmup-garbage',
            lambda c: ProRes(t_warmup='soon'),
            ValueError,
            (r"t_warmup='soon' is not a Time string", r'e\.g\. "24000ba"'),
        ),
        Bad(
            'algo-t_warmup-zero',
            lambda c: ProRes(t_warmup='0ba'),
            ValueError,
            (r't_warmup must be positive', r'e\.g\. "24000ba"'),
        ),
        Bad(
            'algo-negative-lr-delay',
            lambda c: ProRes(lr_warmup_delay='-5ba'),
            ValueError,
            (r'lr_warmup_delay must be >= 0', r'e\.g\. "0ba"', r"'-5ba'"),
        ),
        Bad(
            'algo-log-interval',
            lambda c: ProRes(log_interval=0),
            ValueError,
            (r'log_interval must be a positive number of batches', r'e\.g\. 1 or "100ba"'),
        ),
        Bad(
            'algo-remove_when_done-not-bool',
            lambda c: ProRes(remove_when_done='no'),
            ValueError,
            (r'remove_when_done must be true or false', r"'no'"),
        ),
        # --- schedules --------------------------------------------------------------------------------
        Bad(
            'sched-layer-index',
            lambda c: alpha_schedules.alpha('linear', 4, 4, 10, 100),
            ValueError,
            (r'layer_index must be an int in \[0, 4\)', r'got 4'),
        ),
        Bad(
            'sched-warmup-negative',
            lambda c: alpha_schedules.alpha('linear', 0, 4, 10, -1),
            ValueError,
            (r'warmup_steps \(t_warmup\) must be a positive finite number',),
        ),
        Bad(
            'sched-register-existing-alias',
            snapshot_schedules(lambda c: alpha_schedules.register('sqrt', lambda *a: 1.0)),
            ValueError,
            (r"schedule 'sqrt' is already registered", r'overwrite=True'),
            schedules_unchanged,
        ),
        Bad(
            'sched-register-empty-name',
            snapshot_schedules(lambda c: alpha_schedules.register('', lambda *a: 1.0)),
            ValueError,
            (r'schedule name must be a non-empty string',),
            schedules_unchanged,
        ),
        Bad(
            'sched-name-not-a-string',
            lambda c: alpha_schedules.alpha(3, 0, 4, 1, 10),
            ValueError,
            (r'schedule must be a string', r"'linear'", r'got int 3'),
        ),
        # --- register_policy --------------------------------------------------------------------------
        Bad(
            'policy-overwrite-existing',
            lambda c: register_policy('LlamaDecoderLayer', ('attn.x', 'mlp.y')),
            ValueError,
            (r"policy for 'LlamaDecoderLayer' exists", r'overwrite=True'),
            llama_policy_unchanged,
        ),
        Bad(
            'policy-branches-as-string',
            lambda c: register_policy('MyBadBlock', 'attn.o_proj'),
            ValueError,
            (r'branches must be a non-empty list', r"e\.g\. \['attn\.o_proj', 'mlp\.down_proj'\]", r'got the string'),
            policy_absent('MyBadBlock'),
        ),
        Bad(
            'policy-empty-branches',
            lambda c: register_policy('MyBadBlock', []),
            ValueError,
            (r'branches must be a non-empty list', r'e\.g\.'),
            policy_absent('MyBadBlock'),
        ),
        Bad(
            'policy-empty-name',
            lambda c: register_policy('', ('a', 'b')),
            ValueError,
            (r'layer_class_name must be a non-empty class name',),
            policy_absent(''),
        ),
        # --- WSD ------------------------------------------------------------------------------------------
        Bad(
            'wsd-warmup-plus-decay-too-long',
            lambda c: wsd_multiplier(5, 100, 60, 60),
            ValueError,
            (r'warmup \(60\)', r'decay \(60\)', r'warmup \+ decay <= max_steps \(100\)'),
        ),
        Bad(
            'wsd-scheduler-bad-time',
            lambda c: WSDScheduler(lr_warmup='soon'),
            ValueError,
            (r"lr_warmup='soon'", r'e\.g\. "24000ba"'),
        ),
        Bad(
            'wsd-scheduler-alpha_f',
            lambda c: WSDScheduler(alpha_f='x'),
            ValueError,
            (r'alpha_f \(the final LR multiplier\)', r'e\.g\. 0\.0'),
        ),
    ]


CASES = _api()


@pytest.mark.parametrize('case', CASES, ids=lambda c: c.id)
def test_bad_input(case, tmp_path, request, capsys, monkeypatch):
    run_case(case, tmp_path, request, capsys, monkeypatch)
