"""The guard against the failure mode of too-short ProRes warmups: a warning at fit start when W / L is
below the measured regime, and the residual monitor's collapse detection (mean cosine between positions),
provoked for real in a small Post-LN model trained on real text."""

import warnings

import pytest
import torch

from prores_algo import alpha_schedules, apply_prores
from prores_algo.integrations.composer import ResidualMonitor
from prores_algo.monitor import position_cosine
from prores_algo.warmup_advice import warmup_advice
from tests.support.helpers import tiny_config

# ----------------------------------------------------------------------------------- position cosine


def test_position_cosine_exact():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 16, generator=g)
    u = torch.nn.functional.normalize(h, dim=-1)
    cos = u @ u.transpose(1, 2)  # (B, T, T)
    T = h.shape[1]
    want = ((cos.sum((1, 2)) - T) / (T * (T - 1))).mean()
    torch.testing.assert_close(position_cosine(h), want)
    same = torch.randn(1, 1, 16, generator=g).expand(2, 5, 16) * torch.rand(2, 5, 1, generator=g)
    assert float(position_cosine(same)) == pytest.approx(1.0, abs=1e-6)  # every position the same direction
    with pytest.raises(ValueError, match='seq >= 2'):
        position_cosine(torch.randn(2, 1, 4))


@pytest.mark.parametrize(
    'kwargs, match',
    [
        ({'collapse_threshold': 1.5}, 'collapse_threshold'),
        ({'collapse_patience': 0}, 'collapse_patience'),
        ({'stop_on_collapse': 'yes'}, 'stop_on_collapse'),
        ({'position_cosine': False, 'stop_on_collapse': True}, 'needs position_cosine=True'),
    ],
)
def test_monitor_collapse_options_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResidualMonitor(**kwargs)


# --------------------------------------------------------------------------------- short-warmup warning


def test_short_warmup_message_thresholds():
    L = 12
    assert warmup_advice(alpha_schedules.MIN_STEPS_PER_LAYER * L, L)[0] is False
    short, msg = warmup_advice(3 * L, L)
    assert short and 'the model was not measured' in msg and 'example_inputs=batch' in msg
    assert '3 steps of alpha warmup per layer' in msg
    assert f'(the paper: {alpha_schedules.PAPER_STEPS_PER_LAYER * L})' in msg
    assert f'below {alpha_schedules.MIN_STEPS_PER_LAYER} per layer' in msg and 'collapse' in msg
    assert f't_warmup >= {alpha_schedules.MIN_STEPS_PER_LAYER * L} steps' in msg


def test_apply_prores_warns_once_for_short_warmup():
    from prores_algo.training.models.decoder import Decoder
    from prores_algo.warmup_advice import warn_if_short_warmup

    model = Decoder(tiny_config(n_layers=4))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        controller = apply_prores(model, t_warmup=8)
        assert warn_if_short_warmup(controller) is False  # a front end asking again: already warned
    assert sum('steps of alpha warmup per layer' in str(w.message) for w in rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        apply_prores(Decoder(tiny_config(n_layers=4)), t_warmup=4 * alpha_schedules.MIN_STEPS_PER_LAYER)
        apply_prores(Decoder(tiny_config(n_layers=4)))  # the paper's default W = 1000 L


def test_composer_prores_warns_at_fit_start_in_batches_only():
    from composer import Trainer

    from prores_algo import ProRes
    from tests.support.helpers import tiny_composer_model, token_loader

    def fit(t_warmup, max_duration='4ba'):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            Trainer(
                model=tiny_composer_model(n_layers=4),
                train_dataloader=token_loader(),
                max_duration=max_duration,
                algorithms=[ProRes(t_warmup=t_warmup)],
                device='cpu',
                progress_bar=False,
            ).fit()
        return [str(x.message) for x in w if 'per layer' in str(x.message)]

    short = fit('0.5dur')  # 2 batches over 4 layers
    assert len(short) == 1 and '0.5 steps of alpha warmup per layer' in short[0]
    assert fit('400ba', max_duration='2ba') == []  # 100 per layer (the W > max_duration warning is separate)
    assert fit('64tok') == []  # not in optimizer steps: W / L is not comparable to the paper's T


# ------------------------------------------------------------------------------- a provoked collapse


@pytest.fixture(scope='module')
def text_data(tmp_path_factory):
    from prores_algo.training.data import write_mds

    out = tmp_path_factory.mktemp('data') / 'stdlib-32'
    write_mds('stdlib', out, tokenizer='byte', seq_len=32, val_fraction=0.05, max_tokens=300_000, progress=False)
    return str(out)


def _train_post_ln(data, steps, t_warmup, monitor):
    """16-layer, width-32 Post-LN decoder on real text, LR 1.5e-3 with a 10% LR warmup; returns warnings."""
    from prores_algo.training.composer_train import run
    from prores_algo.training.config import load_config

    o = {
        'data.path': data,
        'data.source': 'null',
        'data.seq_len': 32,
        'model.d_model': 32,
        'model.n_heads': 4,
        'model.n_layers': 16,
        'model.max_seq_len': 32,
        'model.norm': 'post',
        'max_duration': f'{steps}ba',
        'eval_interval': '0ba',
        'eval_subset_num_batches': 2,
        'global_train_batch_size': 16,
        'eval_batch_size': 16,
        'eval_first': 'false',
        'optimizer.lr': 1.5e-3,
        'scheduler.lr_warmup': '0.1dur',
        'console_log_interval': '1000ba',
        'seed': 0,
    }
    if t_warmup:
        o['algorithms.prores.t_warmup'] = f'{t_warmup}ba'
    from pathlib import Path

    cfg = load_config(
        Path(__file__).resolve().parents[1] / 'benchmarks' / 'quality.yaml', [f'{k}={v}' for k, v in o.items()]
    )
    from composer.loggers import InMemoryLogger

    torch.set_num_threads(1)
    mem = InMemoryLogger()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        run(cfg, extra_callbacks=(monitor,), extra_loggers=(mem,))
    last_batch = int(mem.data['loss/train/total'][-1][0].batch)
    return [str(x.message) for x in w], last_batch


def test_post_ln_collapse_is_detected_and_stops_the_run(text_data):
    """ProRes `linear` at 3 steps per layer (W = 48 over 16 layers): the residual stream collapses (every
    position the same direction) for ~150 steps; the monitor reports it once, after `collapse_patience`
    measurements, and stops the run. Without ProRes the same model only passes through a shorter
    high-cosine phase (8 measurements), which the patience of 12 does not report."""
    prores_monitor = ResidualMonitor(
        log_interval=10,
        grad_norm=False,
        update_ratio=False,
        spike_window=0,
        collapse_patience=12,
        stop_on_collapse=True,
    )
    msgs, last = _train_post_ln(text_data, 200, 48, prores_monitor)
    assert sum('steps of alpha warmup per layer' in m for m in msgs) == 1  # the fit-start warning
    collapse = [m for m in msgs if 'Residual stream collapse' in m]
    assert len(collapse) == 1 and 'stopping the run' in collapse[0]
    assert prores_monitor.collapsed_at is not None and prores_monitor.collapsed_at < 200
    assert last == prores_monitor.collapsed_at < 199  # stopped at the batch that reported the collapse

    baseline_monitor = ResidualMonitor(
        log_interval=10,
        grad_norm=False,
        update_ratio=False,
        spike_window=0,
        collapse_patience=12,
        stop_on_collapse=True,
    )
    msgs, last = _train_post_ln(text_data, 150, None, baseline_monitor)
    assert not any('Residual stream collapse' in m for m in msgs)
    assert baseline_monitor.collapsed_at is None and last == 149
