"""ProRes finds its branches whatever other INIT-time surgeries replaced, in either order."""

import pytest
import torch
import transformers
from composer import Trainer
from composer.algorithms import GatedLinearUnits, LowPrecisionLayerNorm
from composer.models import HuggingFaceModel
from torch import nn
from torch.utils.data import DataLoader

from prores_algo import ProRes
from prores_algo.surgery import ALPHA_BUFFER, has_prores_hook


def hooked_paths(model):
    return sorted(n for n, m in model.named_modules() if ALPHA_BUFFER in m._buffers and has_prores_hook(m))


def tiny_bert():
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return HuggingFaceModel(transformers.BertForMaskedLM(cfg), use_logits=True)


def mlm_loader():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (16, 12), generator=g)
    data = [{'input_ids': x, 'attention_mask': torch.ones_like(x), 'labels': x} for x in ids]
    return DataLoader(data, batch_size=4)


@pytest.mark.parametrize('order', ['prores_first', 'glu_first'])
def test_gated_linear_units_either_order(order):
    prores = ProRes(t_warmup='100ba')
    glu = GatedLinearUnits()
    algos = [prores, glu] if order == 'prores_first' else [glu, prores]
    model = tiny_bert()
    trainer = Trainer(
        model=model,
        train_dataloader=mlm_loader(),
        max_duration='2ba',
        algorithms=algos,
        device='cpu',
        progress_bar=False,
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
    )
    trainer.fit()
    # GLU swapped BertOutput for BERTGatedFFOutput, whose branch ends in `wo` (its dropout comes before wo)
    paths = hooked_paths(trainer.state.model)
    assert len(paths) == 6
    # the attention branch ends in a dropout: α rides in the GEMM of the projection before it (FOLD_TARGETS)
    assert all(p.endswith('attention.output.dense') or p.endswith('output.wo') for p in paths), paths
    assert type(trainer.state.model.model.bert.encoder.layer[0].output).__name__ == 'BERTGatedFFOutput'

    # numerically: at α the layer equals LN(x + α·F(x)) with F the gated FFN (hand-computed)
    layer = trainer.state.model.model.bert.encoder.layer[1]
    alpha = prores.controller.alphas[1]
    assert 0 < alpha < 1
    out_mod = layer.output
    x = torch.randn(2, 5, 32)
    inter = torch.randn(2, 5, 32)
    with torch.no_grad():
        h = out_mod.act(out_mod.gated_layer(inter)) * out_mod.non_gated_layer(inter)
        wo = torch.nn.functional.linear(h, out_mod.wo.weight, out_mod.wo.bias)  # unhooked
        expected = out_mod.layernorm(alpha * wo + x)
        torch.testing.assert_close(out_mod(inter, x), expected, atol=1e-6, rtol=1e-6)


class SandwichBlock(nn.Module):
    """A custom layer whose branches end in LayerNorms (the modules LowPrecisionLayerNorm replaces)."""

    def __init__(self, d):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.attn_post = nn.LayerNorm(d)
        self.mlp = nn.Linear(d, d)
        self.mlp_post = nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.attn_post(self.attn(x))
        return x + self.mlp_post(self.mlp(x))


class TinyNet(nn.Module):
    def __init__(self, d=16, n=3):
        super().__init__()
        self.blocks = nn.ModuleList(SandwichBlock(d) for _ in range(n))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class LowPrecisionLayerNormAsOnGPU(LowPrecisionLayerNorm):
    """Composer refuses amp precisions on CPU, where LPLN is then a no-op; run its surgery as on a GPU."""

    def apply(self, event, state, logger):
        from composer.algorithms.low_precision_layernorm import apply_low_precision_layernorm
        from composer.core import Precision

        apply_low_precision_layernorm(state.model, Precision.AMP_BF16, state.optimizers)


@pytest.mark.parametrize('order', ['prores_first', 'lpln_first'])
def test_low_precision_layernorm_either_order(order):
    from composer.models import ComposerClassifier

    prores = ProRes(t_warmup='100ba', layer_class='SandwichBlock', branches=['attn_post', 'mlp_post'])
    lpln = LowPrecisionLayerNormAsOnGPU()
    algos = [prores, lpln] if order == 'prores_first' else [lpln, prores]
    torch.manual_seed(0)
    model = ComposerClassifier(TinyNet(), num_classes=2)
    data = [(torch.randn(16), torch.tensor(i % 2)) for i in range(16)]
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(data, batch_size=4),
        max_duration='3ba',
        algorithms=algos,
        device='cpu',
        progress_bar=False,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
    )
    trainer.fit()
    net = trainer.state.model.module
    assert type(net.blocks[0].attn_post).__name__ == 'LPLayerNorm'
    paths = hooked_paths(trainer.state.model)
    assert len(paths) == 6 and all('post' in p for p in paths)
    alpha = prores.controller.alphas[0]
    x = torch.randn(4, 16)
    b = net.blocks[0]
    with torch.no_grad():
        h = x + alpha * torch.nn.functional.layer_norm(b.attn(x), (16,), b.attn_post.weight, b.attn_post.bias)
        expected = h + alpha * torch.nn.functional.layer_norm(b.mlp(h), (16,), b.mlp_post.weight, b.mlp_post.bias)
        torch.testing.assert_close(b(x), expected, atol=1e-6, rtol=1e-6)
