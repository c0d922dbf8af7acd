"""Extra memory traffic of ProRes per architecture, counted exactly: default mechanism against the hook.

For each architecture, a tiny transformers model (2 layers x 32, batch 2 x 8 tokens, fp32, dropout 0)
runs one training step (forward and backward) three times: without ProRes, with the default mechanism
and with `mechanism='hook'`, both at α = 0.5 in every layer. A dispatch mode adds up the bytes of every
ATen op's tensor inputs and outputs (views and aliases move nothing and are left out); ProRes' extra
bytes are the difference to the plain step. The hook reads and writes every branch output (and its
gradient) once more; the default puts α into the GEMM of the projection producing the branch, so its
extra traffic is bias-sized. CPU, seconds; the counts do not depend on the machine.

    python -m benchmarks.arch_bytes            # writes benchmarks/results/arch_bytes.json
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks._common import ROOT, machine_info, write_json

BATCH, SEQ, VOCAB, MID_ALPHA = 2, 8, 64, 0.5
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
# name -> (transformers model class, config class, config arguments); every dropout 0
ARCHITECTURES = {
    'llama': ('LlamaForCausalLM', 'LlamaConfig', dict(_COMMON, intermediate_size=64)),
    'gpt2': (
        'GPT2LMHeadModel',
        'GPT2Config',
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    ),
    'gpt_neox': (
        'GPTNeoXForCausalLM',
        'GPTNeoXConfig',
        dict(_COMMON, intermediate_size=64, use_parallel_residual=True, hidden_dropout=0.0, attention_dropout=0.0),
    ),
    'falcon': (
        'FalconForCausalLM',
        'FalconConfig',
        dict(
            _COMMON,
            parallel_attn=False,
            new_decoder_architecture=False,
            bias=True,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        ),
    ),
    'mixtral': (
        'MixtralForCausalLM',
        'MixtralConfig',
        dict(_COMMON, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=4),
    ),
    'mpt': (
        'MptForCausalLM',
        'MptConfig',
        dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, expansion_ratio=2, max_seq_len=64),
    ),
    'opt': (
        'OPTForCausalLM',
        'OPTConfig',
        dict(_COMMON, ffn_dim=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
    ),
    'phi': (
        'PhiForCausalLM',
        'PhiConfig',
        dict(_COMMON, intermediate_size=64, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0),
    ),
}
_VIEW_LIKE = {torch.ops.aten.alias.default, torch.ops.aten.lift_fresh.default, torch.ops.aten._unsafe_view.default}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    import transformers

    model_cls, config_cls, kwargs = ARCHITECTURES[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = 'eager'
    return getattr(transformers, model_cls)(config).train()  # dropout 0: train mode is deterministic


class ByteCounter(TorchDispatchMode):
    """Sums the bytes of every ATen op's tensor inputs and outputs (views and aliases excluded)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (func.is_view or func in _VIEW_LIKE):
            leaves = tree_flatten((args, kwargs or {}, out))[0]
            self.bytes += sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
        return out


def step_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    with ByteCounter() as counter:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return counter.bytes


def extra_bytes(model: torch.nn.Module) -> dict:
    """Bytes the default mechanism and the hook add to one training step of `model` at α = 0.5, and which
    mechanism the default chose per branch."""
    from prores_algo import apply_prores

    if type(model).__name__.startswith('Mixtral'):
        # α changes the router's input, so α = 0.5 could send a token to other experts than the plain model
        # does and run another number of expert GEMMs; a zero router picks the same experts for every variant
        with torch.no_grad():
            for layer in model.model.layers:
                layer.block_sparse_moe.gate.weight.zero_()
    auto, hook = copy.deepcopy(model), copy.deepcopy(model)
    mechanisms = {}
    for m, mech in ((auto, 'auto'), (hook, 'hook')):
        ctrl = apply_prores(m, t_warmup=1000, mechanism=mech)
        ctrl.set_alphas([MID_ALPHA] * ctrl.num_layers)
        if mech == 'auto':
            mechanisms = dict(ctrl.mechanisms)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    base, a, h = (step_bytes(m, ids) for m in (model, auto, hook))
    return {
        'default_extra_bytes': a - base,
        'hook_extra_bytes': h - base,
        'ratio': (a - base) / (h - base),
        'branches_in_gemm': sum(v == 'gemm' for v in mechanisms.values()),
        'branches': len(mechanisms),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'arch_bytes.json'))
    args = p.parse_args(argv)
    rows = {}
    for name in ARCHITECTURES:
        rows[name] = extra_bytes(build(name))
        r = rows[name]
        print(
            f'{name:10s} default +{r["default_extra_bytes"]:>7d} B  hook +{r["hook_extra_bytes"]:>7d} B  '
            f'ratio {r["ratio"]:+.4f}  branches in a GEMM {r["branches_in_gemm"]}/{r["branches"]}',
            flush=True,
        )
    import transformers

    result = {
        'benchmark': 'arch_bytes',
        'command': 'python -m benchmarks.arch_bytes',
        'shape': {'layers': 2, 'hidden': 32, 'batch': BATCH, 'seq': SEQ, 'dtype': 'float32', 'alpha': MID_ALPHA},
        'transformers': transformers.__version__,
        'machine': machine_info(),
        'architectures': rows,
    }
    write_json(Path(args.out), result)
    print('wrote', args.out)
    return result


if __name__ == '__main__':
    main()
