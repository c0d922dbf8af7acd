"""The Composer algorithm in a real Trainer: α per batch, logging, units, removal, resume, compile."""

import copy

import pytest
import torch
from composer import Callback, Trainer
from composer.loggers import InMemoryLogger

from prores_algo import ProRes, alpha_schedules
from tests.support.helpers import alpha_buffers, assert_prores_removed, tiny_composer_model, token_loader


class RecordAlphas(Callback):
    """Reads the α buffers the forward pass will use, right before it runs."""

    def __init__(self):
        self.seen = []

    def before_forward(self, state, logger):
        self.seen.append((int(state.timestamp.batch), alpha_buffers(state.model)))


def make_trainer(algo, max_duration='12ba', callbacks=(), seed=0, **kw):
    model = tiny_composer_model(seed=seed)
    return Trainer(
        model=model,
        train_dataloader=token_loader(),
        max_duration=max_duration,
        algorithms=[algo],
        callbacks=list(callbacks),
        seed=seed,
        device='cpu',
        progress_bar=False,
        log_to_console=False,
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
        **kw,
    )


def test_alpha_follows_schedule_each_batch_is_logged_and_removed_after_warmup():
    rec, mem = RecordAlphas(), InMemoryLogger()
    algo = ProRes(schedule='linear', t_warmup='8ba')
    trainer = make_trainer(algo, callbacks=[rec], loggers=[mem])
    assert algo.controller.num_layers == 4 and algo.controller.num_hooks == 8
    trainer.fit()
    for batch, buffers in rec.seen:
        if batch < 8:
            expected = alpha_schedules.alphas('linear', 4, batch, 8)
            assert len(buffers) == 8  # both branches of every layer
            for path, value in buffers.items():
                layer = int(path.split('blocks.')[1].split('.')[0])
                assert value == pytest.approx(expected[layer], abs=1e-7), (batch, path)
        else:
            assert buffers == {}, 'hooks must be gone once every α is 1 for good'
    assert [b for b, _ in rec.seen] == list(range(12))
    logged = mem.data['prores/alpha/layer_3']
    assert [v for _, v in logged] == pytest.approx([alpha_schedules.alpha('linear', 3, 4, t, 8) for t in range(12)])
    assert algo.controller.removed and algo.controller.num_hooks == 0
    assert assert_prores_removed(trainer.state.model) == 8  # α buffers stay, inert (1.0, no hook)
    assert mem.data['prores/alpha/mean'][0][1] == 0.0


def test_default_warmup_is_1000_batches_per_layer():
    algo = ProRes()
    make_trainer(algo, max_duration='2ba')
    assert algo.controller.warmup_steps == 4000


def test_dur_warmup_resolves_against_max_duration():
    rec = RecordAlphas()
    algo = ProRes(t_warmup='0.5dur', schedule='equal')
    trainer = make_trainer(algo, max_duration='10ba', callbacks=[rec])
    trainer.fit()
    assert algo.controller.warmup_steps == 5
    assert rec.seen[2][1]['model.blocks.0.attn.o_proj'] == pytest.approx(2 / 5)


def test_token_warmup_uses_token_timestamp():
    rec = RecordAlphas()
    algo = ProRes(t_warmup='512tok')  # 64 tokens per batch -> done after 8 batches
    make_trainer(algo, max_duration='10ba', callbacks=[rec]).fit()
    for batch, buffers in rec.seen[:8]:
        expect = alpha_schedules.alpha('linear', 1, 4, 64 * batch, 512)
        assert buffers['model.blocks.1.mlp.down_proj'] == pytest.approx(expect)
    assert rec.seen[8][1] == {}


def test_log_interval():
    mem = InMemoryLogger()
    make_trainer(ProRes(t_warmup='100ba', log_interval='4ba'), loggers=[mem]).fit()
    assert len(mem.data['prores/alpha/layer_0']) == 3  # batches 0, 4, 8


def test_warns_when_warmup_longer_than_run():
    with pytest.warns(UserWarning, match='exceeds max_duration'):
        make_trainer(ProRes(t_warmup='100ba'), max_duration='3ba').fit()


def test_loss_falls_and_branches_train():
    mem = InMemoryLogger()
    trainer = make_trainer(ProRes(t_warmup='20ba'), max_duration='40ba', loggers=[mem])
    before = copy.deepcopy(trainer.state.model.model.blocks[3].mlp.down_proj.weight.detach())
    trainer.fit()
    losses = [v for _, v in mem.data['loss/train/total']]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert not torch.equal(before, trainer.state.model.model.blocks[3].mlp.down_proj.weight)


def _final_params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_is_bitwise_exact(tmp_path):
    def run(max_duration, save_folder=None, load_path=None):
        rec = RecordAlphas()
        trainer = make_trainer(
            ProRes(t_warmup='12ba'),
            max_duration=max_duration,
            callbacks=[rec],
            save_folder=save_folder,
            save_interval='4ba',
            load_path=load_path,
        )
        trainer.fit()
        return trainer, rec

    straight, rec_straight = run('8ba')
    run('4ba', save_folder=str(tmp_path / 'ckpt'))
    resumed, rec_resumed = run('8ba', load_path=str(tmp_path / 'ckpt' / 'ep0-ba4-rank0.pt'))
    assert [b for b, _ in rec_resumed.seen] == [4, 5, 6, 7]
    assert rec_resumed.seen == rec_straight.seen[4:]
    a, b = _final_params(straight.state.model), _final_params(resumed.state.model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_under_different_configuration_is_refused(tmp_path):
    make_trainer(ProRes(t_warmup='12ba'), max_duration='2ba', save_folder=str(tmp_path), save_interval='2ba').fit()
    with pytest.raises(ValueError, match=r'trained with a different ProRes configuration.*t_warmup'):
        make_trainer(ProRes(t_warmup='24ba'), max_duration='4ba', load_path=str(tmp_path / 'ep0-ba2-rank0.pt'))


def test_state_dict_keys_unchanged_by_algorithm():
    plain = tiny_composer_model()
    trainer = make_trainer(ProRes(t_warmup='8ba'))
    assert trainer.state.model.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize(
    'kwargs,match',
    [
        (dict(schedule='cosine'), 'unknown schedule'),
        (dict(t_warmup=0), 't_warmup must be positive'),
        (dict(t_warmup=-3), 't_warmup must be positive'),
        (dict(t_warmup='1000'), 'not a Time string'),
        (dict(t_warmup='2ep'), 'batches'),
        (dict(t_warmup='1.5dur'), 'more than the whole run'),
        (dict(lr_warmup_delay='-5ba'), 'lr_warmup_delay must be >= 0'),
        (dict(lr_warmup_delay='soon'), 'lr_warmup_delay'),
        (dict(log_interval=0), 'log_interval'),
        (dict(branches='attn.o_proj'), 'branches must be a non-empty list'),
    ],
)
def test_bad_arguments_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProRes(**kwargs)


def test_model_without_residual_branches_is_an_error():
    from composer.models import ComposerClassifier

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    model = ComposerClassifier(net, num_classes=2)
    with pytest.raises(ValueError, match='found no residual branch'):
        Trainer(model=model, algorithms=[ProRes()], device='cpu', progress_bar=False)


def test_same_instance_twice_is_an_error():
    algo = ProRes(t_warmup='8ba')
    make_trainer(algo, max_duration='1ba')
    with pytest.raises(ValueError, match='already applied'):
        make_trainer(algo, max_duration='1ba')


def test_alpha_updates_do_not_recompile_under_torch_compile():
    from torch._dynamo.testing import CompileCounter

    from prores_algo import apply_prores
    from prores_algo.training.models.decoder import Decoder
    from tests.support.helpers import tiny_config

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Decoder(tiny_config())
    ctrl = apply_prores(model, t_warmup=10)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randint(0, 64, (2, 16))
    outs = []
    for step in range(10):
        ctrl.set_step(step)
        outs.append(compiled(x))
    assert counter.frame_count == 1, 'α updates must not recompile'
    assert not torch.equal(outs[1], outs[5])  # α really changed the output
    ctrl.set_step(10)  # warmup over: hooks removed -> exactly one recompilation
    compiled(x)
    compiled(x)
    assert counter.frame_count == 2
    torch._dynamo.reset()
