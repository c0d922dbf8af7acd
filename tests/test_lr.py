"""WSD schedule and the LR-warmup delay, observed through Composer's LRMonitor in real Trainer runs."""

import pytest
import torch
from composer import Trainer
from composer.callbacks import LRMonitor
from composer.loggers import InMemoryLogger
from composer.optim import ConstantScheduler, CosineAnnealingWithWarmupScheduler, LinearWithWarmupScheduler

from prores_algo import ProRes
from prores_algo.integrations.composer import WSDScheduler
from prores_algo.lr_schedules import delayed_time, wsd_multiplier
from tests.support.helpers import tiny_composer_model, token_loader

LR = 1e-2


def test_wsd_multiplier_shape():
    # 10 warmup, stable, decay over the last 20 of 100 to alpha_f = 0.1
    f = lambda t: wsd_multiplier(t, 100, 10, 20, alpha_f=0.1)
    assert f(0) == 0.0 and f(5) == 0.5 and f(10) == 1.0 and f(50) == 1.0 and f(80) == 1.0
    assert f(90) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)
    with pytest.raises(ValueError, match='warmup'):
        wsd_multiplier(0, 10, 8, 5)


def test_delayed_time_pieces():
    # D = 10, Wlr = 5, M = 100: hold, full-length warmup, compressed remainder ending at M
    assert [delayed_time(t, 10, 5, 100) for t in (0, 9, 10, 12, 15)] == [0, 0, 0, 2, 5]
    assert delayed_time(100, 10, 5, 100) == 100
    assert delayed_time(57.5, 10, 5, 100) == pytest.approx(5 + 42.5 * 95 / 85)


def run_lrs(scheduler, delay, max_duration='40ba'):
    mem = InMemoryLogger()
    model = tiny_composer_model()
    trainer = Trainer(
        model=model,
        train_dataloader=token_loader(n=400),
        max_duration=max_duration,
        optimizers=torch.optim.SGD(model.parameters(), lr=LR),
        schedulers=scheduler,
        algorithms=[ProRes(t_warmup='10ba', lr_warmup_delay=delay)],
        callbacks=[LRMonitor()],
        loggers=[mem],
        device='cpu',
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    return [v / LR for _, v in mem.data['lr-SGD/group0']], trainer


@pytest.mark.parametrize(
    'make',
    [
        lambda: LinearWithWarmupScheduler(t_warmup='8ba', alpha_f=0.0),
        lambda: CosineAnnealingWithWarmupScheduler(t_warmup='8ba', alpha_f=0.1),
        lambda: WSDScheduler(lr_warmup='8ba', lr_decay='0.25dur', alpha_f=0.0),
    ],
    ids=['linear', 'cosine', 'wsd'],
)
def test_lr_warmup_delay_matches_specification(make):
    D, W, M = 6, 8, 40
    base, _ = run_lrs(make(), '0ba')
    delayed, _ = run_lrs(make(), f'{D}ba')
    assert len(base) == len(delayed) == M
    # LRMonitor logs the multiplier of the scheduler at the current timestamp, for t = 0..M-1
    assert delayed[: D + 1] == [base[0]] * (D + 1)  # holds its t = 0 value through the delay
    for k in range(W + 1):  # then the warmup runs its full length from D
        assert delayed[D + k] == pytest.approx(base[k], abs=1e-12), k
    # the post-warmup part is compressed: the delayed schedule at real t equals the undelayed one at tau(t)
    for t in range(D + W, M):
        tau = delayed_time(t, D, W, M)
        if tau == int(tau):
            assert delayed[t] == pytest.approx(base[int(tau)], abs=1e-12)
    # ... and reaches the final value at max_duration (t = M, evaluated directly)
    assert make()(_FakeState(M, M)) == pytest.approx(_delayed_value_at(make(), D, M, M))


class _FakeState:
    """Just enough of a State for a scheduler evaluated outside a run (timestamp and max_duration)."""

    def __init__(self, t, m):
        from composer.core import Time, Timestamp

        self.timestamp = Timestamp(batch=t)
        self.max_duration = Time(m, 'ba')
        self.dataloader_len = None


def _delayed_value_at(scheduler, D, t, M):
    from composer.core import Time

    tau = delayed_time(
        t, D, int(Time.from_timestring(str(getattr(scheduler, 't_warmup', None) or scheduler.lr_warmup)).value), M
    )
    return scheduler(_FakeState(int(round(tau)), M))


def test_delay_survives_checkpoint_and_does_not_pickle_state(tmp_path):
    sched = lambda: LinearWithWarmupScheduler(t_warmup='8ba')

    def trainer(**kw):
        mem = InMemoryLogger()
        model = tiny_composer_model()
        t = Trainer(
            model=model,
            train_dataloader=token_loader(n=400),
            max_duration='20ba',
            optimizers=torch.optim.SGD(model.parameters(), lr=LR),
            schedulers=sched(),
            algorithms=[ProRes(t_warmup='10ba', lr_warmup_delay='6ba')],
            callbacks=[LRMonitor()],
            loggers=[mem],
            device='cpu',
            progress_bar=False,
            **kw,
        )
        t.fit()
        return t, [v / LR for _, v in mem.data['lr-SGD/group0']]

    straight, lrs = trainer(save_folder=str(tmp_path), save_interval='10ba')
    sd = straight.state.schedulers[0].state_dict()
    assert all(v is None for v in sd.get('_lr_lambdas', sd.get('lr_lambdas', [None]))), (
        'the delay wrapper must not be pickled (it would drag the State into checkpoints)'
    )
    ckpt = torch.load(tmp_path / 'ep0-ba10-rank0.pt', weights_only=False)
    assert 'State' not in repr(ckpt['state']['schedulers'])
    _, resumed = trainer(load_path=str(tmp_path / 'ep0-ba10-rank0.pt'))
    assert resumed == pytest.approx(lrs[10:], abs=1e-12)
    assert lrs[:7] == [0.0] * 7


def test_no_parameter_moves_during_delay():
    """Composer steps schedulers before the timestamp advances, so batch t trains with m(t-1): with D = 6
    the multiplier is 0 for t <= 6 and batches 0..7 move nothing; batch 8 is the first update."""
    from composer import Callback

    class Snapshot(Callback):
        def __init__(self):
            self.at = {}

        def batch_start(self, state, logger):
            self.at[int(state.timestamp.batch)] = {k: v.clone() for k, v in state.model.state_dict().items()}

    snap = Snapshot()
    model = tiny_composer_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(
        model=model,
        train_dataloader=token_loader(n=400),
        max_duration='40ba',
        optimizers=torch.optim.SGD(model.parameters(), lr=LR),
        schedulers=LinearWithWarmupScheduler(t_warmup='8ba'),
        algorithms=[ProRes(t_warmup='10ba', lr_warmup_delay='6ba')],
        callbacks=[snap],
        device='cpu',
        progress_bar=False,
    ).fit()
    assert all(torch.equal(initial[k], snap.at[8][k]) for k in initial)
    assert not all(torch.equal(initial[k], snap.at[9][k]) for k in initial)


def test_delay_with_scheduler_without_warmup_is_an_error():
    with pytest.raises(ValueError, match='cannot shift ConstantScheduler'):
        run_lrs(ConstantScheduler(), '4ba')


def test_delay_without_scheduler_is_an_error():
    model = tiny_composer_model()
    trainer = Trainer(
        model=model,
        train_dataloader=token_loader(),
        max_duration='2ba',
        optimizers=torch.optim.SGD(model.parameters(), lr=LR),
        algorithms=[ProRes(t_warmup='10ba', lr_warmup_delay='4ba')],
        device='cpu',
        progress_bar=False,
    )
    with pytest.raises(ValueError, match='no LR scheduler'):
        trainer.fit()


def test_delay_with_pytorch_scheduler_is_an_error():
    model = tiny_composer_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    trainer = Trainer(
        model=model,
        train_dataloader=token_loader(),
        max_duration='2ba',
        optimizers=opt,
        schedulers=torch.optim.lr_scheduler.StepLR(opt, 5),
        step_schedulers_every_batch=True,
        algorithms=[ProRes(t_warmup='10ba', lr_warmup_delay='4ba')],
        device='cpu',
        progress_bar=False,
    )
    with pytest.raises(ValueError, match='cannot shift StepLR'):
        trainer.fit()
