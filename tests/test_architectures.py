"""ProRes on real architectures: tiny random-weight Hugging Face models (CPU, float32, eager attention).

For every architecture in prores_algo.policies we check, against an *unhooked* deep copy of the model
made before `apply_prores`:
  * layer level: each hooked layer equals a hand-written `x + α·F(x)` (Pre-LN), `Norm(x + α·F(x))`
    (Post-LN) or `x + α·PostNorm(F(Norm(x)))` (sandwich) built from the copy's submodules;
  * model level: α = 1 is bit-identical to the original model, α = 0 turns every layer into the
    identity (Pre-LN) or into its norms only (Post-LN), intermediate α changes the output;
  * state_dict keys, remove(), optimizers built before the surgery, gradients at α = 0;
  * Composer's HuggingFaceModel wrapper, activation checkpointing, bf16 autocast, custom models.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn
from torch.testing import assert_close

from prores_algo import apply_prores
from prores_algo.policies import LAYER_POLICIES
from prores_algo.surgery import ALPHA_BUFFER, has_prores_hook

VOCAB, HIDDEN, N_LAYERS, SEQ, BATCH = 97, 32, 3, 8, 2
EXACT = dict(atol=0.0, rtol=0.0)
# The hooked layer and the reference run the same kernels on the same inputs in the same order (α is a
# float32-representable number in both), so they agree to the last bit in practice; 1e-6 only leaves room
# for a different summation order inside a kernel.
TOL = dict(atol=1e-6, rtol=1e-6)
MIXED_ALPHAS = (0.0, 0.37, 1.0)  # one layer off, one warming up, one fully on

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    attn_implementation='eager',
)


# ------------------------------------------------------------------------------------- layer references
# Each takes the layer of the UNHOOKED copy, the input x, the layer's α and the context of `_ctx_*`, and
# re-implements the layer's forward (transformers 4.57) with α on each residual branch. The additions keep
# the operand order of the HF code so that float rounding is the same.


def _ref_llama(layer, x, a, ctx):
    attn = layer.self_attn(
        layer.input_layernorm(x), position_embeddings=ctx['position_embeddings'], attention_mask=ctx['attention_mask']
    )[0]
    h = x + a * attn
    return h + a * layer.mlp(layer.post_attention_layernorm(h))


def _ref_gemma2(layer, x, a, ctx):  # sandwich: x + α·PostNorm(F(PreNorm(x)))
    attn = layer.self_attn(
        layer.input_layernorm(x), position_embeddings=ctx['position_embeddings'], attention_mask=ctx['attention_mask']
    )[0]
    h = x + a * layer.post_attention_layernorm(attn)
    return h + a * layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))


def _ref_gpt2(layer, x, a, ctx):
    h = a * layer.attn(layer.ln_1(x))[0] + x
    return h + a * layer.mlp(layer.ln_2(h))


def _ref_neox(layer, x, a, ctx):
    attn = (
        a
        * layer.attention(
            layer.input_layernorm(x), ctx['attention_mask'], position_embeddings=ctx['position_embeddings']
        )[0]
    )
    if layer.use_parallel_residual:  # x + α·attn(ln1(x)) + α·mlp(ln2(x))
        return a * layer.mlp(layer.post_attention_layernorm(x)) + attn + x
    h = attn + x
    return a * layer.mlp(layer.post_attention_layernorm(h)) + h


def _ref_opt(layer, x, a, ctx):
    pre = layer.do_layer_norm_before
    h = (
        x
        + a
        * layer.self_attn(
            hidden_states=layer.self_attn_layer_norm(x) if pre else x, attention_mask=ctx['attention_mask']
        )[0]
    )
    if not pre:
        h = layer.self_attn_layer_norm(h)
    mlp = layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(h) if pre else h)))
    out = h + a * mlp
    return out if pre else layer.final_layer_norm(out)


def _ref_bert(layer, x, a, ctx):  # Post-LN: LN(x + α·F(x))
    attn = layer.attention.output.dense(layer.attention.self(x)[0])
    h = layer.attention.output.LayerNorm(a * attn + x)
    return layer.output.LayerNorm(a * layer.output.dense(layer.intermediate(h)) + h)


# ------------------------------------------------------------------------------------- layer contexts


def _causal_mask(x):
    s = x.shape[1]
    mask = torch.full((s, s), torch.finfo(x.dtype).min).triu(1)
    return mask[None, None].expand(x.shape[0], 1, s, s)


def _ctx_rope(model, x):
    pos = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
    return dict(
        attention_mask=_causal_mask(x), position_ids=pos, position_embeddings=model.base_model.rotary_emb(x, pos)
    )


def _ctx_neox(model, x):
    pos = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
    return dict(attention_mask=_causal_mask(x), position_embeddings=model.base_model.rotary_emb(x, pos))


def _ctx_mask(model, x):
    return dict(attention_mask=_causal_mask(x))


def _ctx_none(model, x):  # GPT-2 masks causally by itself; BERT attends bidirectionally
    return {}


# ------------------------------------------------------------------------------------- architectures


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], nn.Module]
    layers: Callable[[nn.Module], nn.ModuleList]
    ctx: Callable
    ref: Callable
    final_norm: Callable[[nn.Module], nn.Module]  # base model -> the norm after the last layer
    branch_weights: tuple[str, ...]  # weights inside each layer that only feed a residual branch
    post_ln: bool = False

    def __str__(self):
        return self.name


def _seeded(fn):
    def build():
        torch.manual_seed(0)
        return fn().float().eval()

    return build


def _layer_alpha0_post_ln(layer, x):
    """A Post-LN layer at α = 0: only its norms remain."""
    if isinstance(layer, T.models.bert.modeling_bert.BertLayer):
        return layer.output.LayerNorm(layer.attention.output.LayerNorm(x))
    return layer.final_layer_norm(layer.self_attn_layer_norm(x))  # OPT, do_layer_norm_before=False


_LLAMA_BRANCH_WEIGHTS = ('self_attn.o_proj.weight', 'mlp.down_proj.weight')


def _llama_like(name, model_cls, config_cls, **extra):
    return Arch(
        name,
        _seeded(lambda: model_cls(config_cls(**_COMMON, num_key_value_heads=2, **extra))),
        lambda m: m.model.layers,
        _ctx_rope,
        _ref_llama,
        lambda base: base.norm,
        _LLAMA_BRANCH_WEIGHTS,
    )


def _neox(parallel):
    def build():
        model = T.GPTNeoXForCausalLM(
            T.GPTNeoXConfig(**_COMMON, hidden_dropout=0.0, attention_dropout=0.0, use_parallel_residual=parallel)
        )
        assert all(layer.use_parallel_residual == parallel for layer in model.gpt_neox.layers)
        return model

    return Arch(
        f'gpt_neox_{"parallel" if parallel else "sequential"}',
        _seeded(build),
        lambda m: m.gpt_neox.layers,
        _ctx_neox,
        _ref_neox,
        lambda base: base.final_layer_norm,
        ('attention.dense.weight', 'mlp.dense_4h_to_h.weight'),
    )


def _opt(pre_ln):
    return Arch(
        'opt' if pre_ln else 'opt_post_ln',
        _seeded(
            lambda: T.OPTForCausalLM(
                T.OPTConfig(
                    vocab_size=VOCAB,
                    hidden_size=HIDDEN,
                    num_hidden_layers=N_LAYERS,
                    num_attention_heads=4,
                    ffn_dim=64,
                    max_position_embeddings=64,
                    word_embed_proj_dim=HIDDEN,
                    dropout=0.0,
                    attention_dropout=0.0,
                    activation_dropout=0.0,
                    do_layer_norm_before=pre_ln,
                    attn_implementation='eager',
                )
            )
        ),
        lambda m: m.model.decoder.layers,
        _ctx_mask,
        _ref_opt,
        lambda base: base.decoder.final_layer_norm or nn.Identity(),
        ('self_attn.out_proj.weight', 'fc2.weight'),
        post_ln=not pre_ln,
    )


ARCHS = [
    _llama_like('llama', T.LlamaForCausalLM, T.LlamaConfig),
    _llama_like('mistral', T.MistralForCausalLM, T.MistralConfig),
    _llama_like('qwen2', T.Qwen2ForCausalLM, T.Qwen2Config),
    _llama_like('qwen3', T.Qwen3ForCausalLM, T.Qwen3Config, head_dim=8),
    Arch(
        'gemma2',
        _seeded(lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**_COMMON, num_key_value_heads=2, head_dim=8))),
        lambda m: m.model.layers,
        _ctx_rope,
        _ref_gemma2,
        lambda base: base.norm,
        _LLAMA_BRANCH_WEIGHTS + ('post_attention_layernorm.weight', 'post_feedforward_layernorm.weight'),
    ),
    Arch(
        'gpt2',
        _seeded(
            lambda: T.GPT2LMHeadModel(
                T.GPT2Config(
                    vocab_size=VOCAB,
                    n_embd=HIDDEN,
                    n_layer=N_LAYERS,
                    n_head=4,
                    n_positions=64,
                    resid_pdrop=0.0,
                    embd_pdrop=0.0,
                    attn_pdrop=0.0,
                    attn_implementation='eager',
                )
            )
        ),
        lambda m: m.transformer.h,
        _ctx_none,
        _ref_gpt2,
        lambda base: base.ln_f,
        ('attn.c_proj.weight', 'mlp.c_proj.weight'),
    ),
    _neox(parallel=True),
    _neox(parallel=False),
    _opt(pre_ln=True),
    _opt(pre_ln=False),
    Arch(
        'bert',
        _seeded(
            lambda: T.BertForMaskedLM(
                T.BertConfig(**_COMMON, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
            )
        ),
        lambda m: m.bert.encoder.layer,
        _ctx_none,
        _ref_bert,
        lambda base: nn.Identity(),
        ('attention.output.dense.weight', 'output.dense.weight'),
        post_ln=True,
    ),
]
ARCH_BY_NAME = {a.name: a for a in ARCHS}
arch_params = pytest.mark.parametrize('arch', ARCHS, ids=str)


def _ids(seed=1, b=BATCH, s=SEQ):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def _random_alphas(seed=3):
    """Distinct α in (0, 1), float32-representable (so `a * t` equals `t * alpha_buffer` exactly)."""
    return torch.rand(N_LAYERS, generator=torch.Generator().manual_seed(seed)).tolist()


def _set_alphas(ctrl, alphas):
    alphas = [alphas] * ctrl.num_layers if isinstance(alphas, (int, float)) else list(alphas)
    assert len(alphas) == ctrl.num_layers
    for i, a in enumerate(alphas):
        ctrl._fill(i, a)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _hooked_and_reference(arch):
    model = arch.build()
    ref = copy.deepcopy(model)  # before the surgery: never hooked
    return model, ref, apply_prores(model, t_warmup=1000)


def _alpha_buffers(model):
    return [n for n, _ in model.named_buffers() if n.endswith(ALPHA_BUFFER)]


# ------------------------------------------------------------------------------------- 1. layer level


@arch_params
@pytest.mark.parametrize('alphas', [MIXED_ALPHAS, 'random'], ids=['mixed', 'random'])
def test_layer_matches_hand_written_reference(arch, alphas):
    model, ref, ctrl = _hooked_and_reference(arch)
    alphas = _random_alphas() if alphas == 'random' else alphas
    _set_alphas(ctrl, alphas)
    layer_cls = type(arch.layers(model)[0]).__name__
    assert [l.module for l in ctrl.layers] == list(arch.layers(model))
    assert all(l.branches == LAYER_POLICIES[layer_cls] for l in ctrl.layers)

    x = torch.randn(BATCH, SEQ, HIDDEN, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ctx = arch.ctx(ref, x)
        for i, (layer, ref_layer, a) in enumerate(zip(arch.layers(model), arch.layers(ref), alphas, strict=True)):
            # The reference itself is right: at α = 1 it is the HF layer's own forward.
            assert_close(arch.ref(ref_layer, x, 1.0, ctx), _first(ref_layer(x, **ctx)), **TOL)
            got = _first(layer(x, **ctx))
            assert_close(got, arch.ref(ref_layer, x, a, ctx), **TOL, msg=lambda m, i=i, a=a: f'layer {i}, α={a}: {m}')
            if 0.0 < a < 1.0:  # the check can fail: α really changes the layer
                assert (got - _first(ref_layer(x, **ctx))).abs().max() > 1e-3


# ------------------------------------------------------------------------------------- 2. whole model


@arch_params
def test_whole_model_alpha_one_zero_and_intermediate(arch):
    model, ref, ctrl = _hooked_and_reference(arch)
    ids = _ids()
    with torch.no_grad():
        expected = ref(input_ids=ids).logits

        _set_alphas(ctrl, 1.0)
        assert_close(model(input_ids=ids).logits, expected, **EXACT)

        _set_alphas(ctrl, _random_alphas())
        assert (model(input_ids=ids).logits - expected).abs().max() > 1e-3

        # α = 0: every layer is the identity (Pre-LN) or only its norms (Post-LN).
        _set_alphas(ctrl, 0.0)
        out = model.base_model(input_ids=ids, output_hidden_states=True)
        hs = out.hidden_states  # hs[k] is the input of layer k, hs[-1] the final output
        assert len(hs) == N_LAYERS + 1
        h = ref.base_model(input_ids=ids, output_hidden_states=True).hidden_states[0]
        assert_close(hs[0], h, **EXACT)  # embeddings are untouched
        for k, ref_layer in enumerate(arch.layers(ref)):
            assert_close(hs[k], h, **EXACT, msg=lambda m, k=k: f'input of layer {k}: {m}')
            h = _layer_alpha0_post_ln(ref_layer, h) if arch.post_ln else h
        assert_close(out.last_hidden_state, arch.final_norm(ref.base_model)(h), **EXACT)
        assert (out.last_hidden_state - ref.base_model(input_ids=ids).last_hidden_state).abs().max() > 1e-3


# ------------------------------------------------------------------------------------- 3. state dict, remove


@arch_params
def test_state_dict_keys_and_remove(arch):
    model, ref, ctrl = _hooked_and_reference(arch)
    keys = list(ref.state_dict().keys())
    assert list(model.state_dict().keys()) == keys
    assert len(_alpha_buffers(model)) == 2 * N_LAYERS
    model.load_state_dict(ref.state_dict())  # an HF checkpoint still loads (strict)

    ids = _ids()
    _set_alphas(ctrl, _random_alphas())
    with torch.no_grad():
        assert (model(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max() > 1e-3
        ctrl.remove()
        assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, **EXACT)
    assert list(model.state_dict().keys()) == keys
    # the α buffers stay, inert: 1.0 and read by no hook (a DDP wrapper keeps finding them)
    assert len(_alpha_buffers(model)) == 2 * N_LAYERS
    assert all(float(b) == 1.0 for n, b in model.named_buffers() if n.endswith(ALPHA_BUFFER))
    assert all(not m._forward_hooks for m in model.modules())
    assert ctrl.removed and ctrl.alphas == [1.0] * N_LAYERS
    apply_prores(model, t_warmup=10)  # can be applied again once removed


# ------------------------------------------------------------------------------------- 4. optimizer, grads


@arch_params
def test_optimizer_built_before_surgery_and_zero_alpha_grads(arch):
    model = arch.build().train()  # every dropout probability is 0: train mode is deterministic
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    ctrl = apply_prores(model, t_warmup=1000)
    assert dict(model.named_parameters()) == params  # same objects: nothing replaced
    ids = _ids()

    _set_alphas(ctrl, MIXED_ALPHAS)
    before = [{w: layer.get_parameter(w).detach().clone() for w in arch.branch_weights} for layer in arch.layers(model)]
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    for k, (layer, a) in enumerate(zip(arch.layers(model), MIXED_ALPHAS, strict=True)):
        for w in arch.branch_weights:
            changed = not torch.equal(layer.get_parameter(w), before[k][w])
            # Adam with zero gradient and no weight decay does not move a weight: α = 0 freezes the branch.
            assert changed == (a > 0), f'layer {k} (α={a}) {w}: changed={changed}'

    # α = 0 everywhere: branches get an all-zero gradient, but they are still in the graph (not None),
    # which DDP/FSDP need ("no branch is skipped").
    _set_alphas(ctrl, 0.0)
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    for k, layer in enumerate(arch.layers(model)):
        for n, p in layer.named_parameters():
            assert p.grad is not None, f'layer {k} {n}: no gradient (branch skipped)'
            if n in arch.branch_weights or not arch.post_ln:  # Pre-LN: the whole layer is branches
                assert torch.count_nonzero(p.grad) == 0, f'layer {k} {n}: non-zero gradient at α = 0'
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------------- 5. Composer wrapper

_ALPHA0_LOGITS = {  # hand-computed logits of a Pre-LN decoder whose layers are all the identity
    'llama': lambda m, ids: m.lm_head(m.model.norm(m.model.embed_tokens(ids))),
    'gpt2': lambda m, ids: m.lm_head(
        m.transformer.ln_f(m.transformer.wte(ids) + m.transformer.wpe(torch.arange(ids.shape[1])[None]))
    ),
}


@pytest.mark.parametrize('name', ['llama', 'gpt2'])
def test_composer_huggingface_model(name):
    from composer.models import HuggingFaceModel

    arch = ARCH_BY_NAME[name]
    hf = arch.build()
    raw = copy.deepcopy(hf)
    wrapped = HuggingFaceModel(hf, tokenizer=None, use_logits=True).eval()
    ref = copy.deepcopy(wrapped)
    ctrl = apply_prores(wrapped, t_warmup=1000)
    assert ctrl.num_layers == N_LAYERS
    assert [l.module for l in ctrl.layers] == list(arch.layers(hf))
    assert all(l.path.startswith('model.') for l in ctrl.layers)
    assert list(wrapped.state_dict().keys()) == list(ref.state_dict().keys())

    ids = _ids()
    batch = {'input_ids': ids, 'labels': ids}
    with torch.no_grad():
        expected = ref(batch).logits
        _set_alphas(ctrl, 1.0)
        assert_close(wrapped(batch).logits, expected, **EXACT)

        # Intermediate α: the wrapped model is exactly the bare HF model under the same α.
        raw_ctrl = apply_prores(raw, t_warmup=1000)
        _set_alphas(ctrl, _random_alphas())
        _set_alphas(raw_ctrl, _random_alphas())
        out = wrapped(batch)
        assert_close(out.logits, raw(**batch).logits, **EXACT)
        assert (out.logits - expected).abs().max() > 1e-3
        assert torch.isfinite(wrapped.loss(out, batch))

        _set_alphas(ctrl, 0.0)
        assert_close(wrapped(batch).logits, _ALPHA0_LOGITS[name](ref.model, ids), **EXACT)


# ------------------------------------------------------------------------------------- 6. checkpointing


@pytest.mark.parametrize('use_reentrant', [True, False])
def test_activation_checkpointing_same_loss_and_grads(use_reentrant):
    arch = ARCH_BY_NAME['llama']
    plain = arch.build().train()
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': use_reentrant})
    assert ckpt.is_gradient_checkpointing
    alphas = _random_alphas()
    for m in (plain, ckpt):
        _set_alphas(apply_prores(m, t_warmup=1000), alphas)

    calls = {'plain': 0, 'ckpt': 0}  # the branch module really is recomputed under checkpointing
    plain.model.layers[0].self_attn.o_proj.register_forward_hook(
        lambda *_: calls.__setitem__('plain', calls['plain'] + 1)
    )
    ckpt.model.layers[0].self_attn.o_proj.register_forward_hook(lambda *_: calls.__setitem__('ckpt', calls['ckpt'] + 1))

    ids = _ids()
    losses = []
    for m in (plain, ckpt):
        loss = m(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append(loss.detach())
    assert calls == {'plain': 1, 'ckpt': 2}
    assert_close(losses[0], losses[1], **EXACT)
    grads = dict(ckpt.named_parameters())
    for n, p in plain.named_parameters():
        assert grads[n].grad is not None, n
        assert_close(grads[n].grad, p.grad, **TOL, msg=lambda m, n=n: f'{n}: {m}')


# ------------------------------------------------------------------------------------- 7. custom models


class MyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn_in, self.attn_out = nn.Linear(d, d), nn.Linear(d, d)
        self.mlp_in, self.mlp_out = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        x = x + self.attn_out(torch.tanh(self.attn_in(self.norm1(x))))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.norm2(x))))


class MyNet(nn.Module):
    def __init__(self, d=16, n=N_LAYERS, block=MyBlock):
        super().__init__()
        self.embed = nn.Linear(d, d)
        self.blocks = nn.ModuleList(block(d) for _ in range(n))
        self.head = nn.Linear(d, d)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _my_net_by_hand(net, x, alphas):
    x = net.embed(x)
    for b, a in zip(net.blocks, alphas, strict=True):
        x = x + a * b.attn_out(torch.tanh(b.attn_in(b.norm1(x))))
        x = x + a * b.mlp_out(F.gelu(b.mlp_in(b.norm2(x))))
    return net.head(x)


def _my_net():
    torch.manual_seed(0)
    return MyNet()


@pytest.mark.parametrize(
    'how',
    [
        dict(layer_class='MyBlock', branches=['attn_out', 'mlp_out']),
        dict(layer_class=MyBlock, branches=('attn_out', 'mlp_out')),
        dict(layer_pattern='blocks.*', branches=['attn_out', 'mlp_out']),
    ],
    ids=['class_name', 'class', 'pattern'],
)
def test_custom_model_layer_class_and_pattern(how):
    net = _my_net()
    ref = copy.deepcopy(net)
    ctrl = apply_prores(net, t_warmup=1000, **how)
    assert [l.path for l in ctrl.layers] == ['blocks.0', 'blocks.1', 'blocks.2']
    assert [l.index for l in ctrl.layers] == [0, 1, 2]
    assert all(l.branches == ('attn_out', 'mlp_out') for l in ctrl.layers)
    assert list(net.state_dict().keys()) == list(ref.state_dict().keys())
    x = torch.randn(BATCH, SEQ, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for alphas in (MIXED_ALPHAS, _random_alphas(), (0.0,) * 3, (1.0,) * 3):
            _set_alphas(ctrl, alphas)
            assert_close(net(x), _my_net_by_hand(ref, x, alphas), **TOL)
        assert_close(net(x), ref(x), **EXACT)  # α = 1


def test_custom_model_errors():
    net = _my_net()
    with pytest.raises(ValueError, match='layer_class') as err:
        apply_prores(net)
    assert 'MyBlock' in str(err.value)  # the hint names the repeated block class
    with pytest.raises(ValueError, match='branches'):
        apply_prores(net, layer_class='MyBlock')  # unknown class and no branches
    with pytest.raises(ValueError, match='mlp_proj'):
        apply_prores(net, layer_class='MyBlock', branches=['attn_out', 'mlp_proj'])
    with pytest.raises(ValueError, match='layer_class'):
        apply_prores(net, layer_class='NoSuchBlock', branches=['attn_out'])
    assert _alpha_buffers(net) == [] and not any(has_prores_hook(m) or m._forward_hooks for m in net.modules())

    ctrl = apply_prores(net, layer_class='MyBlock', branches=['attn_out', 'mlp_out'])
    for kwargs in (
        dict(layer_class='MyBlock', branches=['attn_out', 'mlp_out']),
        dict(layer_pattern='blocks.*', branches=['mlp_out']),
    ):
        with pytest.raises(ValueError, match='already applied'):
            apply_prores(net, **kwargs)
    assert len(_alpha_buffers(net)) == 2 * N_LAYERS
    assert sum(has_prores_hook(m) for m in net.modules()) == 2 * N_LAYERS
    ctrl.remove()
    apply_prores(net, layer_class='MyBlock', branches=['attn_out', 'mlp_out'])


def test_custom_block_declaring_its_branches():
    class DeclaredBlock(MyBlock):
        prores_branches = ('attn_out', 'mlp_out')

    torch.manual_seed(0)
    net = MyNet(block=DeclaredBlock)
    ref = copy.deepcopy(net)
    ctrl = apply_prores(net, t_warmup=1000)
    assert ctrl.num_layers == N_LAYERS
    _set_alphas(ctrl, MIXED_ALPHAS)
    x = torch.randn(BATCH, SEQ, 16)
    with torch.no_grad():
        assert_close(net(x), _my_net_by_hand(ref, x, MIXED_ALPHAS), **TOL)


# ------------------------------------------------------------------------------------- 8. bf16 autocast


def test_autocast_bf16_llama():
    arch = ARCH_BY_NAME['llama']
    model, ref, ctrl = _hooked_and_reference(arch)
    branch_dtypes = []
    model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, out: branch_dtypes.append(out.dtype))
    ids = _ids()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        expected_one = ref(input_ids=ids).logits
        expected_zero = _ALPHA0_LOGITS['llama'](ref, ids)

        _set_alphas(ctrl, 1.0)
        one = model(input_ids=ids).logits
        _set_alphas(ctrl, 0.0)
        zero = model(input_ids=ids).logits
        _set_alphas(ctrl, MIXED_ALPHAS)
        mixed = model(input_ids=ids).logits
    assert one.dtype == zero.dtype == mixed.dtype == expected_one.dtype
    assert branch_dtypes == [torch.bfloat16] * 3  # the fp32 α does not promote the bf16 branch
    assert_close(one, expected_one, **EXACT)
    assert_close(zero, expected_zero, **EXACT)
    assert torch.isfinite(mixed).all()
    assert not torch.equal(mixed, expected_one)


# ------------------------------------------------------------------------------------- device placement


@pytest.mark.parametrize('name', ['llama', 'gpt2', 'gpt_neox_parallel', 'bert'])
def test_alpha_buffers_live_on_the_model_device(name):
    """α must be created where its layer lives (`apply_prores` after `model.to(device)`).

    The meta device stands in for an accelerator on CPU-only machines. Branch modules without parameters
    (the dropouts that end GPT-2, GPT-NeoX and BERT branches) must take the device of their layer.
    """
    model = ARCH_BY_NAME[name].build().to('meta')
    apply_prores(model, t_warmup=1000)
    devices = {n: b.device.type for n, b in model.named_buffers() if n.endswith(ALPHA_BUFFER)}
    assert len(devices) == 2 * N_LAYERS
    assert devices == {n: 'meta' for n in devices}
