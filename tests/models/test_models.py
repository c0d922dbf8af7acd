"""Tests for the reference decoder (prores_algo.training.models). CPU, tiny sizes."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from prores_algo.training.models import NORM_PLACEMENTS, Block, Decoder, DecoderConfig, build_decoder

TINY = dict(vocab_size=61, d_model=32, n_layers=3, n_heads=4, max_seq_len=16)


def tiny(norm='pre', **kw) -> Decoder:
    torch.manual_seed(0)
    return build_decoder(**{**TINY, 'norm': norm, **kw})


def tokens(b=2, s=12, vocab=TINY['vocab_size'], seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, s), generator=g)


# ------------------------------------------------------------------------------------------ config


def test_default_d_ffn():
    assert DecoderConfig(**TINY).d_ffn == 128  # 8/3*32 = 85.3 -> 128
    assert DecoderConfig(**{**TINY, 'd_model': 768, 'n_heads': 12}).d_ffn == 2048
    assert DecoderConfig(**TINY, d_ffn=40).d_ffn == 40


@pytest.mark.parametrize(
    'field, value',
    [
        ('norm', 'layernorm'),
        ('vocab_size', 0),
        ('d_model', -4),
        ('n_layers', 2.0),
        ('n_heads', True),
        ('max_seq_len', 0),
        ('d_ffn', 0),
        ('rope_theta', 0.0),
        ('norm_eps', -1.0),
        ('init_std', float('nan')),
        ('tie_embeddings', 'yes'),
        ('init', 'xavier'),
        ('embed_std', 0.0),
    ],
)
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        DecoderConfig(**{**TINY, field: value})


def test_config_validation_lists_accepted_norms():
    with pytest.raises(ValueError) as e:
        DecoderConfig(**TINY, norm='bad')
    for name in NORM_PLACEMENTS:
        assert name in str(e.value)


def test_config_validation_heads():
    with pytest.raises(ValueError, match='n_heads'):
        DecoderConfig(**{**TINY, 'd_model': 30})  # not divisible by 4
    with pytest.raises(ValueError, match='RoPE'):
        DecoderConfig(**{**TINY, 'd_model': 12})  # head dim 3


# ------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize('norm', NORM_PLACEMENTS)
def test_shape_and_causality(norm):
    model = tiny(norm).eval()
    ids = tokens()
    with torch.no_grad():
        out = model(ids)
        assert out.shape == (2, 12, TINY['vocab_size'])
        assert torch.isfinite(out).all()
        j = 5
        ids2 = ids.clone()
        ids2[:, j] = (ids2[:, j] + 1) % TINY['vocab_size']
        out2 = model(ids2)
    assert_close(out2[:, :j], out[:, :j])
    assert not torch.allclose(out2[:, j], out[:, j])


def test_seq_len_checked():
    model = tiny()
    with pytest.raises(ValueError, match='max_seq_len'):
        model(tokens(s=TINY['max_seq_len'] + 1))


def test_final_norm_presence():
    # the official code: a final norm after the last layer for every placement
    for norm in NORM_PLACEMENTS:
        assert tiny(norm).final_norm is not None
    # the documented option drops it where the last block already ends in a norm
    for norm in ('post', 'deepnorm'):
        assert tiny(norm, final_norm=False).final_norm is None


@pytest.mark.parametrize('norm', NORM_PLACEMENTS)
@pytest.mark.parametrize('tie', [False, True])
def test_training_step_updates_every_param(norm, tie):
    model = tiny(norm, tie_embeddings=tie)
    ids = tokens()
    logits = model(ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert torch.isfinite(loss)
    loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-3)
    opt.step()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert not torch.equal(p, before[n]), f'{n} not updated'


# ------------------------------------------------------------------------------------------ init


def test_lns_norm_weights():
    model = tiny('lns', n_layers=4)
    for i, block in enumerate(model.blocks):
        for norm in (block.norm1, block.norm2):
            assert_close(norm.weight, torch.full_like(norm.weight, 1 / math.sqrt(i + 1)))
    assert torch.equal(model.final_norm.weight, torch.ones_like(model.final_norm.weight))


@pytest.mark.parametrize('norm', ['pre', 'post', 'sandwich'])
def test_norm_weights_one(norm):
    model = tiny(norm)
    for m in model.modules():
        if isinstance(m, nn.RMSNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight))


def test_default_init_stds():
    torch.manual_seed(0)
    model = build_decoder(vocab_size=512, d_model=128, n_layers=2, n_heads=4, max_seq_len=8)
    assert model.embed.weight.std().item() == pytest.approx(0.02 * math.sqrt(128), rel=0.05)
    for name in ('attn.q_proj', 'attn.v_proj', 'mlp.down_proj'):
        w = model.blocks[0].get_submodule(name).weight
        assert w.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_torch_init_is_pytorchs_default():
    """init='torch': every Linear as nn.Linear initialises itself (kaiming-uniform: |w| <= 1/sqrt(fan_in),
    std 1/sqrt(3 fan_in)), the embedding N(0, 1); norms still 1."""
    torch.manual_seed(0)
    model = build_decoder(vocab_size=512, d_model=128, n_layers=2, n_heads=4, max_seq_len=8, init='torch')
    assert model.embed.weight.std().item() == pytest.approx(1.0, rel=0.05)
    for lin in [m for m in model.modules() if isinstance(m, nn.Linear)]:
        fan_in = lin.weight.shape[1]
        assert lin.weight.abs().max().item() <= 1 / math.sqrt(fan_in)
        assert lin.weight.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.05)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in model.modules() if isinstance(m, nn.RMSNorm))


@pytest.mark.parametrize('init', ['official', 'torch'])
def test_embed_std_sets_the_embedding_alone(init):
    torch.manual_seed(0)
    kw = dict(vocab_size=512, d_model=128, n_layers=2, n_heads=4, max_seq_len=8, init=init)
    model = build_decoder(**kw, embed_std=0.5)
    assert model.embed.weight.std().item() == pytest.approx(0.5, rel=0.05)
    torch.manual_seed(0)
    plain = build_decoder(**kw)
    assert torch.equal(model.blocks[1].mlp.down_proj.weight, plain.blocks[1].mlp.down_proj.weight)


def test_torch_init_under_meta_device_matches():
    """param_init_fn (Composer's meta/FSDP init) gives the same torch-default weights as init_weights()."""
    with torch.device('meta'):
        meta_model = build_decoder(**TINY, init='torch', embed_std=0.3)
    meta_model.to_empty(device='cpu')
    torch.manual_seed(7)
    meta_model.init_weights()
    ref = build_decoder(**TINY, init='torch', embed_std=0.3)
    torch.manual_seed(7)
    ref.init_weights()
    for (n, p), (_, q) in zip(meta_model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_deepnorm_init_and_beta():
    L, d = 4, 256
    torch.manual_seed(0)
    model = build_decoder(vocab_size=64, d_model=d, n_layers=L, n_heads=4, d_ffn=512, max_seq_len=8, norm='deepnorm')
    gain = (8 * L) ** -0.25

    def xavier_std(w, g):
        fan_out, fan_in = w.shape
        return g * math.sqrt(2.0 / (fan_in + fan_out))

    block = model.blocks[2]
    assert block.beta == pytest.approx((2 * L) ** 0.25)
    for name in ('attn.v_proj', 'attn.o_proj', 'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj'):
        w = block.get_submodule(name).weight
        assert w.std().item() == pytest.approx(xavier_std(w, gain), rel=0.03), name
    for name in ('attn.q_proj', 'attn.k_proj'):
        w = block.get_submodule(name).weight
        assert w.std().item() == pytest.approx(xavier_std(w, 1.0), rel=0.03), name
    # non-deepnorm placements keep beta = 1
    assert tiny('post').blocks[0].beta == 1.0


def test_deepnorm_xavier_init_is_torch_xavier_normal_bitwise():
    """The DeepNet init computes xavier's std from the weight's full shape (so it also works on a ZeRO-3
    partitioned weight, see test_deepnorm_zero3_init_matches_plain_build) and draws exactly what
    `nn.init.xavier_normal_(w, gain)` draws: same std expression, same normal_ call."""
    model = tiny('deepnorm', d_ffn=96)
    L = TINY['n_layers']
    for name, gain in (
        ('attn.q_proj', 1.0),
        ('attn.v_proj', (8.0 * L) ** -0.25),
        ('mlp.down_proj', (8.0 * L) ** -0.25),
    ):
        lin = model.blocks[1].get_submodule(name)
        assert lin._init_spec == ('xavier', gain)
        ref = torch.empty_like(lin.weight)
        torch.manual_seed(5)
        nn.init.xavier_normal_(ref, gain=gain)
        torch.manual_seed(5)
        model.param_init_fn(lin)
        assert torch.equal(lin.weight, ref), name


@pytest.mark.parametrize('tie', [False, True])
def test_meta_device_build(tie):
    with torch.device('meta'):
        meta_model = build_decoder(**TINY, norm='lns', tie_embeddings=tie)
    assert meta_model.embed.weight.is_meta and meta_model.rope.cos.is_meta
    meta_model.to_empty(device='cpu')
    torch.manual_seed(123)
    meta_model.init_weights()

    ref = build_decoder(**TINY, norm='lns', tie_embeddings=tie)
    torch.manual_seed(123)
    ref.init_weights()
    # init_weights is a function of the RNG state only: same parameters and same RoPE tables.
    for (n, p), (_, q) in zip(meta_model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert torch.equal(meta_model.rope.cos, ref.rope.cos) and torch.equal(meta_model.rope.sin, ref.rope.sin)
    if tie:
        assert meta_model.lm_head.weight is meta_model.embed.weight
    with torch.no_grad():
        out = meta_model(tokens())
    assert torch.isfinite(out).all()
    assert_close(out, ref(tokens()).detach())


@pytest.mark.parametrize('norm', NORM_PLACEMENTS)
def test_autocast_bf16(norm):
    model = tiny(norm)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(tokens())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - model(tokens())).abs().max() < 0.5


def test_rope_not_in_state_dict():
    sd = tiny().state_dict()
    assert not any('rope' in k for k in sd)


# ------------------------------------------------------------------------------------------ accounting


@pytest.mark.parametrize('tie', [False, True])
def test_param_groups(tie):
    model = tiny('sandwich', tie_embeddings=tie)
    groups = model.param_groups(0.1)
    all_ids = [id(p) for g in groups for p in g['params']]
    assert len(all_ids) == len(set(all_ids)), 'duplicate parameter'
    assert set(all_ids) == {id(p) for p in model.parameters()}
    decay_group, no_decay_group = groups
    assert decay_group['weight_decay'] == 0.1 and no_decay_group['weight_decay'] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay_group['params']}
    expected = {
        n for n, _ in model.named_parameters() if n.endswith('_proj.weight') or (n == 'lm_head.weight' and not tie)
    }
    assert decay_names == expected
    no_decay_names = {names[id(p)] for p in no_decay_group['params']}
    assert 'embed.weight' in no_decay_names
    assert all('norm' in n or n == 'embed.weight' for n in no_decay_names)


def test_num_params_and_flops():
    model = tiny(tie_embeddings=False)
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params() == total
    assert model.num_params(exclude_embeddings=True) == total - c.vocab_size * c.d_model
    S = 16
    assert model.flops_per_token(S) == 6 * total + 12 * c.n_layers * c.d_model * S
    tied = tiny(tie_embeddings=True)
    assert tied.num_params() == total - c.vocab_size * c.d_model


# ------------------------------------------------------------------------------------------ ProRes contract


def _hook_scale(block, alpha):
    def hook(module, args, out):
        return out * alpha

    return [block.get_submodule(name).register_forward_hook(hook) for name in block.prores_branches]


@pytest.mark.parametrize('norm', NORM_PLACEMENTS)
def test_prores_branches_alpha_zero(norm):
    model = tiny(norm)
    block = model.blocks[1]
    assert isinstance(block.prores_branches, tuple) and all(isinstance(n, str) for n in block.prores_branches)
    expected_names = ('attn_post_norm', 'mlp_post_norm') if norm == 'sandwich' else ('attn.o_proj', 'mlp.down_proj')
    assert block.prores_branches == expected_names
    torch.manual_seed(2)
    x = torch.randn(2, 10, TINY['d_model'])
    cos, sin = model.rope(10)
    handles = _hook_scale(block, 0.0)
    with torch.no_grad():
        out = block(x, cos, sin)
    for h in handles:
        h.remove()
    if norm in ('pre', 'sandwich', 'lns'):
        expected = x
    elif norm == 'post':
        expected = block.norm2(block.norm1(x))
    else:
        expected = block.norm2(block.beta * block.norm1(block.beta * x))
    assert_close(out, expected.detach())


@pytest.mark.parametrize('norm', NORM_PLACEMENTS)
def test_prores_branches_intermediate_alpha(norm):
    """Scaling the branch modules by alpha gives the placement's formula with alpha * F."""
    model = tiny(norm)
    block: Block = model.blocks[2]
    a = 0.37
    torch.manual_seed(3)
    x = torch.randn(2, 10, TINY['d_model'])
    cos, sin = model.rope(10)
    handles = _hook_scale(block, a)
    with torch.no_grad():
        out = block(x, cos, sin)
        for h in handles:
            h.remove()
        attn = lambda z: block.attn(z, cos, sin)
        if norm in ('pre', 'lns'):
            h = x + a * attn(block.norm1(x))
            ref = h + a * block.mlp(block.norm2(h))
        elif norm == 'sandwich':
            h = x + a * block.attn_post_norm(attn(block.norm1(x)))
            ref = h + a * block.mlp_post_norm(block.mlp(block.norm2(h)))
        else:
            beta = block.beta if norm == 'deepnorm' else 1.0
            h = block.norm1(beta * x + a * attn(x))
            ref = block.norm2(beta * h + a * block.mlp(h))
    assert_close(out, ref, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ Composer


def test_package_import_does_not_import_composer():
    import subprocess
    import sys

    code = 'import sys, prores_algo.training.models; assert "composer" not in sys.modules'
    subprocess.run([sys.executable, '-c', code], check=True)


def test_composer_wrapper_loss_and_metrics():
    pytest.importorskip('composer')
    import prores_algo.training.models

    ComposerDecoder = prores_algo.training.models.ComposerDecoder  # lazy module attribute

    torch.manual_seed(0)
    model = ComposerDecoder.from_kwargs(**TINY, norm='pre')
    ids = tokens()
    labels = ids.clone()
    labels[0, 4] = -100
    for batch in ({'input_ids': ids}, {'input_ids': ids, 'labels': labels}):
        logits = model(batch)
        loss = model.loss(logits, batch)
        lab = batch.get('labels', ids)
        ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1), ignore_index=-100)
        assert_close(loss, ref)

        metrics = model.get_metrics(is_train=False)
        assert set(metrics) == {'LanguageCrossEntropy', 'LanguagePerplexity'}
        with torch.no_grad():
            outputs = model.eval_forward(batch)
            for metric in metrics.values():
                metric.reset()
                model.update_metric(batch, outputs, metric)
        assert_close(metrics['LanguageCrossEntropy'].compute(), loss.detach())
        assert_close(metrics['LanguagePerplexity'].compute(), loss.detach().exp())
    assert set(model.get_metrics(is_train=True)) == {'LanguageCrossEntropy', 'LanguagePerplexity'}
    assert model.flops_per_batch({'input_ids': ids}) == model.model.flops_per_token(12) * ids.numel()
    assert len(model.param_groups(0.1)) == 2
