"""Numerical conformance of the newer LAYER_POLICIES entries (transformers 4.57).

For every family: a tiny random model, ProRes with a random α per layer; the output of each hooked layer
must equal `x + α·F(x)` written out by hand from an *unhooked* deep copy's submodules, following the
layer's own forward in transformers/models/<arch>/modeling_<arch>.py. Each layer is checked on the very
input it received in the hooked model, so every layer is compared, not only the first.
"""

import copy

import pytest
import torch
import transformers as T

from prores_algo import apply_prores
from prores_algo.layers import find_residual_layers
from prores_algo.policies import LAYER_POLICIES
from tests.support.helpers import set_random_alphas

TOL = dict(rtol=0, atol=1e-6)
VOCAB, SEQ, BATCH = 64, 8, 2


def _base(**kw):
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    cfg.update(kw)
    return cfg


def _first(out):
    return out[0] if isinstance(out, tuple) else out


# --- hand-written layer forwards: x + α·F(x) from the unhooked copy's submodules ---------------------


def _attn_kwargs(kw):
    return dict(
        attention_mask=kw.get('attention_mask'),
        position_ids=kw.get('position_ids'),
        position_embeddings=kw.get('position_embeddings'),
        past_key_values=None,
        cache_position=kw.get('cache_position'),
    )


def llama_like(layer, x, kw, a, mlp='mlp'):
    """Pre-LN: h = x + α·attn(ln1(x)); out = h + α·mlp(ln2(h)) (Gemma, Phi-3, Mixtral, Qwen2-MoE)."""
    h = x + a * layer.self_attn(hidden_states=layer.input_layernorm(x), **_attn_kwargs(kw))[0]
    return h + a * _first(getattr(layer, mlp)(layer.post_attention_layernorm(h)))


def gemma3(layer, x, kw, a):
    """Sandwich: h = x + α·post_ln(attn(in_ln(x))); out = h + α·post_ff_ln(mlp(pre_ff_ln(h)))."""
    pe = kw['position_embeddings_local'] if layer.self_attn.is_sliding else kw['position_embeddings_global']
    attn = layer.self_attn(
        hidden_states=layer.input_layernorm(x),
        position_embeddings=pe,
        attention_mask=kw.get('attention_mask'),
        position_ids=kw.get('position_ids'),
        past_key_values=None,
        cache_position=kw.get('cache_position'),
    )[0]
    h = x + a * layer.post_attention_layernorm(attn)
    return h + a * layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))


def phi(layer, x, kw, a):
    """Parallel: out = x + α·attn(ln(x)) + α·mlp(ln(x)) (dropout off in eval)."""
    n = layer.input_layernorm(x)
    return x + a * layer.self_attn(hidden_states=n, **_attn_kwargs(kw))[0] + a * layer.mlp(n)


def stablelm(layer, x, kw, a):
    n = layer.input_layernorm(x)
    attn = layer.self_attn(hidden_states=n, **_attn_kwargs(kw))[0]
    if layer.use_parallel_residual:
        return x + a * attn + a * layer.mlp(n)
    h = x + a * attn
    return h + a * layer.mlp(layer.post_attention_layernorm(h))


def falcon(layer, x, kw, a):
    c = layer.config

    def attn(n):
        return layer.self_attention(
            n,
            layer_past=None,
            attention_mask=kw['attention_mask'],
            position_ids=kw.get('position_ids'),
            alibi=kw.get('alibi'),
            head_mask=None,
            use_cache=False,
            output_attentions=False,
            cache_position=kw.get('cache_position'),
            position_embeddings=kw.get('position_embeddings'),
        )[0]

    if c.new_decoder_architecture and c.num_ln_in_parallel_attn == 2:
        return x + a * attn(layer.ln_attn(x)) + a * layer.mlp(layer.ln_mlp(x))
    n = layer.input_layernorm(x)
    if c.new_decoder_architecture or c.parallel_attn:
        return x + a * attn(n) + a * layer.mlp(n)
    h = x + a * attn(n)
    return h + a * layer.mlp(layer.post_attention_layernorm(h))


def gptj(layer, x, kw, a):
    n = layer.ln_1(x)
    attn = layer.attn(
        hidden_states=n,
        layer_past=None,
        attention_mask=kw.get('attention_mask'),
        position_ids=kw.get('position_ids'),
        head_mask=None,
        use_cache=False,
        output_attentions=False,
        cache_position=kw.get('cache_position'),
    )[0]
    return x + a * attn + a * layer.mlp(n)


def olmo2(layer, x, kw, a):
    """Post-norm inside the branch: h = x + α·post_ln(attn(x)); out = h + α·post_ff_ln(mlp(h))."""
    h = x + a * layer.post_attention_layernorm(layer.self_attn(hidden_states=x, **_attn_kwargs(kw))[0])
    return h + a * layer.post_feedforward_layernorm(layer.mlp(h))


def mpt(layer, x, kw, a):
    """transformers' MptBlock: h = x + α·attn(norm_1(x)); out = h + α·down_proj(act(up_proj(norm_2(h))))."""
    attn = layer.attn(layer.norm_1(x), position_bias=kw['position_bias'], attention_mask=kw['attention_mask'])[0]
    h = x + a * attn
    ffn = layer.ffn
    return h + a * ffn.down_proj(ffn.act(ffn.up_proj(layer.norm_2(h))))


# family id -> (model class, config class, config kwargs, layer class name, manual forward)
CASES = {
    'gemma': (T.GemmaForCausalLM, T.GemmaConfig, _base(head_dim=8), 'GemmaDecoderLayer', llama_like),
    'gemma3': (
        T.Gemma3ForCausalLM,
        T.Gemma3TextConfig,
        _base(head_dim=8, sliding_window=4, layer_types=['sliding_attention', 'full_attention', 'sliding_attention']),
        'Gemma3DecoderLayer',
        gemma3,
    ),
    'phi': (T.PhiForCausalLM, T.PhiConfig, _base(partial_rotary_factor=0.5), 'PhiDecoderLayer', phi),
    'phi_qk_layernorm': (T.PhiForCausalLM, T.PhiConfig, _base(qk_layernorm=True), 'PhiDecoderLayer', phi),
    'phi3': (T.Phi3ForCausalLM, T.Phi3Config, _base(), 'Phi3DecoderLayer', llama_like),
    'stablelm': (T.StableLmForCausalLM, T.StableLmConfig, _base(), 'StableLmDecoderLayer', stablelm),
    'stablelm_parallel': (
        T.StableLmForCausalLM,
        T.StableLmConfig,
        _base(use_parallel_residual=True),
        'StableLmDecoderLayer',
        stablelm,
    ),
    'falcon_sequential': (
        T.FalconForCausalLM,
        T.FalconConfig,
        _base(parallel_attn=False, new_decoder_architecture=False, multi_query=False, bias=True),
        'FalconDecoderLayer',
        falcon,
    ),
    'falcon_parallel': (
        T.FalconForCausalLM,
        T.FalconConfig,
        _base(parallel_attn=True, new_decoder_architecture=False, multi_query=True),
        'FalconDecoderLayer',
        falcon,
    ),
    'falcon_alibi': (
        T.FalconForCausalLM,
        T.FalconConfig,
        _base(parallel_attn=True, new_decoder_architecture=False, alibi=True),
        'FalconDecoderLayer',
        falcon,
    ),
    'falcon_new_arch': (
        T.FalconForCausalLM,
        T.FalconConfig,
        _base(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=2),
        'FalconDecoderLayer',
        falcon,
    ),
    'falcon_new_arch_1ln': (
        T.FalconForCausalLM,
        T.FalconConfig,
        _base(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1),
        'FalconDecoderLayer',
        falcon,
    ),
    'gptj': (
        T.GPTJForCausalLM,
        T.GPTJConfig,
        dict(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_positions=64),
        'GPTJBlock',
        gptj,
    ),
    'mixtral': (
        T.MixtralForCausalLM,
        T.MixtralConfig,
        _base(num_local_experts=4, num_experts_per_tok=2),
        'MixtralDecoderLayer',
        lambda l, x, kw, a: llama_like(l, x, kw, a, mlp='block_sparse_moe'),
    ),
    # decoder_sparse_step=2: layers 1 is sparse (MoE + shared expert), 0 and 2 dense Qwen2MoeMLP
    'qwen2_moe': (
        T.Qwen2MoeForCausalLM,
        T.Qwen2MoeConfig,
        _base(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            decoder_sparse_step=2,
        ),
        'Qwen2MoeDecoderLayer',
        llama_like,
    ),
    'olmo': (T.OlmoForCausalLM, T.OlmoConfig, _base(), 'OlmoDecoderLayer', llama_like),
    'olmo2': (T.Olmo2ForCausalLM, T.Olmo2Config, _base(), 'Olmo2DecoderLayer', olmo2),
    'starcoder2': (
        T.Starcoder2ForCausalLM,
        T.Starcoder2Config,
        _base(use_bias=True),
        'Starcoder2DecoderLayer',
        llama_like,
    ),
    # transformers' own MPT (not llm-foundry's MPTBlock): ALiBi, no norm biases
    'mpt': (
        T.MptForCausalLM,
        T.MptConfig,
        dict(d_model=32, n_heads=4, n_layers=3, expansion_ratio=4, max_seq_len=64, vocab_size=VOCAB),
        'MptBlock',
        mpt,
    ),
}


def build(case, seed=0):
    model_cls, config_cls, cfg, _, _ = CASES[case]
    config = config_cls(**cfg)
    config._attn_implementation = 'eager'
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # Norm weights default to constants (0 for Gemma's 1+w, 1 elsewhere): randomise them so that a
    # misplaced α (e.g. scaling before a post-norm) could not cancel out.
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize('case', sorted(CASES))
def test_hooked_layer_equals_x_plus_alpha_f(case):
    _, _, _, layer_class, manual = CASES[case]
    model = build(case)
    reference = copy.deepcopy(model)
    controller = apply_prores(model, t_warmup=100)
    assert controller.num_layers == 3
    assert all(type(l.module).__name__ == layer_class for l in controller.layers)
    alphas = set_random_alphas(controller)

    seen = []
    handles = [
        l.module.register_forward_hook(
            lambda m, args, kwargs, out: seen.append((args[0].detach().clone(), kwargs, _first(out).detach().clone())),
            with_kwargs=True,
        )
        for l in controller.layers
    ]
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in one row: the attention mask path is exercised too
    with torch.no_grad():
        hooked_logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        plain_logits = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits
    for h in handles:
        h.remove()
    assert len(seen) == 3
    ref_layers = find_residual_layers(reference)
    with torch.no_grad():
        for i, ((x, kw, out), a) in enumerate(zip(seen, alphas, strict=True)):
            expected = manual(ref_layers[i].module, x, kw, a)
            torch.testing.assert_close(out, expected, **TOL, msg=lambda m, i=i: f'{case} layer {i}: {m}')
    assert not torch.allclose(hooked_logits, plain_logits, atol=1e-3), 'α < 1 must change the model'
    # α = 1 everywhere and removal both give back exactly the plain model
    controller.remove()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask, use_cache=False).logits, plain_logits, rtol=0, atol=0
        )


def test_every_new_family_is_in_the_table():
    for case, (_, _, _, layer_class, _) in CASES.items():
        assert layer_class in LAYER_POLICIES, case


def test_mixtral_router_logits_unscaled_and_aux_loss_works():
    """The MoE hook scales only the hidden states: router logits (and the load-balancing loss) are untouched."""
    model = build('mixtral')
    model.config.output_router_logits = True
    reference = copy.deepcopy(model)
    controller = apply_prores(model, t_warmup=100)
    alphas = set_random_alphas(controller)
    cap = {}
    model.model.layers[1].block_sparse_moe.register_forward_hook(lambda m, a, o: cap.update(x=a[0], out=o))
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, use_cache=False)
        ref_hidden, ref_logits = reference.model.layers[1].block_sparse_moe(cap['x'])
    assert torch.isfinite(out.loss) and out.aux_loss is not None and torch.isfinite(out.aux_loss)
    torch.testing.assert_close(cap['out'][1], ref_logits, rtol=0, atol=0)
    torch.testing.assert_close(cap['out'][0], alphas[1] * ref_hidden, **TOL)


def test_unknown_layer_error_explains_how_to_name_branches():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return x + self.proj(x)

    model = torch.nn.Sequential(torch.nn.ModuleList([Block(), Block()]))
    with pytest.raises(ValueError) as err:
        find_residual_layers(model)
    msg = str(err.value)
    assert 'Block' in msg and 'branches=' in msg and 'layer_class=' in msg and 'register_policy' in msg
    with pytest.raises(ValueError, match='branches='):
        find_residual_layers(model, layer_class='Block')
    layers = find_residual_layers(model, layer_class='Block', branches=['proj'])
    assert [l.path for l in layers] == ['0.0', '0.1']
