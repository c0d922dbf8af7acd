"""ResidualMonitor (Composer) and ResidualMonitorCallback (HF): values checked against hand computations."""

import copy
import math

import pytest
import torch
from composer import Callback, Trainer
from composer.loggers import InMemoryLogger

from prores_algo.integrations.composer import ResidualMonitor
from prores_algo.integrations.hf import ResidualMonitorCallback
from prores_algo.monitor import LayerStats, SpikeCounter
from tests.support.helpers import tiny_composer_model, token_loader

LR = 0.1


# --- the spike rule ---------------------------------------------------------------------------------


def reference_spikes(values, window, k):
    """Straight from the definition: v_t >= mean + k·std of v_{t-window..t-1} (population std)."""
    count, hist = 0, []
    for v in values:
        if not math.isfinite(v):
            count += 1
            continue
        if len(hist) >= window:
            prev = hist[-window:]
            mean = sum(prev) / window
            std = math.sqrt(sum((p - mean) ** 2 for p in prev) / window)
            count += v >= mean + k * std and v > mean
        hist.append(v)
    return count


def test_spike_counter_synthetic_sequence():
    c = SpikeCounter(window=4, num_std=2.0)
    # window [1, 2, 1, 2]: mean 1.5, std 0.5 -> threshold 2.5
    for v in (1, 2, 1, 2):
        assert not c.push(v)
    assert c.push(2.5)  # exactly at the threshold counts (>=)
    assert c.count == 1
    # window now [2, 1, 2, 2.5]: mean 1.875, std = sqrt(((.125)^2+(.875)^2+(.125)^2+(.625)^2)/4)
    std = math.sqrt((0.125**2 + 0.875**2 + 0.125**2 + 0.625**2) / 4)
    assert not c.push(1.875 + 2 * std - 1e-9)
    c2 = SpikeCounter(window=3, num_std=7.0)
    for v in (5, 5, 5):
        c2.push(v)
    assert not c2.push(5), 'a flat window: an equal value is no spike'
    assert c2.push(5.001), 'a flat window: anything above the mean is'
    assert c2.push(float('nan')) and c2.count == 2


def test_spike_counter_matches_reference_on_noisy_sequence():
    g = torch.Generator().manual_seed(0)
    values = (2 + 0.1 * torch.randn(400, generator=g)).tolist()
    for i in (50, 120, 121, 300):
        values[i] += 3.0
    c = SpikeCounter(window=20, num_std=5.0)
    for v in values:
        c.push(v)
    assert c.count == reference_spikes(values, 20, 5.0) >= 3
    state = c.state_dict()
    c3 = SpikeCounter(window=20, num_std=5.0)
    c3.load_state_dict(state)
    assert c3.count == c.count and list(c3.values) == list(c.values)


# --- Composer: RMS / grad norm / update ratio against a manual computation ----------------------------------


def first_batch(batch_size=4):
    return next(iter(token_loader(batch_size=batch_size).dataloader))


def manual_layer_stats(composer_model, batch, lr):
    """Per block: RMS of its output, grad norm of its parameters, SGD update ratio lr·||g|| / ||θ||."""
    model = copy.deepcopy(composer_model)
    dec = model.model
    outputs = []
    handles = [b.register_forward_hook(lambda m, a, o: outputs.append(o)) for b in dec.blocks]
    loss = model.loss(model(batch), batch)
    for h in handles:
        h.remove()
    loss.backward()
    rms = [o.detach().pow(2).mean().sqrt().item() for o in outputs]
    grad = [math.sqrt(sum(p.grad.pow(2).sum().item() for p in b.parameters())) for b in dec.blocks]
    norm = [math.sqrt(sum(p.pow(2).sum().item() for p in b.parameters())) for b in dec.blocks]
    return rms, grad, [lr * g / n for g, n in zip(grad, norm, strict=True)], loss.item()


def run_composer(monitor, max_duration='1ba', lr=LR, microbatch=None, extra_callbacks=(), seed=0):
    model = tiny_composer_model(seed=seed)
    reference = copy.deepcopy(model)
    mem = InMemoryLogger()
    trainer = Trainer(
        model=model,
        train_dataloader=token_loader(batch_size=4),
        max_duration=max_duration,
        optimizers=torch.optim.SGD(model.parameters(), lr=lr),
        callbacks=[*extra_callbacks, monitor],
        loggers=[mem],
        device='cpu',
        progress_bar=False,
        log_to_console=False,
        seed=seed,
        device_train_microbatch_size=microbatch,
    )
    trainer.fit()
    return reference, mem


def logged(mem, key):
    return [v for _, v in mem.data.get(key, [])]


@pytest.mark.parametrize('microbatch', [None, 2])
def test_composer_values_equal_manual_forward_backward_and_sgd_step(microbatch):
    monitor = ResidualMonitor(log_interval='1ba', spike_window=0)
    reference, mem = run_composer(monitor, microbatch=microbatch)
    rms, grad, ratio, _ = manual_layer_stats(reference, first_batch(), LR)
    for i in range(4):
        assert logged(mem, f'residual_monitor/rms/layer_{i}') == [pytest.approx(rms[i], rel=1e-5)]
        assert logged(mem, f'residual_monitor/grad_norm/layer_{i}') == [pytest.approx(grad[i], rel=1e-4)]
        assert logged(mem, f'residual_monitor/update_ratio/layer_{i}') == [pytest.approx(ratio[i], rel=1e-4)]
    assert 'residual_monitor/loss_spikes' not in mem.data


def test_composer_interval_and_hooks_only_on_measured_batches():
    seen = []

    class Probe(Callback):  # placed after the monitor: sees its hooks during the forward
        def __init__(self, monitor):
            self.monitor = monitor

        def before_forward(self, state, logger):
            hooks = sum(len(b._forward_hooks) for b in state.model.model.blocks)
            seen.append((int(state.timestamp.batch), hooks, self.monitor.stats.recording))

    monitor = ResidualMonitor(log_interval='3ba', spike_window=0)
    model = tiny_composer_model()
    mem = InMemoryLogger()
    Trainer(
        model=model,
        train_dataloader=token_loader(batch_size=4),
        max_duration='7ba',
        optimizers=torch.optim.SGD(model.parameters(), lr=LR),
        callbacks=[monitor, Probe(monitor)],
        loggers=[mem],
        device='cpu',
        progress_bar=False,
        log_to_console=False,
    ).fit()
    assert [(b, h > 0, r) for b, h, r in seen] == [(b, b % 3 == 0, b % 3 == 0) for b in range(7)]
    assert len(logged(mem, 'residual_monitor/rms/layer_0')) == 3  # batches 0, 3, 6
    assert all(len(b._forward_hooks) == 0 for b in model.model.blocks)


class Inject(Callback):
    """Makes a loss spike (BATCH_END, before the monitor) and a gradient spike (AFTER_BACKWARD)."""

    def __init__(self, loss_at, grad_at):
        self.loss_at, self.grad_at, self.losses, self.gnorms = loss_at, grad_at, [], []

    def after_backward(self, state, logger):
        if int(state.timestamp.batch) == self.grad_at:
            for p in state.model.parameters():
                p.grad.mul_(1000.0)
        self.gnorms.append(math.sqrt(sum(p.grad.pow(2).sum().item() for p in state.model.parameters())))

    def batch_end(self, state, logger):
        if int(state.timestamp.batch) - 1 == self.loss_at:  # timestamp already advanced at BATCH_END
            state.total_loss_dict['loss/train/total'] = 100.0
        self.losses.append(state.total_loss_dict['loss/train/total'])


def test_composer_spike_counters_count_injected_spikes():
    inject = Inject(loss_at=12, grad_at=14)
    monitor = ResidualMonitor(log_interval='4ba', spike_window=8, spike_std=7.0, rms=False, update_ratio=False)
    # lr = 0: parameters never move, so nothing but the injections can spike
    _, mem = run_composer(monitor, max_duration='16ba', lr=0.0, extra_callbacks=[inject])
    assert monitor.loss_spikes.count == reference_spikes(inject.losses, 8, 7.0) == 1
    assert monitor.grad_spikes.count == reference_spikes(inject.gnorms, 8, 7.0) == 1
    assert logged(mem, 'residual_monitor/loss_spikes') == [0, 0, 0, 1]  # logged at batches 0, 4, 8, 12
    assert logged(mem, 'residual_monitor/grad_spikes') == [0, 0, 0, 0]  # batch 14's spike is counted at fit end
    assert monitor.state_dict()['grad_spikes']['count'] == 1


def test_monitor_with_prores_and_unknown_model_error():
    from prores_algo import ProRes

    monitor = ResidualMonitor(log_interval=1, spike_window=0)
    model = tiny_composer_model()
    mem = InMemoryLogger()
    Trainer(
        model=model,
        train_dataloader=token_loader(batch_size=4),
        max_duration='2ba',
        optimizers=torch.optim.SGD(model.parameters(), lr=LR),
        algorithms=[ProRes(t_warmup='8ba')],
        callbacks=[monitor],
        loggers=[mem],
        device='cpu',
        progress_bar=False,
        log_to_console=False,
    ).fit()
    # at batch 0 every α is 0: each layer passes its input through, so all RMS equal the embedding RMS
    r = [logged(mem, f'residual_monitor/rms/layer_{i}')[0] for i in range(4)]
    assert r == pytest.approx([r[0]] * 4, rel=1e-6)
    with pytest.raises(ValueError, match='branches'):
        LayerStats  # noqa: B018  (imported API)
        ResidualMonitor()._find(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match='interval'):
        ResidualMonitor(log_interval='10ep')


# --- Hugging Face -----------------------------------------------------------------------------------


def test_hf_callback_values_equal_manual_with_grad_accumulation():
    from tests.support.hf import hf_tokens, simulated_train, tiny_llama

    model = tiny_llama()
    reference = copy.deepcopy(model)
    mon = ResidualMonitorCallback(log_interval=2, spike_window=0)
    state, _ = simulated_train(model, [mon], steps=3, grad_accum=2, lr=1e-2)
    # step 0 is measured: micro-batches are samples (0,1) and (2,3)
    data = hf_tokens(n=12)
    outs = []
    handles = [
        l.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
        for l in reference.model.layers
    ]
    for i in (0, 2):
        batch = {k: torch.stack([data[j][k] for j in (i, i + 1)]) for k in ('input_ids', 'labels')}
        (reference(**batch).loss / 2).backward()
    for h in handles:
        h.remove()
    L = len(reference.model.layers)
    rms = [
        math.sqrt(
            sum(outs[m * L + i].pow(2).sum().item() for m in range(2)) / sum(outs[m * L + i].numel() for m in range(2))
        )
        for i in range(L)
    ]
    grad = [math.sqrt(sum(p.grad.pow(2).sum().item() for p in l.parameters())) for l in reference.model.layers]
    norm = [math.sqrt(sum(p.pow(2).sum().item() for p in l.parameters())) for l in reference.model.layers]
    logs = state.log_history
    for i in range(L):
        assert logs[0][f'residual_monitor/rms/layer_{i}'] == pytest.approx(rms[i], rel=1e-5)
        assert logs[0][f'residual_monitor/grad_norm/layer_{i}'] == pytest.approx(grad[i], rel=1e-4)
        assert logs[0][f'residual_monitor/update_ratio/layer_{i}'] == pytest.approx(1e-2 * grad[i] / norm[i], rel=1e-4)
    assert 'residual_monitor/rms/layer_0' not in logs[1] and 'residual_monitor/rms/layer_0' in logs[2]  # interval 2
    assert not any(l._forward_hooks for l in model.model.layers)
    assert all(
        not p._post_accumulate_grad_hooks
        for p in model.parameters()
        if getattr(p, '_post_accumulate_grad_hooks', None) is not None
    )


def test_hf_loss_spikes_from_forward_outputs():
    from tests.support.hf import simulated_train, tiny_llama

    mon = ResidualMonitorCallback(
        log_interval=5, spike_window=3, spike_std=7.0, rms=False, grad_norm=False, update_ratio=False
    )
    model = tiny_llama()
    calls = []

    def bump(module, args, output):  # step 4's loss (both micro-batches) is huge
        calls.append(1)
        if len(calls) in (9, 10):
            output.loss = output.loss * 0 + 50.0
        return output

    model.register_forward_hook(bump)  # registered before on_train_begin: runs before the monitor's hook
    state, _ = simulated_train(model, [mon], steps=6, grad_accum=2, lr=0.0)
    assert mon.loss_spikes.count == 1
    assert state.log_history[5]['residual_monitor/loss_spikes'] == 1


@pytest.mark.skipif(
    __import__('importlib').util.find_spec('accelerate') is None,
    reason='transformers.Trainer requires the `accelerate` package (not installed here)',
)
def test_hf_real_trainer_logs_monitor_metrics(tmp_path):
    import transformers as T

    from prores_algo.integrations.hf import ProResCallback
    from tests.support.hf import hf_args, hf_tokens, tiny_llama

    model = tiny_llama()
    args = hf_args(tmp_path, 4, gradient_accumulation_steps=2, max_grad_norm=1e-3)
    mon = ResidualMonitorCallback(log_interval=2, spike_window=2)
    trainer = T.Trainer(model=model, args=args, train_dataset=hf_tokens(), callbacks=[ProResCallback(t_warmup=3), mon])
    trainer.train()
    logs = [h for h in trainer.state.log_history if 'loss' in h]
    assert 'residual_monitor/rms/layer_2' in logs[0] and 'residual_monitor/rms/layer_2' in logs[2]
    assert 'residual_monitor/grad_norm/layer_0' not in logs[1]
    # step 0: every α is 0, so no gradient reaches a layer and no layer moves
    assert all(logs[0][f'residual_monitor/{k}/layer_{i}'] == 0 for k in ('grad_norm', 'update_ratio') for i in range(3))
    h = logs[2]
    per_layer = math.sqrt(sum(h[f'residual_monitor/grad_norm/layer_{i}'] ** 2 for i in range(3)))
    # pre-clipping values (clipping to 1e-3 would cap them far below the Trainer's logged grad_norm)
    assert 1e-2 < per_layer <= h['grad_norm'] * (1 + 1e-5)
    assert all(h[f'residual_monitor/update_ratio/layer_{i}'] > 0 for i in range(3))
    assert 'residual_monitor/loss_spikes' in logs[-1] and 'residual_monitor/grad_spikes' in logs[-1]


# --- branch_to_stream_ratio ------------------------------------------------------------------------


class _ScaledBranchLayer(torch.nn.Module):
    """x + a(x) + m(x) with a, m Linear maps k·I: each branch's RMS is exactly k times the stream's."""

    prores_branches = ('a', 'm')

    def __init__(self, d, ka, km):
        super().__init__()
        self.a, self.m = torch.nn.Linear(d, d, bias=False), torch.nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(ka * torch.eye(d))
            self.m.weight.copy_(km * torch.eye(d))

    def forward(self, x):
        return x + self.a(x) + self.m(x)


def test_branch_to_stream_ratio_exact_on_planted_branches():
    from prores_algo.monitor import branch_to_stream_ratio

    model = torch.nn.Sequential(_ScaledBranchLayer(8, 0.25, 0.5), _ScaledBranchLayer(8, 2.0, 0.125))
    x = torch.randn(3, 5, 8)
    r = branch_to_stream_ratio(model, x)
    assert r['per_branch'][0] == pytest.approx([0.25, 0.5])
    assert r['per_branch'][1] == pytest.approx([2.0, 0.125])
    assert (r['min'], r['max']) == (pytest.approx(0.125), pytest.approx(2.0))
    assert r['median'] == pytest.approx(0.5)  # upper median of the four
    assert model.training  # the train/eval mode is given back


def test_branch_to_stream_ratio_sees_alpha_when_prores_is_attached():
    """Measured on what runs: with ProRes attached at t = 0 every branch is α·F = 0."""
    from prores_algo import apply_prores
    from prores_algo.monitor import branch_to_stream_ratio

    model = torch.nn.Sequential(_ScaledBranchLayer(8, 0.25, 0.5), _ScaledBranchLayer(8, 2.0, 0.125))
    prores = apply_prores(model, schedule='linear', t_warmup=200)
    prores.set_step(0)
    assert branch_to_stream_ratio(model, torch.randn(2, 4, 8))['max'] == 0.0


def test_branch_to_stream_ratio_of_the_reference_decoder_follows_its_init():
    """Official N(0, 0.02) at width 64 starts branches far smaller than PyTorch's defaults do."""
    from prores_algo.monitor import branch_to_stream_ratio
    from prores_algo.training.models import build_decoder

    ids = torch.randint(0, 257, (4, 64), generator=torch.Generator().manual_seed(0))
    ratios = {}
    for init in ('official', 'torch'):
        torch.manual_seed(0)
        model = build_decoder(vocab_size=257, d_model=64, n_layers=4, n_heads=4, max_seq_len=64, init=init)
        ratios[init] = branch_to_stream_ratio(model, ids)['median']
    assert 0.01 < ratios['official'] < 0.06 and 0.06 < ratios['torch'] < 0.2
