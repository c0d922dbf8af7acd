"""t_warmup='auto': W = min(1000·L, 0.25·run) in every front end, resolved once, kept on resume.

Both sides of the cap: a short run gets a quarter of the run, a long run the paper's 1000 steps per
layer. A W / L below MIN_STEPS_PER_LAYER warns once, naming the cap; otherwise no warning.
"""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from composer import Callback
from composer.loggers import InMemoryLogger

from prores_algo import ProRes, alpha_schedules, apply_prores
from prores_algo.timing import auto_warmup_steps
from tests.support.helpers import tiny_composer_model

L = 4  # tiny_composer_model's layers
LONG = 20000  # 0.25 · LONG > 1000 · L: the paper's W


def _prores_warnings(record):
    return [str(w.message) for w in record if 'ProRes t_warmup' in str(w.message)]


class StopAt(Callback):
    def __init__(self, batch):
        self.batch = batch

    def batch_end(self, state, logger):
        if int(state.timestamp.batch) >= self.batch:
            state.stop_training()


# --- the rule ---------------------------------------------------------------------------------------------
def test_rule_both_sides_of_the_cap_whole_steps():
    assert auto_warmup_steps(4, 12) == 3  # 0.25 · 12
    assert auto_warmup_steps(4, 10) == 2  # 2.5 rounds to a whole step
    assert auto_warmup_steps(4, LONG) == 4000  # 1000 · L
    assert auto_warmup_steps(24, 100_000) == 24000
    assert auto_warmup_steps(24, 2000) == 500
    assert auto_warmup_steps(4, 1) == 1  # never 0
    for bad in (0, -5, None, float('inf'), True):
        with pytest.raises(ValueError, match='run length'):
            auto_warmup_steps(4, bad)


# --- apply_prores / the DeepSpeed helper ------------------------------------------------------------------
@pytest.mark.parametrize('total, expected', [(12, 3), (4000, 1000), (LONG, 4000)])
def test_apply_prores_auto(total, expected):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        c = apply_prores(tiny_composer_model().model, t_warmup='auto', total_steps=total)
    assert c.warmup_steps == expected
    msgs = _prores_warnings(rec)
    if expected / L < alpha_schedules.MIN_STEPS_PER_LAYER:
        assert len(msgs) == 1, msgs
        assert "t_warmup='auto'" in msgs[0] and f'W / L = {expected / L:.3g}' in msgs[0]
        assert f'W = {1000 * L}' in msgs[0] and f'quarter of the run ({total} steps long)' in msgs[0]
    else:
        assert msgs == []


def test_apply_prores_auto_needs_total_steps():
    with pytest.raises(ValueError, match='total_steps'):
        apply_prores(tiny_composer_model().model, t_warmup='auto')


@pytest.mark.parametrize('total, expected', [(12, 3), (LONG, 4000)])
def test_deepspeed_helper_auto(total, expected):
    from prores_algo.integrations.deepspeed import apply_prores

    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        p = apply_prores(tiny_composer_model().model, t_warmup='auto', total_steps=total)
    assert p.t_warmup == expected and p.state()['t_warmup'] == float(expected)
    with pytest.raises(ValueError, match='total_steps'):
        apply_prores(tiny_composer_model().model, t_warmup='auto')
    with pytest.raises(ValueError, match="time_unit='steps'"):
        apply_prores(tiny_composer_model().model, t_warmup='auto', total_steps=total, time_unit='samples')


# --- the DeepSpeed entry: YAML, flat flag, resume -----------------------------------------------------------
@pytest.mark.parametrize('steps, expected', [(12, 3), (LONG, 4000)])
def test_deepspeed_entry_resolves_auto(steps, expected, tmp_path):
    from prores_algo.training.deepspeed.cli import parse
    from prores_algo.training.deepspeed.settings import from_flat, from_yaml, resolve
    from tests.integrations.test_deepspeed import ROOT

    flat = resolve(from_flat({'n_layers': L, 'steps': steps, 't_warmup': 'auto'})[0])
    assert flat.t_warmup == expected
    cli = resolve(parse(['--n_layers', str(L), '--steps', str(steps), '--prores_warmup', 'auto'])[0])
    assert cli.t_warmup == expected
    yaml = resolve(
        from_yaml(
            str(ROOT / 'yamls' / 'quickstart.yaml'),
            [
                f'data.path={tmp_path}/d',
                f'model.n_layers={L}',
                f'max_duration={steps}ba',
                'algorithms.prores.t_warmup=auto',
            ],
        )[0]
    )
    assert yaml.t_warmup == expected


def test_deepspeed_flag_rejects_garbage(capsys):
    from prores_algo.training.deepspeed.cli import parse

    with pytest.raises(SystemExit) as e:
        parse(['--prores_warmup', 'soon'])
    assert e.value.code == 2
    assert "'auto'" in capsys.readouterr().err


@pytest.fixture
def no_dist_env(monkeypatch):
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(k, raising=False)


def test_deepspeed_entry_resume_keeps_recorded_auto_warmup(tmp_path, no_dist_env):
    """A checkpoint of a 12-step 'auto' run (W = 3) resumed as a 40-step run keeps W = 3 (the new run
    length alone would give 10); an explicit other W is still refused."""
    from prores_algo.training.deepspeed.loop import _prepare
    from prores_algo.training.deepspeed.settings import from_flat
    from tests.integrations.test_deepspeed import ZERO3_JSON

    ckpt = tmp_path / 'ckpt'
    (ckpt / 'global_step4').mkdir(parents=True)
    (ckpt / 'latest').write_text('global_step4')
    record = {'enabled': True, 'schedule': 'linear', 't_warmup': 3.0, 'num_layers': L, 'time_unit': 'steps'}
    (ckpt / 'global_step4' / 'prores.json').write_text(json.dumps(record))
    base = {'deepspeed_config': str(ZERO3_JSON), 'n_layers': L, 'd_model': 32, 'seq_len': 16, 'vocab_size': 64}
    plan = _prepare(*from_flat({**base, 'steps': 40, 't_warmup': 'auto', 'load_dir': str(ckpt)}))[0]
    assert plan.t_warmup == 3.0
    with pytest.raises(ValueError, match='different ProRes configuration'):
        _prepare(*from_flat({**base, 'steps': 40, 't_warmup': 10, 'load_dir': str(ckpt)}))


# --- Composer: a real Trainer --------------------------------------------------------------------------------
def test_composer_auto_short_run_quarter_of_run_warns_once_and_logs():
    from tests.integrations.test_composer import make_trainer

    mem = InMemoryLogger()
    algo = ProRes(t_warmup='auto')
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        trainer = make_trainer(algo, max_duration='12ba', loggers=[mem])
        assert algo.controller.warmup_steps is None  # resolved at FIT_START
        trainer.fit()
    assert algo.controller.warmup_steps == 3
    assert mem.hyperparameters['prores/warmup_steps'] == 3.0
    assert mem.hyperparameters['prores/t_warmup'] == 'auto'
    msgs = _prores_warnings(rec)
    assert len(msgs) == 1 and "t_warmup='auto'" in msgs[0] and 'W / L = 0.75' in msgs[0], msgs
    assert algo.state_dict()['config']['warmup_steps'] == 3.0


def test_composer_auto_epochs_convert_like_dur():
    from tests.integrations.test_composer import make_trainer

    algo = ProRes(t_warmup='auto')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        trainer = make_trainer(algo, max_duration='1ep', callbacks=[StopAt(1)])  # 16 batches per epoch
        trainer.fit()
    assert algo.controller.warmup_steps == 4


def test_composer_auto_long_run_is_1000_per_layer_no_warning():
    from tests.integrations.test_composer import make_trainer

    algo = ProRes(t_warmup='auto')
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        make_trainer(algo, max_duration=f'{LONG}ba', callbacks=[StopAt(1)]).fit()
    assert algo.controller.warmup_steps == 1000 * L
    assert _prores_warnings(rec) == []


def test_composer_auto_tokens_max_duration_is_refused():
    from tests.integrations.test_composer import make_trainer

    with pytest.raises(ValueError, match="t_warmup='auto' needs max_duration in batches or epochs"):
        make_trainer(ProRes(t_warmup='auto'), max_duration='1000tok').fit()


def test_composer_auto_resume_with_longer_max_duration_keeps_w_and_alpha(tmp_path):
    from tests.integrations.test_composer import RecordAlphas, make_trainer

    def run(max_duration, stop, **kw):
        rec, algo = RecordAlphas(), ProRes(t_warmup='auto')
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            make_trainer(algo, max_duration=max_duration, callbacks=[rec, StopAt(stop)], **kw).fit()
        return algo, rec

    straight, rec_straight = run('32ba', 8)  # W = 8
    assert straight.controller.warmup_steps == 8
    run('32ba', 4, save_folder=str(tmp_path / 'ckpt'), save_interval='4ba')
    resumed, rec_resumed = run('64ba', 8, load_path=str(tmp_path / 'ckpt' / 'ep0-ba4-rank0.pt'))  # alone: W = 16
    assert resumed.controller.warmup_steps == 8
    assert [b for b, _ in rec_resumed.seen] == [4, 5, 6, 7]
    assert rec_resumed.seen == rec_straight.seen[4:8]
    assert any(0 < v < 1 for _, buffers in rec_resumed.seen for v in buffers.values())  # mid-warmup


# --- Hugging Face: the callback in a real Trainer -----------------------------------------------------------
def test_hf_trainer_auto_short_run_warns_once_and_logs(tmp_path):
    import transformers as T

    from prores_algo.integrations.hf import ProResCallback
    from tests.support.hf import NUM_LAYERS as HF_L
    from tests.support.hf import hf_args, hf_tokens, tiny_llama

    cb = ProResCallback(t_warmup='auto')
    trainer = T.Trainer(model=tiny_llama(), args=hf_args(tmp_path, 8, save_strategy='no'), train_dataset=hf_tokens())
    cb.install(trainer)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        trainer.train()
    assert cb.controller.warmup_steps == 2  # 0.25 · 8
    logs = [h for h in trainer.state.log_history if 'prores/warmup_steps' in h]
    assert len(logs) == 1 and logs[0]['prores/warmup_steps'] == 2.0
    msgs = _prores_warnings(rec)
    assert len(msgs) == 1 and f'W / L = {2 / HF_L:.3g}' in msgs[0], msgs


def test_hf_callback_auto_long_run_no_warning():
    from transformers.trainer_callback import TrainerControl, TrainerState

    from prores_algo.integrations.hf import ProResCallback
    from tests.support.hf import NUM_LAYERS as HF_L
    from tests.support.hf import tiny_llama

    state = TrainerState()
    state.global_step, state.max_steps = 0, LONG
    cb = ProResCallback(t_warmup='auto')
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        cb.on_train_begin(None, state, TrainerControl(), model=tiny_llama())
    assert cb.controller.warmup_steps == 1000 * HF_L
    assert _prores_warnings(rec) == []
    state.max_steps = None
    with pytest.raises(ValueError, match="t_warmup='auto' needs the total number"):
        ProResCallback(t_warmup='auto').on_train_begin(None, state, TrainerControl(), model=tiny_llama())


def test_hf_trainer_auto_resume_with_larger_max_steps_keeps_w(tmp_path):
    import transformers as T

    from prores_algo.integrations.hf import ProResCallback
    from tests.support.hf import StepRecorder, hf_args, hf_tokens, record_forwards, tiny_llama

    class StopAtStep(T.TrainerCallback):
        def __init__(self, step):
            self.step = step

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= self.step:
                control.should_training_stop = True

    args = hf_args(tmp_path, 16, save_strategy='steps', save_steps=2)  # W = 4
    cb = ProResCallback(t_warmup='auto')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        T.Trainer(model=tiny_llama(), args=args, train_dataset=hf_tokens(), callbacks=[cb, StopAtStep(2)]).train()
    assert cb.controller.warmup_steps == 4
    cb2, rec = ProResCallback(t_warmup='auto'), StepRecorder()
    model2 = tiny_llama()
    seen = record_forwards(model2, rec)
    args2 = hf_args(tmp_path, 32, save_strategy='no')  # alone: W = 8
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        T.Trainer(model=model2, args=args2, train_dataset=hf_tokens(), callbacks=[cb2, rec, StopAtStep(3)]).train(
            resume_from_checkpoint=str(tmp_path / 'checkpoint-2')
        )
    assert cb2.controller.warmup_steps == 4
    step, alphas = seen[0]
    assert step == 2 and alphas == {
        i: pytest.approx(a) for i, a in enumerate(alpha_schedules.alphas('linear', 3, 2, 4))
    }


# --- prores-preview ------------------------------------------------------------------------------------------
def _preview(*args):

    return subprocess.run(
        [sys.executable, '-m', 'prores_algo.preview', '--layers', '24', '--steps', '2', *args],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    'args, per_layer, share, warns',
    [
        (['--t_warmup', '0.3dur', '--max_duration', '2000ba'], '25', '30% of the run (2000 steps)', True),
        (['--t_warmup', '24000ba'], '1000', None, False),
        (['--t_warmup', 'auto', '--max_duration', '2000ba'], '20.8333', '25% of the run', True),
        (['--t_warmup', 'auto', '--max_duration', '200000'], '1000', '12% of the run', False),
    ],
)
def test_preview_time_strings_and_auto(args, per_layer, share, warns):
    out = _preview(*args)
    assert out.returncode == 0, out.stderr
    assert f'W / L = {per_layer} steps per layer' in out.stdout
    if share:
        assert share in out.stdout
    assert ('warning: ProRes t_warmup' in out.stderr) == warns
    if warns and 'auto' in args:
        assert 'quarter of the run' in out.stderr


@pytest.mark.parametrize(
    'args, flag',
    [
        (['--t_warmup', 'garbage'], '--t_warmup'),
        (['--t_warmup', 'auto'], '--max_duration'),
        (['--t_warmup', '0.3dur', '--max_duration', 'soon'], '--max_duration'),
        (['--t_warmup', '1.5dur', '--max_duration', '100'], '--t_warmup'),
    ],
)
def test_preview_rejects_garbage_in_one_line(args, flag):
    out = _preview(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and 'error' in lines[0], out.stderr
    assert out.stdout == ''
