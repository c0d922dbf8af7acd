"""Numerical conformance on llm-foundry's real `MPTBlock`, both with and without `fuse_norm_attn_norm`.

llm-foundry 0.22 cannot be installed beside our stack (it pins streaming < 0.13, transformers < 4.52),
so the fixture fetches its wheel with `pip install --no-deps` into a temp folder and imports only the
layer modules: foundry's package `__init__` files pull in mlflow, GitPython, boto3 ... which the block
code does not use, so those package modules are replaced by empty namespaces. The block code that runs
is foundry's own (attention, FFN, norms, the block forward). Foundry's full `MPTForCausalLM` does not
run on transformers 4.57 (its config guard rejects a method newer transformers call), hence blocks in a
plain ModuleList: the policy is a property of the block, which is what this checks.
"""

import copy
import importlib
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

from prores_algo import apply_prores
from prores_algo.export import fold_prores
from prores_algo.layers import find_residual_layers
from prores_algo.surgery import ALPHA_BUFFER
from tests.support.helpers import assert_prores_removed, set_random_alphas

FOUNDRY = 'llm-foundry==0.22.0'
# foundry packages whose __init__ imports the world; their submodules are imported directly
_NAMESPACES = (
    'llmfoundry',
    'llmfoundry.models',
    'llmfoundry.models.layers',
    'llmfoundry.models.utils',
    'llmfoundry.utils',
)
D_MODEL, N_LAYERS, SEQ, BATCH = 32, 3, 6, 2


@pytest.fixture(scope='module')
def foundry(tmp_path_factory):
    target = tmp_path_factory.mktemp('llmfoundry')
    proc = subprocess.run(
        [
            sys.executable,
            '-m',
            'pip',
            'install',
            '-q',
            '--no-deps',
            '--no-compile',
            '--disable-pip-version-check',
            '--target',
            str(target),
            FOUNDRY,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f'pip could not fetch {FOUNDRY}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}'
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == 'llmfoundry' or k.startswith('llmfoundry.')}
    for name in _NAMESPACES:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(target / name.replace('.', '/'))]
        sys.modules[name] = pkg
    try:
        for mod in ('attention', 'ffn', 'norm', 'fc'):  # importing them fills foundry's layer registries
            importlib.import_module(f'llmfoundry.models.layers.{mod}')
        blocks = importlib.import_module('llmfoundry.models.layers.blocks')
        defaults = importlib.import_module('llmfoundry.models.utils.config_defaults')
        yield types.SimpleNamespace(MPTBlock=blocks.MPTBlock, attn_config_defaults=defaults.attn_config_defaults)
    finally:
        for k in [k for k in sys.modules if k == 'llmfoundry' or k.startswith('llmfoundry.')]:
            del sys.modules[k]
        sys.modules.update(saved)


class Blocks(nn.Module):
    """MPTModel's block loop, without the embedding (its `transformer.blocks` is a ModuleList too)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)[0]
        return x


def build(foundry, fuse: bool) -> Blocks:
    torch.manual_seed(0)
    attn = copy.deepcopy(foundry.attn_config_defaults)
    attn['attn_impl'] = 'torch'
    blocks = [
        foundry.MPTBlock(
            d_model=D_MODEL,
            n_heads=4,
            expansion_ratio=2,
            attn_config=attn,
            ffn_config={'ffn_type': 'mptmlp'},
            fc_type={'name': 'torch'},
            norm_type='low_precision_layernorm',
            resid_pdrop=0.0,
            fuse_norm_attn_norm=fuse,
        )
        for _ in range(N_LAYERS)
    ]
    model = Blocks(blocks).eval()
    with torch.no_grad():  # non-trivial norm weights, so a mix-up of norm_1 / norm_2 would show
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def mpt_block(block, x, a):
    """MPTBlock.forward written out with α: h = x + α·attn(norm_1(x)); out = h + α·ffn(norm_2(h))."""
    inner = block.norm_attn_norm if block.fuse_norm_attn_norm else block
    h = x + a * inner.attn(inner.norm_1(x), is_causal=True)[0]
    return h + a * block.ffn(inner.norm_2(h))


@pytest.mark.parametrize('fuse', [False, True], ids=['unfused', 'fuse_norm_attn_norm'])
def test_mpt_block_equals_x_plus_alpha_f(foundry, fuse):
    model = build(foundry, fuse)
    reference = copy.deepcopy(model)
    controller = apply_prores(model, t_warmup=100)
    attn_end = 'norm_attn_norm.resid_attn_dropout' if fuse else 'resid_attn_dropout'
    assert [l.branches for l in controller.layers] == [(attn_end, 'resid_ffn_dropout')] * N_LAYERS
    if fuse:  # the block's own resid_attn_dropout exists but its forward never calls it: it must stay unhooked
        assert all(ALPHA_BUFFER not in l.module.resid_attn_dropout._buffers for l in controller.layers)
    alphas = set_random_alphas(controller)

    seen = []
    handles = [
        l.module.register_forward_hook(lambda m, args, out: seen.append((args[0].clone(), out[0].clone())))
        for l in controller.layers
    ]
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hooked, plain = model(x), reference(x)
    for h in handles:
        h.remove()
    assert len(seen) == N_LAYERS
    ref_layers = find_residual_layers(reference)
    with torch.no_grad():
        for i, ((inp, out), a) in enumerate(zip(seen, alphas, strict=True)):
            torch.testing.assert_close(
                out, mpt_block(ref_layers[i].module, inp, a), rtol=0, atol=1e-6, msg=lambda m, i=i: f'layer {i}: {m}'
            )
    assert not torch.allclose(hooked, plain, atol=1e-3), 'α < 1 must change the output'
    controller.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain, rtol=0, atol=0)


@pytest.mark.parametrize('via', ['controller', 'model'])
@pytest.mark.parametrize('fuse', [False, True], ids=['unfused', 'fuse_norm_attn_norm'])
def test_mpt_fold_matches_hooked(foundry, fuse, via):
    """fold_prores puts α into attn.out_proj / ffn.down_proj (the dropouts own no weight); given only the
    model it finds each hooked module's layer and branch from the policy tables."""
    model = build(foundry, fuse)
    controller = apply_prores(model, t_warmup=100)
    set_random_alphas(controller, seed=3)
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hooked = model(x)
    fold_prores(controller, model=model) if via == 'controller' else fold_prores(model)
    assert assert_prores_removed(model) == 2 * N_LAYERS  # α buffers stay as inert 1.0: nothing reads them
    with torch.no_grad():
        torch.testing.assert_close(model(x), hooked, rtol=0, atol=1e-6)


def test_registered_policy_replaces_the_builtin_variants(foundry):
    from prores_algo.policies import LAYER_POLICIES, LAYER_VARIANTS, register_policy

    saved = dict(LAYER_POLICIES), {k: list(v) for k, v in LAYER_VARIANTS.items()}
    try:
        register_policy('MPTBlock', ('resid_attn_dropout', 'resid_ffn_dropout'))  # the same: variants stay
        assert [l.branches[0] for l in apply_prores(build(foundry, True), t_warmup=10).layers] == [
            'norm_attn_norm.resid_attn_dropout'
        ] * N_LAYERS
        register_policy('MPTBlock', ('norm_attn_norm.attn.out_proj', 'ffn.down_proj'), overwrite=True)
        for fuse in (False, True):  # the user's branches hold for every configuration
            model = build(foundry, fuse)
            if not fuse:
                with pytest.raises(ValueError, match="branch 'norm_attn_norm.attn.out_proj' not found"):
                    apply_prores(model, t_warmup=10)
            else:
                assert apply_prores(model, t_warmup=10).layers[0].branches == (
                    'norm_attn_norm.attn.out_proj',
                    'ffn.down_proj',
                )
    finally:
        LAYER_POLICIES.clear(), LAYER_POLICIES.update(saved[0])
        LAYER_VARIANTS.clear(), LAYER_VARIANTS.update(saved[1])
