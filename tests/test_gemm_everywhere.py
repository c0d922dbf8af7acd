"""α inside the GEMM for every architecture, not only for branches ending in a plain nn.Linear.

GPT-2 (Conv1D, then a dropout), GPT-NeoX (Linear, then a dropout), Falcon (FalconLinear), Mixtral and
Qwen2-MoE (weighted sum of experts) and transformers' MPT carry α in the GEMM of the projection producing
each branch (`policies.FOLD_TARGETS` names it where the branch ends in a weightless module). For each:
the default mechanism is 'gemm' on every branch, training matches the output hook (dropout included),
removal restores the exact model, compiled models do not recompile when α changes, `fold_prores` equals
the live model, and one training step moves (exactly counted) at most 0.2x the extra bytes of the hook.
Layer-level conformance (x + α·F(x)) of the same models runs in test_architectures / test_more_architectures.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

from benchmarks.arch_bytes import ARCHITECTURES, extra_bytes
from benchmarks.arch_bytes import build as build_tiny
from prores_algo import apply_prores
from prores_algo.export import fold_prores
from prores_algo.scaled_linear import has_scaled_forward
from prores_algo.surgery import has_prores_hook
from tests.test_architectures import ARCH_BY_NAME
from tests.test_more_architectures import build as build_more

BATCH, SEQ = 2, 8


def _build(name):
    if name in ARCH_BY_NAME:
        return ARCH_BY_NAME[name].build()
    return build_more(name)


GEMM_ARCHS = [
    'gpt2',
    'gpt_neox_parallel',
    'gpt_neox_sequential',
    'falcon_sequential',
    'falcon_new_arch',
    'mixtral',
    'qwen2_moe',
    'mpt',
]


def _ids(model, seed=1):
    return torch.randint(1, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def _no_prores_left(model):
    return not any(has_prores_hook(m) or m._forward_hooks or 'forward' in m.__dict__ for m in model.modules())


@pytest.mark.parametrize('name', GEMM_ARCHS)
def test_gemm_everywhere_default_mechanism_is_gemm_on_every_branch(name, caplog):
    model = _build(name)
    with caplog.at_level('INFO', logger='prores_algo.surgery'):
        ctrl = apply_prores(model, t_warmup=1000)
    assert len(ctrl.mechanisms) == 2 * ctrl.num_layers == ctrl.num_hooks
    assert set(ctrl.mechanisms.values()) == {'gemm'}, ctrl.mechanisms
    n = len(ctrl.mechanisms)
    assert f'α inside the GEMMs for {n} of {n} residual branches' in caplog.text
    assert not any(m._forward_hooks for m in model.modules())  # no output hook anywhere
    scaled = [m for m in model.modules() if has_scaled_forward(m)]
    assert scaled and all(has_prores_hook(m) for m in scaled)
    if name == 'mixtral':  # every expert's down projection carries α (and nothing else in the MoE block)
        moe = model.model.layers[0].block_sparse_moe
        assert all(has_scaled_forward(e.w2) and not has_scaled_forward(e.w1) for e in moe.experts)
        assert not has_scaled_forward(moe.gate)
    hook = apply_prores(_build(name), t_warmup=1000, mechanism='hook')
    assert set(hook.mechanisms.values()) == {'hook'} and hook.mechanisms.keys() == ctrl.mechanisms.keys()


def test_gemm_everywhere_branch_without_gemm_keeps_the_hook():
    """A weightless branch end whose FOLD_TARGETS cannot all scale in their GEMM (here: one is a LoRA-like
    Linear subclass with its own forward) stays on the output hook, and `mechanisms` says so."""

    class Lora(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 0.0

    model = _build('gpt2')
    model.transformer.h[1].mlp.c_proj = Lora(4 * 32, 32)
    ctrl = apply_prores(model, t_warmup=1000)
    assert ctrl.mechanisms['transformer.h.1.mlp.dropout'] == 'hook'
    assert ctrl.mechanisms['transformer.h.1.attn.resid_dropout'] == 'gemm'
    assert model.transformer.h[1].mlp.dropout._forward_hooks


def _dropout_model(name):
    torch.manual_seed(0)
    if name == 'gpt2':
        cfg = T.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64, resid_pdrop=0.2)
        return T.GPT2LMHeadModel(cfg)
    if name == 'gpt_neox':
        cfg = T.GPTNeoXConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            hidden_dropout=0.2,
            use_parallel_residual=False,
        )
        return T.GPTNeoXForCausalLM(cfg)
    cfg = T.MptConfig(d_model=32, n_heads=4, n_layers=3, max_seq_len=64, vocab_size=64, attn_config={'attn_pdrop': 0.2})
    return T.MptForCausalLM(cfg)


@pytest.mark.parametrize('name', ['gpt2', 'gpt_neox', 'mpt'])
def test_gemm_everywhere_dropout_in_train_mode_matches_the_hook(name):
    """dropout(α·y) = α·dropout(y) for the same mask: scaling the projection before the dropout is exact."""
    gemm = _dropout_model(name).train()
    hook = copy.deepcopy(gemm)
    alphas = [0.25, 0.5, 0.75]
    c1, c2 = apply_prores(gemm, t_warmup=1000), apply_prores(hook, t_warmup=1000, mechanism='hook')
    assert set(c1.mechanisms.values()) == {'gemm'} and set(c2.mechanisms.values()) == {'hook'}
    c1.set_alphas(alphas)
    c2.set_alphas(alphas)
    ids = _ids(gemm)
    losses = []
    for m in (gemm, hook):
        torch.manual_seed(123)  # the same dropout masks in both
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    torch.manual_seed(123)
    assert not torch.equal(losses[0], hook.eval()(input_ids=ids, labels=ids).loss)  # dropout did act
    grads = dict(hook.named_parameters())
    for n, p in gemm.named_parameters():
        torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize('name', GEMM_ARCHS)
def test_gemm_everywhere_removal_restores_the_exact_model(name):
    model = _build(name)
    ref = copy.deepcopy(model)
    ctrl = apply_prores(model, t_warmup=1000)
    ctrl.set_alphas([0.3, 0.6, 0.9])
    ids = _ids(model)
    with torch.no_grad():
        plain = _logits(ref, ids)
        assert not torch.allclose(_logits(model, ids), plain, atol=1e-4)
        ctrl.remove()
        assert _no_prores_left(model)
        assert torch.equal(_logits(model, ids), plain)  # bitwise: every class forward is back


@pytest.mark.parametrize('name', GEMM_ARCHS)
def test_gemm_everywhere_alpha_one_is_bitwise_the_plain_model(name):
    model = _build(name)
    ref = copy.deepcopy(model)
    ctrl = apply_prores(model, t_warmup=1000, remove_when_done=False)
    ctrl.set_step(1000)
    ids = _ids(model)
    with torch.no_grad():
        assert torch.equal(_logits(model, ids), _logits(ref, ids))


@pytest.mark.parametrize('name', GEMM_ARCHS)
@pytest.mark.parametrize('via', ['controller', 'model'])
def test_gemm_everywhere_fold_prores_equals_the_live_model(name, via):
    model = _build(name)
    ctrl = apply_prores(model, t_warmup=1000)
    ctrl.set_alphas([0.3, 0.6, 0.9])
    ids = _ids(model)
    with torch.no_grad():
        live = _logits(model, ids)
        fold_prores(ctrl if via == 'controller' else model)
        assert _no_prores_left(model)
        torch.testing.assert_close(_logits(model, ids), live, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', [*GEMM_ARCHS, 'llama', 'opt', 'phi'])
def test_gemm_everywhere_compiled_no_recompile_when_alpha_changes(name):
    torch._dynamo.reset()
    model = _build(name)
    eager = copy.deepcopy(model)
    ctrl, ctrl_eager = apply_prores(model, t_warmup=1000), apply_prores(eager, t_warmup=1000)
    graphs = []  # the code of every graph dynamo compiles

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    ids = _ids(model)
    frames = None
    with torch.no_grad():
        for step in (100, 400, 700, 999):
            ctrl.set_step(step)
            ctrl_eager.set_step(step)
            torch.testing.assert_close(compiled(input_ids=ids, use_cache=False).logits, _logits(eager, ids))
            if frames is None:
                frames = len(graphs)
                assert frames >= 1
    assert len(graphs) == frames, 'α updates recompiled'
    assert any('prores_alpha' in code for code in graphs)  # traced: α is the buffer, a graph input
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------- bytes moved


# aliasing ops that do not carry the view flag (_unsafe_view: what matmul returns for a folded batch)
@pytest.mark.parametrize('name', list(ARCHITECTURES))
def test_gemm_everywhere_default_moves_at_most_a_fifth_of_the_hook_bytes(name):
    """Counted exactly by `benchmarks.arch_bytes` (the numbers in benchmarks/RESULTS.md come from it)."""
    r = extra_bytes(build_tiny(name))
    assert r['branches_in_gemm'] == r['branches'] == 4
    assert r['hook_extra_bytes'] > 4 * 2 * 8 * 32  # the hook reads and writes at least one activation per branch
    assert r['default_extra_bytes'] <= 0.2 * r['hook_extra_bytes'], (name, r)


def test_gemm_everywhere_second_apply_refused_on_gemm_targets():
    model = _build('gpt2')
    ctrl = apply_prores(model, t_warmup=1000)
    with pytest.raises(ValueError, match='already applied'):
        apply_prores(model, t_warmup=1000)  # the dropouts carry nothing; their c_proj do
    with pytest.raises(ValueError, match='already applied'):
        apply_prores(model, t_warmup=1000, mechanism='hook')
    ctrl.remove()
    hooked = apply_prores(model, t_warmup=1000, mechanism='hook')  # the other way round: the dropouts carry α
    with pytest.raises(ValueError, match='already applied'):
        apply_prores(model, t_warmup=1000)
    hooked.remove()
    again = apply_prores(model, t_warmup=1000)
    assert set(again.mechanisms.values()) == {'gemm'}


def test_gemm_everywhere_refresh_follows_a_replaced_projection():
    """Another surgery swaps a GEMM target (here GPT-2's c_proj) after ProRes: refresh() moves α onto it."""
    from transformers.pytorch_utils import Conv1D

    model = _build('gpt2')
    ctrl = apply_prores(model, t_warmup=1000)
    ctrl.set_alphas([0.3, 0.6, 0.9])
    ids = _ids(model)
    with torch.no_grad():
        before = _logits(model, ids)
    old = model.transformer.h[1].mlp.c_proj
    new = Conv1D(32, 4 * 32)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.bias.copy_(old.bias)
    model.transformer.h[1].mlp.c_proj = new
    assert ctrl.refresh() == 1
    assert has_scaled_forward(new) and not has_scaled_forward(old)
    assert new.__dict__['_prores_alpha_value'] == 0.6 and ctrl.num_hooks == 6
    with torch.no_grad():
        torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)


def _train(model, ctrl, opt, ids, steps):
    """Optimizer steps `steps` (an iterable of step indices): α from the step, then forward, backward, update."""
    losses = []
    for step in steps:
        ctrl.set_step(step)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize('name', [*GEMM_ARCHS, 'llama', 'opt', 'phi'])
def test_gemm_everywhere_exact_resume(name, tmp_path):
    """Train 6 steps straight, or 3, save model + optimizer, rebuild a differently seeded model, apply ProRes,
    load, train 3 more: the same losses, α and parameters, bitwise. W = 8 steps, so the resumed run is still
    mid-warmup (α rides in the GEMM) and the scaled projections load the saved weights, not the fresh ones."""
    warmup, total, cut = 8, 6, 3

    def fresh(seed):
        torch.manual_seed(seed)
        model = _build(name).train()
        for m in model.modules():  # dropout draws from the RNG; resume of the RNG is not what this test checks
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        ctrl = apply_prores(model, t_warmup=warmup)
        return model, ctrl, torch.optim.AdamW(model.parameters(), lr=1e-2)

    ids = _ids(_build(name))
    straight_model, ctrl, opt = fresh(0)
    straight = _train(straight_model, ctrl, opt, ids, range(total))
    straight_alphas = ctrl.alphas

    model, ctrl, opt = fresh(0)
    first = _train(model, ctrl, opt, ids, range(cut))
    torch.save({'model': model.state_dict(), 'opt': opt.state_dict(), 'step': cut}, tmp_path / 'ckpt.pt')
    state = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    resumed_model, ctrl, opt = fresh(1)
    resumed_model.load_state_dict(state['model'])
    opt.load_state_dict(state['opt'])
    rest = _train(resumed_model, ctrl, opt, ids, range(state['step'], total))

    assert ctrl.mechanisms and set(ctrl.mechanisms.values()) == {'gemm'}
    assert first + rest == straight
    assert ctrl.alphas == straight_alphas and 0 < min(straight_alphas) < 1
    resumed = resumed_model.state_dict()
    assert list(resumed) == list(straight_model.state_dict())
    for k, a in straight_model.state_dict().items():
        assert torch.equal(a, resumed[k]), k
