"""The short-warmup advice follows the model's regime, measured on a batch: the branch-to-stream ratio
at initialisation and whether a norm sits on the stream (what benchmarks/quality.py found to decide
whether a short α warmup hurts). Thresholds exact, detection on real models, the measurement harmless
(α and the RNG given back), and the Composer algorithm measuring its first batch in a real Trainer."""

import warnings

import pytest
import torch
from composer.loggers import InMemoryLogger

from prores_algo import ProRes, apply_prores
from prores_algo.alpha_schedules import MIN_STEPS_PER_LAYER
from prores_algo.measures import branch_to_stream_ratio
from prores_algo.training.models import build_decoder
from prores_algo.warmup_advice import (
    INIT_MIN_STEPS_METRIC,
    INIT_NORMALISED_METRIC,
    INIT_RATIO_METRIC,
    SMALL_BRANCH_RATIO,
    InitMeasure,
    head_of_batch,
    measure_init,
    min_steps_per_layer,
    warmup_advice,
)

IDS = torch.randint(0, 257, (4, 64), generator=torch.Generator().manual_seed(0))


def _decoder(norm='pre', init='official', d_model=64, seed=0):
    torch.manual_seed(seed)
    return build_decoder(vocab_size=257, d_model=d_model, n_layers=4, n_heads=4, max_seq_len=64, init=init, norm=norm)


def _short_warnings(record):
    return [str(w.message) for w in record if 'steps of alpha warmup per layer' in str(w.message)]


# --- the thresholds, as the study measured them --------------------------------------------------------
@pytest.mark.parametrize(
    'measure, need',
    [
        (InitMeasure(0.058, False), 100),  # Pre-LN, official init at width 64: behind at 12 and 25, ahead at 100
        (InitMeasure(SMALL_BRANCH_RATIO - 1e-9, False), 100),
        (InitMeasure(SMALL_BRANCH_RATIO, False), 12),  # PyTorch's init (0.127), width768 (0.24), 0.48
        (InitMeasure(0.48, False), 12),
        (InitMeasure(0.010, True), 25),  # Post-LN, official init: erratic at 12, not behind from 25
        (InitMeasure(SMALL_BRANCH_RATIO - 1e-9, True), 25),
        (InitMeasure(SMALL_BRANCH_RATIO, True), 12),  # Post-LN, larger inits: not behind from 12
        (InitMeasure(0.9, True), 12),
        (None, MIN_STEPS_PER_LAYER),  # not measured: the conservative threshold
    ],
)
def test_min_steps_per_layer_per_regime(measure, need):
    assert min_steps_per_layer(measure) == need


@pytest.mark.parametrize(
    'measure, need', [(InitMeasure(0.05, False), 100), (InitMeasure(0.05, True), 25), (InitMeasure(0.2, False), 12)]
)
def test_advice_switches_exactly_at_the_regimes_threshold(measure, need):
    L = 8
    short, msg = warmup_advice(need * L - 1, L, measure)
    assert short and f'Use t_warmup >= {need * L} steps' in msg and 'W / L = ' in msg
    short, msg = warmup_advice(need * L, L, measure)
    assert not short and f'the {need} at which' in msg


def test_advice_names_the_regime_and_the_auto_cap():
    short, msg = warmup_advice(200, 8, InitMeasure(0.058, False))
    assert short and 'branches start at 0.058 of the stream' in msg and 'behind in 6 of 6 seeds' in msg
    short, msg = warmup_advice(96, 8, InitMeasure(0.01, True), auto_run_steps=384)
    assert short and "t_warmup='auto' gives W = 96" in msg and 'train for at least 800 steps' in msg
    assert 'a norm sits on the residual stream (Post-LN-like), branches start at 0.01 of it' in msg
    short, msg = warmup_advice(96, 8, InitMeasure(0.01, True))
    assert short and 'behind in 4 of 5 seeds, one ProRes run stalled' in msg and 'Use t_warmup >= 200' in msg
    short, msg = warmup_advice(88, 8, InitMeasure(0.2, False))
    assert short and 'the shortest warmup the study ran' in msg and 'Use t_warmup >= 96' in msg


# --- the measurement on real models ----------------------------------------------------------------------
@pytest.mark.parametrize('norm, normalised', [('pre', False), ('post', True), ('deepnorm', True)])
@pytest.mark.parametrize('init', ['official', 'torch'])
def test_a_norm_on_the_stream_is_detected(norm, normalised, init):
    assert branch_to_stream_ratio(_decoder(norm, init), IDS)['normalised_stream'] is normalised


@pytest.mark.parametrize('how', ['bf16 weights', 'bf16 autocast'])
@pytest.mark.parametrize('norm, normalised', [('pre', False), ('post', True), ('deepnorm', True)])
@pytest.mark.parametrize('d_model', [64, 256, 1024])
def test_a_norm_on_the_stream_is_detected_in_bfloat16(norm, normalised, d_model, how):
    """A norm computed in bfloat16 rounds 1/RMS to 2^-8: the stream's per-position RMS spreads by ~0.1%,
    which in float32 would read as Pre-LN; the tolerance follows the stream's dtype."""
    model = _decoder(norm, d_model=d_model)
    if how == 'bf16 weights':
        r = branch_to_stream_ratio(model.to(torch.bfloat16), IDS)
    else:
        with torch.autocast('cpu', dtype=torch.bfloat16):
            r = branch_to_stream_ratio(model, IDS)
    assert r['normalised_stream'] is normalised


def test_hf_llama_is_pre_ln():
    from tests.support.hf import tiny_llama

    model = tiny_llama()
    r = branch_to_stream_ratio(model, input_ids=IDS % model.config.vocab_size)
    assert r['normalised_stream'] is False and r['median'] > 0


def test_measure_init_sees_the_branches_at_alpha_one_and_gives_alpha_back():
    """Mid-warmup α stays exactly as it was; the ratio is that of the model without ProRes."""
    plain = _decoder()
    expected = branch_to_stream_ratio(plain, IDS)['median']
    model = _decoder()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        prores = apply_prores(model, t_warmup=400)
    prores.set_step(130)
    before = prores.alphas
    buffers = {n: b.clone() for n, b in model.named_buffers() if 'prores' in n}
    m = measure_init(prores, model, IDS)
    assert m.ratio == pytest.approx(expected, rel=1e-6) and m.normalised_stream is False
    assert prores.alphas == before
    after = {n: b for n, b in model.named_buffers() if 'prores' in n}
    assert buffers and all(torch.equal(buffers[n], after[n]) for n in buffers)


def test_measuring_draws_no_random_numbers_and_keeps_the_train_mode():
    """A GPT-2 with dropout: the pass runs in eval mode, so the training run that follows is unchanged."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.1)
    model = T.GPT2LMHeadModel(cfg).train()
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        prores = apply_prores(model, t_warmup=50, example_inputs={'input_ids': IDS[:, :32] % 64})
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert prores.init_measure is not None and prores.init_measure.normalised_stream is False


def test_a_tokenizers_batch_encoding_is_passed_as_keyword_arguments():
    """What a tokenizer returns (`BatchEncoding`, a Mapping but not a dict) is the model's keyword arguments."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = T.GPT2LMHeadModel(cfg)
    ids = IDS[:, :32] % 64
    batch = T.BatchEncoding({'input_ids': ids, 'attention_mask': torch.ones_like(ids)})
    expected = branch_to_stream_ratio(model, input_ids=ids, attention_mask=torch.ones_like(ids))['median']
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        prores = apply_prores(model, t_warmup=50, example_inputs=batch)
    assert prores.init_measure.ratio == pytest.approx(expected, rel=1e-6)


def test_a_pass_without_a_finite_ratio_counts_as_not_measured():
    model = _decoder()
    with torch.no_grad():
        model.embed.weight.fill_(float('nan'))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        prores = apply_prores(model, t_warmup=200, example_inputs=IDS)
    msgs = [str(w.message) for w in rec]
    assert prores.init_measure is None
    assert any('could not measure the residual branches' in m and 'nan' in m for m in msgs), msgs
    assert len(_short_warnings(rec)) == 1 and 'the model was not measured' in _short_warnings(rec)[0]


def test_deepspeed_apply_prores_takes_a_batch_to_measure():
    from prores_algo.integrations.deepspeed import apply_prores as ds_apply_prores

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        ds = ds_apply_prores(_decoder('pre', 'official'), t_warmup=200, example_inputs=IDS)
    assert ds.controller.init_measure.regime == 'pre, small branches'
    assert len(_short_warnings(rec)) == 1 and 'branches start at' in _short_warnings(rec)[0]
    with pytest.raises(ValueError, match="example_inputs advises on W in optimizer steps: use time_unit='steps'"):
        ds_apply_prores(_decoder(), t_warmup=200, time_unit='samples', example_inputs=IDS)


@pytest.mark.parametrize('front_end', ['apply_prores', 'deepspeed'])
def test_advise_false_waits_for_the_caller_to_measure(front_end):
    """What a ZeRO-3 user does (the model cannot run before deepspeed.initialize): attach without advice,
    measure later; one warning, the measured one."""
    from prores_algo.integrations.deepspeed import apply_prores as ds_apply_prores
    from prores_algo.warmup_advice import advise_warmup

    model = _decoder('pre', 'official')
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        if front_end == 'deepspeed':
            controller = ds_apply_prores(model, t_warmup=200, advise=False).controller
        else:
            controller = apply_prores(model, t_warmup=200, advise=False)
        assert not _short_warnings(rec)
        measure = advise_warmup(controller, model, IDS)
    assert measure.regime == 'pre, small branches' and controller.init_measure == measure
    assert len(_short_warnings(rec)) == 1 and 'branches start at' in _short_warnings(rec)[0]
    with pytest.raises(ValueError, match='example_inputs is for the advice, which advise=False turns off'):
        apply_prores(_decoder(), t_warmup=200, advise=False, example_inputs=IDS)


def test_head_of_batch_slices_every_tensor():
    batch = {'input_ids': torch.arange(40).view(10, 4), 'extra': [torch.ones(10), 3], 'n': 7}
    head = head_of_batch(batch, 8)
    assert head['input_ids'].shape == (8, 4) and head['extra'][0].shape == (8,) and head['extra'][1] == 3
    assert head['n'] == 7 and head_of_batch(torch.ones(3, 2), 8).shape == (3, 2)


def test_head_of_batch_keeps_what_is_not_one_row_per_sample():
    """A vision-language batch packs every image's patches into one tensor (Qwen2-VL's pixel_values), a
    packed batch has its cu_seq_lens: cut to 8 rows they would no longer match the samples kept."""
    batch = {
        'input_ids': torch.zeros(12, 16, dtype=torch.long),
        'pixel_values': torch.ones(48, 3),  # 4 patches per sample
        'cu_seq_lens': torch.arange(13),
        'num_items_in_batch': torch.tensor(180),
    }
    head = head_of_batch(batch, 8)
    assert head['input_ids'].shape == (8, 16) and head['pixel_values'].shape == (48, 3)
    assert head['cu_seq_lens'].shape == (13,) and int(head['num_items_in_batch']) == 180
    small = {'input_ids': torch.zeros(3, 4), 'pixel_values': torch.ones(12, 3)}
    assert head_of_batch(small, 8) is small  # no more samples than asked for: the batch as it is


def test_a_measurement_that_fails_is_a_warning_never_a_crash():
    """The measurement only gives advice: the model's own error becomes one warning and the conservative
    advice, and the model is left with ProRes attached and usable."""

    class Picky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _decoder()

        def forward(self, ids):
            if not self.training:
                raise RuntimeError('size of tensor a (8) must match the size of tensor b (48)')
            return self.inner(ids)

    model = Picky()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        prores = apply_prores(model, t_warmup=200, example_inputs=IDS)
    msgs = [str(w.message) for w in rec]
    assert prores.init_measure is None and prores.alphas
    failed = [m for m in msgs if 'could not measure the residual branches' in m]
    assert len(failed) == 1 and 'RuntimeError: size of tensor a (8)' in failed[0] and '\n' not in failed[0]
    assert len(_short_warnings(rec)) == 1 and 'the model was not measured' in _short_warnings(rec)[0]
    model.train()
    assert torch.isfinite(model(IDS)).all()


def test_advise_false_with_a_batch_is_refused_before_any_hook():
    model = _decoder()
    with pytest.raises(ValueError, match='example_inputs is for the advice'):
        apply_prores(model, t_warmup=200, advise=False, example_inputs=IDS)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert apply_prores(model, t_warmup=200).num_layers == 4  # nothing was left attached


# --- apply_prores(example_inputs=...) warns for the regime it measured ---------------------------------------
@pytest.mark.parametrize(
    'norm, init, warns',
    [('pre', 'official', True), ('pre', 'torch', False), ('post', 'official', False)],
)
def test_apply_prores_with_a_batch_warns_only_where_the_study_saw_harm(norm, init, warns):
    """W / L = 50: between the small-branch Pre-LN threshold (100) and everyone else's (25)."""
    model = _decoder(norm, init)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        prores = apply_prores(model, t_warmup=200, example_inputs=IDS)
    assert bool(_short_warnings(rec)) is warns, _short_warnings(rec)
    assert prores.init_measure.normalised_stream is (norm == 'post')
    with warnings.catch_warnings(record=True) as rec:  # without a batch: the conservative warning
        warnings.simplefilter('always')
        apply_prores(_decoder(norm, init), t_warmup=200)
    assert len(_short_warnings(rec)) == 1 and 'example_inputs=batch' in _short_warnings(rec)[0]


# --- Composer: the first batch of a real Trainer --------------------------------------------------------------
def _fit(algo, seed=0, init='official', **kw):
    from composer import Trainer

    from tests.support.helpers import tiny_composer_model, token_loader

    mem = InMemoryLogger()
    model = tiny_composer_model(seed=seed, init=init)
    trainer = Trainer(
        model=model,
        train_dataloader=token_loader(),
        max_duration='6ba',
        algorithms=[algo],
        loggers=[mem],
        seed=seed,
        device='cpu',
        progress_bar=False,
        log_to_console=False,
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
        **kw,
    )
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        trainer.fit()
    return trainer, mem, _short_warnings(rec)


@pytest.mark.parametrize('init, warns', [('official', True), ('torch', False)])
def test_composer_measures_the_first_batch_logs_it_and_advises(init, warns):
    """tiny_composer_model: 4 Pre-LN layers, 32 wide; W = 200 batches is W / L = 50."""
    from tests.support.helpers import tiny_composer_model, token_loader

    algo = ProRes(t_warmup='200ba')
    trainer, mem, short = _fit(algo, init=init)
    first = next(iter(token_loader().dataloader))
    expected = branch_to_stream_ratio(tiny_composer_model(init=init), head_of_batch(first, 8))
    assert algo.init_measure.ratio == pytest.approx(expected['median'], rel=1e-6)
    assert mem.hyperparameters[INIT_RATIO_METRIC] == algo.init_measure.ratio
    assert mem.hyperparameters[INIT_NORMALISED_METRIC] == 0.0
    assert mem.hyperparameters[INIT_MIN_STEPS_METRIC] == (100.0 if warns else 12.0)
    assert (len(short) == 1) is warns and (not short or 'branches start at' in short[0])
    assert trainer.state.model.training


def test_composer_measure_init_false_keeps_the_conservative_warning_and_changes_no_number():
    measured, mem_on, short_on = _fit(ProRes(t_warmup='200ba'))
    plain, mem_off, short_off = _fit(ProRes(t_warmup='200ba', measure_init=False))
    assert INIT_RATIO_METRIC not in mem_off.hyperparameters
    assert len(short_off) == 1 and 'example_inputs=batch' in short_off[0]
    assert len(short_on) == 1 and 'branches start at' in short_on[0]
    losses_on = [v for _, v in mem_on.data['loss/train/total']]
    losses_off = [v for _, v in mem_off.data['loss/train/total']]
    assert losses_on == losses_off  # the extra pass changes nothing the run computes
    for a, b in zip(measured.state.model.parameters(), plain.state.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_composer_resume_repeats_the_measured_advice_without_measuring(tmp_path):
    first, _, short = _fit(ProRes(t_warmup='200ba'), save_folder=str(tmp_path), save_interval='3ba')
    assert len(short) == 1
    algo = ProRes(t_warmup='200ba')
    resumed, mem, short_resumed = _fit(algo, load_path=str(tmp_path / 'ep0-ba3-rank0.pt'))
    assert algo.init_measure == first.state.algorithms[0].init_measure
    assert algo.controller.init_measure == algo.init_measure  # one answer, wherever it is read
    assert INIT_RATIO_METRIC not in mem.hyperparameters  # not measured again on a trained model
    assert short_resumed == short


def test_yaml_and_bad_value():
    with pytest.raises(ValueError, match='measure_init must be true or false'):
        ProRes(measure_init='yes')
