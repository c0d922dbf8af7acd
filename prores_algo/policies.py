"""Which modules of a transformer layer produce the branch that enters each residual add.

ProRes scales a layer's residual branches by that layer's α. We do it with a forward hook on the
*branch-final* module: the last module whose output is added to the residual stream unchanged (up to
dropout, which commutes with a scalar). Scaling that module's output gives exactly `x + α·F(x)`,
without touching the layer's forward code.

Layers are recognised by class name (so this table imports nothing and survives library versions in
which the class moved). A model class of your own can instead carry an attribute `prores_branches`
(a tuple of dotted submodule names), or you pass `layer_class=` and `branches=` to `apply_prores`.
Checked on transformers 4.57: tests/test_surgery.py verifies every entry numerically.
"""

from __future__ import annotations

__all__ = ['LAYER_POLICIES', 'BRANCH_REWRITES', 'register_policy', 'BRANCHES_ATTRIBUTE']

# Attribute a layer module may define to declare its own branch-final modules.
BRANCHES_ATTRIBUTE = 'prores_branches'

_LLAMA_LIKE = ('self_attn.o_proj', 'mlp.down_proj')

# layer class name -> dotted names (relative to the layer) of its branch-final modules
LAYER_POLICIES: dict[str, tuple[str, ...]] = {
    # Pre-LN decoders: residual + o_proj(attn(norm(x))), residual + down_proj(mlp(norm(h)))
    'LlamaDecoderLayer': _LLAMA_LIKE,
    'MistralDecoderLayer': _LLAMA_LIKE,
    'Qwen2DecoderLayer': _LLAMA_LIKE,
    'Qwen3DecoderLayer': _LLAMA_LIKE,
    # Sandwich norm: the branch ends in a post-norm; scaling o_proj would be undone by that norm.
    'Gemma2DecoderLayer': ('post_attention_layernorm', 'post_feedforward_layernorm'),
    'Gemma3DecoderLayer': ('post_attention_layernorm', 'post_feedforward_layernorm'),
    # GPT-2: c_proj then dropout; the dropout is what is added.
    'GPT2Block': ('attn.resid_dropout', 'mlp.dropout'),
    # GPT-NeoX: both branches end in a dropout, for parallel and sequential residual alike.
    'GPTNeoXLayer': ('post_attention_dropout', 'post_mlp_dropout'),
    # OPT: out_proj / fc2 are followed by a functional dropout, which commutes with α.
    'OPTDecoderLayer': ('self_attn.out_proj', 'fc2'),
    # BERT (Post-LN): dense -> dropout -> LayerNorm(h + input); scale the dropout output.
    'BertLayer': ('attention.output.dropout', 'output.dropout'),
    # llm-foundry's MPT block.
    'MPTBlock': ('resid_attn_dropout', 'resid_ffn_dropout'),
}


# When another surgery replaces the module that holds a branch, the branch may end elsewhere in the
# replacement: container class name -> {policy child name: child that really ends the branch}.
BRANCH_REWRITES: dict[str, dict[str, str]] = {
    # Composer's gated_linear_units swaps BertOutput for BERTGatedFFOutput, whose dropout comes *before*
    # its output projection `wo` (and whose bias would not be scaled by scaling the dropout).
    'BERTGatedFFOutput': {'dropout': 'wo'},
}


def register_policy(layer_class_name: str, branches: tuple[str, ...] | list[str], *, overwrite: bool = False) -> None:
    """Teach ProRes a new layer class: `register_policy('MyBlock', ('attn.proj', 'mlp.fc2'))`."""
    if not isinstance(layer_class_name, str) or not layer_class_name:
        raise ValueError(f'layer_class_name must be a non-empty class name, got {layer_class_name!r}')
    branches = tuple(branches)
    if not branches or not all(isinstance(b, str) and b for b in branches):
        raise ValueError(f'branches must be a non-empty sequence of dotted module names, got {branches!r}')
    if layer_class_name in LAYER_POLICIES and not overwrite and LAYER_POLICIES[layer_class_name] != branches:
        raise ValueError(f'a policy for {layer_class_name!r} exists ({LAYER_POLICIES[layer_class_name]}); '
                         'pass overwrite=True to replace it')
    LAYER_POLICIES[layer_class_name] = branches
