"""The reference decoder and the paper YAMLs reproduce the paper's official code by default.

`official_forward` below is written from the official `modeling_llama.py` (LLaMA as in transformers
4.28 plus the ProRes `NORM_TYPE` branches), independently of `prores_algo.training.models.decoder`: explicit
softmax attention with an additive causal mask, rotate-half RoPE from `inv_freq`, the official
RMSNorm (fp32 variance, `weight * x * rsqrt(mean(x^2) + eps)`), SwiGLU, and the official
`*_prores` residual forms `residual + branch * alpha`. It reads the weights of our model and must
give the same logits, per layer α included. See docs/official-code.md for every item compared.
"""

import copy
import math

import pytest
import torch
import yaml
from torch import nn

from prores_algo import apply_prores
from prores_algo.training.models.decoder import Decoder, DecoderConfig, default_deepnet_init
from tests.support.helpers import set_random_alphas

V, D, L, H, S = 64, 32, 3, 4, 16


def rms(x, weight, eps):
    var = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(var + eps))


def rope(x, theta=10000.0):
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.einsum('i,j->ij', torch.arange(x.shape[-2]).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()


def attention(blk, x):
    b, s, _ = x.shape
    a = blk.attn
    q, k, v = (p(x).view(b, s, H, D // H).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
    q, k = rope(q), rope(k)
    scores = q @ k.transpose(2, 3) / math.sqrt(D // H)
    mask = torch.full((s, s), torch.finfo(scores.dtype).min).triu(1)
    w = torch.softmax(scores + mask, dim=-1, dtype=torch.float32)
    return a.o_proj((w @ v).transpose(1, 2).reshape(b, s, D))


def mlp(blk, x):
    m = blk.mlp
    return m.down_proj(nn.functional.silu(m.gate_proj(x)) * m.up_proj(x))


def official_forward(model, ids, norm, alphas, eps=1e-5):
    """The official LlamaForCausalLM forward for NORM_TYPE in {pre, post, deeppost}[_prores]."""
    x = model.embed(ids)
    for i, blk in enumerate(model.blocks):
        alpha = alphas[i]
        if norm == 'pre':
            h = x + attention(blk, rms(x, blk.norm1.weight, eps)) * alpha
            x = h + mlp(blk, rms(h, blk.norm2.weight, eps)) * alpha
        else:  # post / deeppost: residual (times (2L)^(1/4) for deeppost) + branch * alpha, then the norm
            beta = (2 * L) ** 0.25 if norm == 'deepnorm' else 1.0
            h = rms(beta * x + attention(blk, x) * alpha, blk.norm1.weight, eps)
            x = rms(beta * h + mlp(blk, h) * alpha, blk.norm2.weight, eps)
    x = rms(x, model.final_norm.weight, eps)  # the official model: a final norm for every NORM_TYPE
    return model.lm_head(x)


def randomized(norm, seed=0, **kw):
    """A model with every parameter (norm weights included) drawn at random, so nothing matches by luck."""
    torch.manual_seed(seed)
    model = Decoder(DecoderConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=H, max_seq_len=S, norm=norm, **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    return model


IDS = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize('norm', ['pre', 'post', 'deepnorm'])
def test_logits_equal_official_forward_with_per_layer_alpha(norm):
    model = randomized(norm)
    plain = copy.deepcopy(model)  # the official forward reads unhooked weights (ProRes hooks o_proj/down_proj)
    controller = apply_prores(model, t_warmup=1000)
    alphas = set_random_alphas(controller)
    with torch.no_grad():
        ours = model(IDS)
        official = official_forward(plain, IDS, norm, alphas)
    torch.testing.assert_close(ours, official, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('norm', ['pre', 'post', 'deepnorm'])
def test_logits_equal_official_forward_without_prores(norm):
    model = randomized(norm, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), official_forward(model, IDS, norm, [1.0] * L), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('norm', ['post', 'deepnorm'])
def test_final_norm_false_is_the_documented_option_and_differs(norm):
    """final_norm=False (an option) drops only the last RMSNorm."""
    official = randomized(norm)
    no_final = randomized(norm, final_norm=False)
    assert official.final_norm is not None and no_final.final_norm is None
    with torch.no_grad():
        x = official.embed(IDS)
        cos, sin = official.rope(S)
        for blk in official.blocks:
            x = blk(x, cos, sin)
        torch.testing.assert_close(official(IDS), official.lm_head(official.final_norm(x)))
        assert not torch.allclose(official(IDS), official.lm_head(x), atol=1e-3)


def test_final_norm_false_refused_where_the_stream_is_unnormalised():
    with pytest.raises(ValueError, match='final_norm=False is only allowed for norm=post or deepnorm'):
        DecoderConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=H, norm='pre', final_norm=False)


def test_rmsnorm_eps_is_official():
    model = Decoder(DecoderConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=H, norm='post'))
    eps = {m.eps for m in model.modules() if isinstance(m, nn.RMSNorm)}
    assert eps == {1e-5}
    # and it matters: with a tiny-norm input the official eps gives the official output, 1e-6 does not
    x = torch.full((1, D), 1e-3)
    w = torch.ones(D)
    torch.testing.assert_close(model.final_norm(x), rms(x, w, 1e-5))
    assert not torch.allclose(model.final_norm(x), rms(x, w, 1e-6), rtol=1e-3)


def _linear_stds(model):
    return {
        name: float(m.weight.std())
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.startswith('blocks.')
    }


def test_deepnorm_init_official_rule():
    """DeepNet init for plain DeepNorm; plain N(0, 0.02) for DeepNorm + ProRes (the official gate)."""
    assert default_deepnet_init(prores_on=False) is True and default_deepnet_init(prores_on=True) is False
    kw = dict(vocab_size=V, d_model=256, n_layers=4, n_heads=4, d_ffn=512, norm='deepnorm')
    torch.manual_seed(0)
    plain = _linear_stds(Decoder(DecoderConfig(**kw, deepnet_init=True)))
    torch.manual_seed(0)
    prores = _linear_stds(Decoder(DecoderConfig(**kw, deepnet_init=False)))
    gain = (8 * 4) ** -0.25
    # xavier_normal std = gain * sqrt(2 / (fan_in + fan_out))
    assert plain['blocks.0.attn.v_proj'] == pytest.approx(gain * math.sqrt(2 / 512), rel=0.05)
    assert plain['blocks.0.mlp.down_proj'] == pytest.approx(gain * math.sqrt(2 / (512 + 256)), rel=0.05)
    assert plain['blocks.0.attn.q_proj'] == pytest.approx(math.sqrt(2 / 512), rel=0.05)
    for name, std in prores.items():
        assert std == pytest.approx(0.02, rel=0.05), name


def test_training_entries_resolve_deepnet_init_from_prores(tmp_path):
    """train.build_model and ds_train.build_model both apply the official rule unless the YAML says."""
    from prores_algo.training.composer_train import build_model
    from prores_algo.training.config import TrainConfig
    from prores_algo.training.deepspeed import loop as ds_train

    base = dict(
        model=dict(name='reference', vocab_size=V, d_model=D, n_layers=L, n_heads=H, norm='deepnorm'),
        data=dict(path=str(tmp_path), seq_len=S),
        global_train_batch_size=2,
        optimizer=dict(lr=1e-3),
        max_duration='2ba',
    )
    with_prores = TrainConfig(**base, algorithms={'prores': {}})
    assert build_model(with_prores).model.config.deepnet_init is False
    assert build_model(TrainConfig(**base)).model.config.deepnet_init is True
    explicit = TrainConfig(**{**base, 'model': {**base['model'], 'deepnet_init': True}}, algorithms={'prores': {}})
    assert build_model(explicit).model.config.deepnet_init is True
    cfg = {
        **ds_train.DEFAULTS,
        'norm': 'deepnorm',
        'n_layers': L,
        'd_model': D,
        'n_heads': H,
        'vocab_size': V,
        'seq_len': S,
    }
    assert ds_train.build_model({**cfg, 'prores': True}).config.deepnet_init is False
    assert ds_train.build_model({**cfg, 'prores': False}).config.deepnet_init is True


# ------------------------------------------------------------------------------------- paper YAMLs
# The official scripts: run_130m.sh / run_350m.sh / run_1b.sh with configs/llama_{130m,350m,1b}.json.
OFFICIAL_RUNS = {
    '130m': dict(d_model=768, n_layers=12, n_heads=12, lr=2e-3, prores_w=12000),
    '350m': dict(d_model=1024, n_layers=24, n_heads=16, lr=1e-3, prores_w=24000),
    '1.3b': dict(d_model=2048, n_layers=24, n_heads=32, d_ffn=5632, lr=6e-4, prores_w=24000),
}


@pytest.mark.parametrize('size', sorted(OFFICIAL_RUNS))
@pytest.mark.parametrize('norm', ['pre', 'post'])
def test_paper_yamls_match_official_scripts(size, norm):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / 'yamls' / 'paper'
    want = OFFICIAL_RUNS[size]
    for prores in (False, True):
        path = root / f'{size}-{norm}ln{"-prores" if prores else ""}.yaml'
        cfg = yaml.safe_load(path.read_text())
        m = cfg['model']
        for key in ('d_model', 'n_layers', 'n_heads', 'd_ffn'):
            if key in want:
                assert m[key] == want[key], (path.name, key)
        assert m.get('norm_eps', 1e-5) == 1e-5
        # the official scripts: same LR and 2000 LR-warmup steps for every norm type
        assert cfg['optimizer']['lr'] == want['lr'], path.name
        assert cfg['scheduler']['lr_warmup'] == '2000ba', path.name
        assert cfg['max_duration'] == '100000ba' and cfg['global_train_batch_size'] == 512
        if prores:
            assert cfg['algorithms']['prores']['t_warmup'] == f'{want["prores_w"]}ba', path.name
        else:
            assert 'prores' not in cfg['algorithms']
