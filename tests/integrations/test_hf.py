"""ProResCallback in a real `transformers.Trainer` (CPU), with gradient accumulation and with DeepSpeed ZeRO-3.

`transformers.Trainer` needs the `accelerate` package (TrainingArguments raises ImportError without it);
where it is missing the real-Trainer tests are skipped and the Trainer-free tests below still drive the
callback through transformers' own CallbackHandler in the Trainer's event order.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as T
from transformers.trainer_callback import TrainerControl, TrainerState

from prores_algo import alpha_schedules
from prores_algo.export import fold_prores
from prores_algo.integrations.hf import ProResCallback, unwrap_model
from prores_algo.surgery import ALPHA_BUFFER, has_prores_hook
from tests.support.helpers import free_port
from tests.support.hf import (
    NUM_LAYERS as L,
)
from tests.support.hf import (
    StepRecorder,
    alpha_by_layer,
    hf_args,
    hf_tokens,
    record_forwards,
    simulated_train,
    tiny_llama,
)

REPO = Path(__file__).resolve().parents[2]
HAVE_ACCELERATE = importlib.util.find_spec('accelerate') is not None
needs_accelerate = pytest.mark.skipif(
    not HAVE_ACCELERATE, reason='transformers.Trainer requires the `accelerate` package (not installed here)'
)


def check_alphas(seen, warmup, grad_accum):
    steps = [s for s, _ in seen]
    # every optimizer step runs `grad_accum` micro-batch forwards, all with the same α
    assert steps == sorted(steps) and all(steps.count(s) == grad_accum for s in set(steps)), steps
    for step, alphas in seen:
        if step < warmup:
            assert alphas == {
                i: pytest.approx(a, abs=1e-7) for i, a in enumerate(alpha_schedules.alphas('linear', L, step, warmup))
            }, step
        else:
            assert alphas == {}, f'hooks must be removed once t >= W (step {step})'


# --- a real transformers.Trainer -------------------------------------------------------------------


@needs_accelerate
def test_real_trainer_gradient_accumulation_alpha_per_optimizer_step(tmp_path):
    model = tiny_llama()
    cb, rec = ProResCallback(t_warmup=6), StepRecorder()
    seen = record_forwards(model, rec)
    args = hf_args(tmp_path, 9, gradient_accumulation_steps=2)
    trainer = T.Trainer(model=model, args=args, train_dataset=hf_tokens(), callbacks=[cb, rec])
    trainer.train()
    assert [s for s, _ in seen][::2] == list(range(9))
    check_alphas(seen, warmup=6, grad_accum=2)
    logs = [h for h in trainer.state.log_history if 'loss' in h]
    assert len(logs) == 9 and all(torch.isfinite(torch.tensor(h['loss'])) for h in logs)
    # log of step n (written after optimizer step n-1) carries the α that step trained with
    for h in logs:
        assert h['prores/alpha/layer_2'] == pytest.approx(alpha_schedules.alpha('linear', 2, L, h['step'] - 1, 6))
    assert cb.controller.removed and cb.controller.num_hooks == 0
    assert not any(has_prores_hook(m) for m in model.modules())
    # the α buffers stay as inert 1.0 (a DDP wrapper keeps finding them), outside state_dict
    assert all(float(b) == 1.0 for n, b in model.named_buffers() if n.endswith(ALPHA_BUFFER))
    assert not any(k.endswith(ALPHA_BUFFER) for k in model.state_dict())


@needs_accelerate
def test_real_trainer_install_puts_callback_before_reporters_and_resume_keeps_alpha(tmp_path):
    model = tiny_llama()
    args = hf_args(tmp_path, 4, save_strategy='steps', save_steps=2)
    cb = ProResCallback(t_warmup='1.0dur')
    trainer = T.Trainer(model=model, args=args, train_dataset=hf_tokens())
    cb.install(trainer)
    assert trainer.callback_handler.callbacks[0] is cb
    trainer.train()
    assert cb.controller.warmup_steps == 4
    # resume from the step-2 checkpoint with a fresh model and callback: α continues from step 2
    model2, cb2, rec = tiny_llama(), ProResCallback(t_warmup='1.0dur'), StepRecorder()
    seen = record_forwards(model2, rec)
    trainer2 = T.Trainer(model=model2, args=args, train_dataset=hf_tokens(), callbacks=[cb2, rec])
    trainer2.train(resume_from_checkpoint=str(tmp_path / 'checkpoint-2'))
    assert [s for s, _ in seen] == [2, 3]
    check_alphas(seen, warmup=4, grad_accum=1)


def _short(rec):
    return [str(w.message) for w in rec if 'steps of alpha warmup per layer' in str(w.message)]


def _tiny_gpt2():
    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=L, n_head=2, resid_pdrop=0.1, embd_pdrop=0.1)
    return T.GPT2LMHeadModel(cfg)


@needs_accelerate
def test_real_trainer_measures_the_first_batch_and_changes_no_number(tmp_path):
    """measure_init (default): the head (8 of 12 samples) of the first *training* batch is measured before its
    forward, though an evaluation runs first (eval_on_start); the first training log carries prores/init/*,
    the advice is the measured one; a GPT-2 with dropout, over two epochs, gives every loss exactly as the
    run without the measurement (no random number drawn, the data order untouched)."""
    import warnings

    from prores_algo.measures import branch_to_stream_ratio
    from prores_algo.warmup_advice import INIT_RATIO_METRIC, MEASURE_SAMPLES

    runs = {}
    for measure in (True, False):
        cb = ProResCallback(t_warmup=8, measure_init=measure)
        args = hf_args(
            tmp_path / str(measure),
            8,
            per_device_train_batch_size=12,
            eval_strategy='steps',
            eval_steps=100,
            eval_on_start=True,
            per_device_eval_batch_size=4,
        )
        data, val = hf_tokens(), hf_tokens(n=8, seed=1)
        trainer = T.Trainer(model=_tiny_gpt2(), args=args, train_dataset=data, eval_dataset=val, callbacks=[cb])
        first = next(iter(trainer.get_train_dataloader()))  # the sampler is seeded: the batch training will see
        head = {k: v[:MEASURE_SAMPLES] for k, v in first.items()}
        expected = branch_to_stream_ratio(_tiny_gpt2(), **head)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter('always')
            trainer.train()
        logs = [h for h in trainer.state.log_history if 'loss' in h]
        runs[measure] = (cb, logs, _short(rec), expected)
    cb, logs, short, expected = runs[True]
    assert len(logs) == 8 and first['input_ids'].shape[0] == 12
    assert cb.init_measure.ratio == pytest.approx(expected['median'], rel=1e-6)
    assert cb.init_measure.normalised_stream is False and cb.controller.init_measure == cb.init_measure
    assert logs[0][INIT_RATIO_METRIC] == cb.init_measure.ratio and INIT_RATIO_METRIC not in logs[1]
    assert len(short) == 1 and 'branches start at' in short[0]
    off_cb, off_logs, off_short, _ = runs[False]
    assert off_cb.init_measure is None and INIT_RATIO_METRIC not in off_logs[0]
    assert len(off_short) == 1 and 'the model was not measured' in off_short[0]
    assert [h['loss'] for h in logs] == [h['loss'] for h in off_logs]  # the extra pass changes nothing


@needs_accelerate
def test_real_trainer_logs_the_measurement_without_alpha_logs(tmp_path):
    from prores_algo.warmup_advice import INIT_RATIO_METRIC

    cb = ProResCallback(t_warmup=400, log_alphas=False)
    trainer = T.Trainer(model=tiny_llama(), args=hf_args(tmp_path, 2), train_dataset=hf_tokens(), callbacks=[cb])
    trainer.train()
    logs = [h for h in trainer.state.log_history if 'loss' in h]
    assert logs[0][INIT_RATIO_METRIC] == cb.init_measure.ratio and 'prores/alpha/mean' not in logs[0]


@needs_accelerate
def test_real_trainer_resume_repeats_the_measured_advice(tmp_path):
    import warnings

    args = hf_args(tmp_path, 4, save_strategy='steps', save_steps=2)
    cb = ProResCallback(t_warmup=8)
    T.Trainer(model=tiny_llama(), args=args, train_dataset=hf_tokens(), callbacks=[cb]).train()
    cb2 = ProResCallback(t_warmup=8)
    trainer2 = T.Trainer(model=tiny_llama(), args=args, train_dataset=hf_tokens(), callbacks=[cb2])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        trainer2.train(resume_from_checkpoint=str(tmp_path / 'checkpoint-2'))
    assert cb2.init_measure == cb.init_measure and cb2.controller.init_measure == cb.init_measure
    assert len(_short(rec)) == 1 and 'branches start at' in _short(rec)[0]


def test_measure_init_must_be_a_bool():
    with pytest.raises(ValueError, match='measure_init must be true or false'):
        ProResCallback(measure_init='yes')


DS_SCRIPT = textwrap.dedent("""
    import json, sys, tempfile
    import torch, transformers as T
    sys.path.insert(0, sys.argv[1])
    from prores_algo.integrations.hf import ProResCallback
    from tests.support.hf import StepRecorder, hf_tokens, record_forwards, tiny_llama
    ds_config = {'train_micro_batch_size_per_gpu': 'auto', 'gradient_accumulation_steps': 'auto',
                 'train_batch_size': 'auto', 'gradient_clipping': 'auto',
                 'zero_optimization': {'stage': 3, 'stage3_param_persistence_threshold': 0},
                 'zero_force_ds_cpu_optimizer': False}
    args = T.TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, deepspeed=ds_config, max_steps=6,
                               per_device_train_batch_size=2, gradient_accumulation_steps=2, report_to=[],
                               logging_steps=1, save_strategy='no', learning_rate=1e-3, disable_tqdm=True, seed=0)
    model = tiny_llama()
    cb, rec = ProResCallback(t_warmup=4), StepRecorder()
    from prores_algo.integrations.hf import ResidualMonitorCallback
    mon = ResidualMonitorCallback(log_interval=2, spike_window=2)
    seen = record_forwards(model, rec)
    trainer = T.Trainer(model=model, args=args, train_dataset=hf_tokens(), callbacks=[cb, rec, mon])
    trainer.train()
    engine = trainer.model_wrapped
    logs = [h for h in trainer.state.log_history if 'loss' in h]
    print('RESULT ' + json.dumps({'engine': type(engine).__name__, 'stage': engine.zero_optimization_stage(),
                                  'seen': seen, 'removed': cb.controller.removed,
                                  'rms': [h.get('residual_monitor/rms/layer_2') for h in logs],
                                  'grad_norm_logged': any('residual_monitor/grad_norm/layer_0' in h for h in logs),
                                  'loss_spikes': logs[-1].get('residual_monitor/loss_spikes'),
                                  'losses': [h['loss'] for h in trainer.state.log_history if 'loss' in h]}))
""")


@needs_accelerate
@pytest.mark.timeout(600)
def test_real_trainer_deepspeed_zero3_cpu_single_process(tmp_path):
    """HF Trainer + DeepSpeed ZeRO-3 on CPU, one process (gloo/ccl-free: DeepSpeed's CPU accelerator)."""
    pytest.importorskip('deepspeed')
    script = tmp_path / 'ds_hf.py'
    script.write_text(DS_SCRIPT)
    env = {
        **os.environ,
        'MASTER_ADDR': '127.0.0.1',
        'MASTER_PORT': str(free_port()),
        'RANK': '0',
        'WORLD_SIZE': '1',
        'LOCAL_RANK': '0',
        'LOCAL_WORLD_SIZE': '1',
        'OMP_NUM_THREADS': '1',
        'PYTHONPATH': os.pathsep.join(p for p in [str(REPO), os.environ.get('PYTHONPATH', '')] if p),
    }
    proc = subprocess.run(
        [sys.executable, str(script), str(REPO)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540
    )
    line = next((l for l in proc.stdout.splitlines() if l.startswith('RESULT ')), None)
    assert proc.returncode == 0 and line, f'stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}'
    result = json.loads(line[len('RESULT ') :])
    assert result['engine'] == 'DeepSpeedEngine' and result['stage'] == 3
    seen = [(s, {int(k): v for k, v in a.items()}) for s, a in result['seen']]
    assert [s for s, _ in seen] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    check_alphas(seen, warmup=4, grad_accum=2)
    assert result['removed'] and len(result['losses']) == 6
    # the monitor under ZeRO-3: residual RMS on measured steps 0, 2, 4; per-layer grads are partitioned
    assert [r is not None for r in result['rms']] == [True, False] * 3 and all(r > 0 for r in result['rms'][::2])
    assert result['grad_norm_logged'] is False and result['loss_spikes'] == 0
    assert all(torch.isfinite(torch.tensor(result['losses'])))


# --- Trainer-free: transformers' CallbackHandler driven in Trainer.train's event order ------------------


def test_callback_event_order_gradient_accumulation_without_trainer():
    model = tiny_llama()
    cb, rec = ProResCallback(t_warmup=5), StepRecorder()
    seen = record_forwards(model, rec)
    state, losses = simulated_train(model, [cb, rec], steps=7, grad_accum=3)
    check_alphas(seen, warmup=5, grad_accum=3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert state.log_history[2]['prores/alpha/layer_1'] == pytest.approx(alpha_schedules.alpha('linear', 1, L, 2, 5))
    assert cb.controller.removed


def test_resume_midway_starts_at_global_step_alpha():
    model = tiny_llama()
    cb, rec = ProResCallback(t_warmup=6, schedule='linear_square'), StepRecorder()
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append((rec.step, alpha_by_layer(m))))
    simulated_train(model, [cb, rec], steps=5, grad_accum=1, start_step=3)
    assert [s for s, _ in seen] == [3, 4]
    for step, alphas in seen:
        assert alphas == {
            i: pytest.approx(a) for i, a in enumerate(alpha_schedules.alphas('linear_square', L, step, 6))
        }


def test_unwrap_compiled_and_fold_through_callback():
    model = tiny_llama()
    compiled = torch.compile(model)  # lazily compiled: wrapping costs nothing until called
    assert unwrap_model(compiled) is model
    cb = ProResCallback(t_warmup=8)
    state = TrainerState()
    state.global_step, state.max_steps = 3, 10
    cb.on_train_begin(None, state, TrainerControl(), model=compiled)
    assert cb.model is model and cb.alphas == pytest.approx(alpha_schedules.alphas('linear', L, 3, 8))
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        hooked = model(input_ids=ids).logits
        assert fold_prores(cb) is model
        torch.testing.assert_close(model(input_ids=ids).logits, hooked, rtol=0, atol=1e-5)


def test_default_and_fractional_warmup_and_validation():
    state = TrainerState()
    state.global_step, state.max_steps = 0, 200
    cb = ProResCallback()
    cb.on_train_begin(None, state, TrainerControl(), model=tiny_llama())
    assert cb.controller.warmup_steps == 1000 * L
    cb = ProResCallback(t_warmup='0.25dur')
    cb.on_train_begin(None, state, TrainerControl(), model=tiny_llama())
    assert cb.controller.warmup_steps == 50
    cb = ProResCallback(t_warmup='120ba')
    cb.on_train_begin(None, state, TrainerControl(), model=tiny_llama())
    assert cb.controller.warmup_steps == 120
    for bad in (0, -3, 'soon', '2dur', float('inf')):
        with pytest.raises(ValueError):
            c = ProResCallback(t_warmup=bad)
            c.on_train_begin(None, state, TrainerControl(), model=tiny_llama())
    with pytest.raises(ValueError, match='unknown schedule'):
        ProResCallback(schedule='bogus')


def test_second_train_on_same_model_reuses_hooks():
    model = tiny_llama()
    cb = ProResCallback(t_warmup=10)
    state = TrainerState()
    state.global_step, state.max_steps = 2, 20
    cb.on_train_begin(None, state, TrainerControl(), model=model)
    first = cb.controller
    state.global_step = 4
    cb.on_train_begin(None, state, TrainerControl(), model=model)
    assert cb.controller is first and first.num_hooks == 2 * L
    assert cb.alphas == pytest.approx(alpha_schedules.alphas('linear', L, 4, 10))
