"""Which modules of a transformer layer produce the branch that enters each residual add.

ProRes scales a layer's residual branches by that layer's α at the *branch-final* module: the last
module whose output is added to the residual stream unchanged (up to dropout, which commutes with a
scalar). Scaling that module's output (inside its GEMM where it is one, else in a forward hook) gives
exactly `x + α·F(x)`, without touching the layer's forward code.

Layers are recognised by class name (so this table imports nothing and survives library versions in
which the class moved). A model class of your own can instead carry an attribute `prores_branches`
(a tuple of dotted submodule names), or you pass `layer_class=` and `branches=` to `apply_prores`.
Checked on transformers 4.57: tests/test_architectures.py verifies every entry numerically.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    'LAYER_POLICIES',
    'LAYER_VARIANTS',
    'BRANCH_REWRITES',
    'FOLD_TARGETS',
    'register_policy',
    'policy_for',
    'fold_targets_for',
    'BRANCHES_ATTRIBUTE',
    'FOLD_TARGETS_ATTRIBUTE',
]

# Attribute a layer module may define to declare its own branch-final modules.
BRANCHES_ATTRIBUTE = 'prores_branches'
# Attribute a layer module may define to declare, per branch, the modules that carry its α (see FOLD_TARGETS).
FOLD_TARGETS_ATTRIBUTE = 'prores_fold_targets'

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
    # llm-foundry's MPT block (fuse_norm_attn_norm=False, the default; see LAYER_VARIANTS for True).
    'MPTBlock': ('resid_attn_dropout', 'resid_ffn_dropout'),
    # transformers' own MPT (MptForCausalLM): x + resid_attn_dropout(attn(norm_1(x))); the MLP adds the residual
    # itself, h + F.dropout(down_proj(act(up_proj(norm_2(h))))), so its branch ends in `ffn.down_proj`.
    'MptBlock': ('resid_attn_dropout', 'ffn.down_proj'),
    # --- more families (transformers 4.57; tests/test_more_architectures.py checks each numerically) ---
    # Gemma (Pre-LN, RMSNorm computing x·(1+w)): like Llama.
    'GemmaDecoderLayer': _LLAMA_LIKE,
    # Phi-1/2: parallel block, x + drop(dense(attn(ln(x)))) + drop(fc2(mlp(ln(x)))); one shared resid_dropout
    # module serves both branches, so scale the projections in front of it (dropout commutes with α).
    'PhiDecoderLayer': ('self_attn.dense', 'mlp.fc2'),
    # Phi-3: Pre-LN, x + resid_attn_dropout(o_proj(..)), h + resid_mlp_dropout(down_proj(..)).
    'Phi3DecoderLayer': _LLAMA_LIKE,
    # StableLM: sequential or parallel (use_parallel_residual) residual; the attention output is added
    # undropped, the MLP output through `dropout`.
    'StableLmDecoderLayer': _LLAMA_LIKE,
    # Falcon: sequential, parallel (parallel_attn) and new_decoder_architecture; `mlp_output += attention_output`
    # then dropout_add, so both projections' outputs enter the residual add linearly.
    'FalconDecoderLayer': ('self_attention.dense', 'mlp.dense_4h_to_h'),
    # GPT-J: parallel, x + resid_dropout(out_proj(attn(ln(x)))) + dropout(fc_out(mlp(ln(x)))).
    'GPTJBlock': ('attn.out_proj', 'mlp.fc_out'),
    # Mixtral: the whole sparse-MoE block is the MLP branch; it returns (hidden, router_logits) and the
    # surgery hook scales only the first element (router logits, hence the aux loss, are unchanged).
    'MixtralDecoderLayer': ('self_attn.o_proj', 'block_sparse_moe'),
    # OLMo (non-parametric LayerNorm) and StarCoder2 (o_proj / c_proj then a functional dropout): Pre-LN, Llama-like.
    'OlmoDecoderLayer': _LLAMA_LIKE,
    'Starcoder2DecoderLayer': ('self_attn.o_proj', 'mlp.c_proj'),
    # OLMo 2: no pre-norm, each branch ends in its post-norm: x + post_attention_layernorm(attn(x)), ...
    'Olmo2DecoderLayer': ('post_attention_layernorm', 'post_feedforward_layernorm'),
    # Qwen2-MoE: `mlp` is a Qwen2MoeSparseMoeBlock (tuple output, experts + gated shared expert) or, on
    # mlp_only_layers / decoder_sparse_step, a dense Qwen2MoeMLP: scaling `mlp`'s output covers both.
    'Qwen2MoeDecoderLayer': ('self_attn.o_proj', 'mlp'),
}


# Layers whose configuration moves a branch end into a submodule: layer class name -> [(child whose
# presence marks the variant, the variant's branches)]. The first variant whose child exists wins; a
# layer with none of them uses LAYER_POLICIES, which must list the class too (that is how layers are
# found). register_policy with other branches drops the class's variants.
LAYER_VARIANTS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    # MPT with fuse_norm_attn_norm=True: norm_1, attn, norm_2 *and the attention residual add* move into
    # `norm_attn_norm` (FusedNormAttentionNorm). The block still builds its own resid_attn_dropout, but
    # its forward never calls it: hooking that one would leave the attention branch unscaled.
    'MPTBlock': [('norm_attn_norm', ('norm_attn_norm.resid_attn_dropout', 'resid_ffn_dropout'))],
}


def policy_for(layer) -> tuple[str, ...] | None:
    """The branch-final module names of `layer` from the tables (None for a class they do not know)."""
    name = type(layer).__name__
    children = dict(layer.named_children())
    for marker, branches in LAYER_VARIANTS.get(name, ()):
        if marker in children:
            return branches
    return LAYER_POLICIES.get(name)


# When another surgery replaces the module that holds a branch, the branch may end elsewhere in the
# replacement: container class name -> {policy child name: child that really ends the branch}.
BRANCH_REWRITES: dict[str, dict[str, str]] = {
    # Composer's gated_linear_units swaps BertOutput for BERTGatedFFOutput, whose dropout comes *before*
    # its output projection `wo` (and whose bias would not be scaled by scaling the dropout).
    'BERTGatedFFOutput': {'dropout': 'wo'},
}


# One table for the modules that carry α in place of a branch-final module without weights of its own (a
# dropout, a whole MoE block), whose output reaches the branch output linearly (only dropout / routing
# weights in between): `prores_algo.export.fold_prores` folds α into their weights, and the surgery
# (mechanism 'auto') applies α inside their GEMMs when every one of them can (scaled_linear). layer class name ->
# {branch name (as in LAYER_POLICIES): fnmatch patterns of module paths relative to the layer}. Every
# module matching any pattern is scaled; at least one must match. Branches whose module has its own
# weight (Linear, Conv1D, norms) need no entry.
FOLD_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    'GPT2Block': {'attn.resid_dropout': ('attn.c_proj',), 'mlp.dropout': ('mlp.c_proj',)},
    'GPTNeoXLayer': {'post_attention_dropout': ('attention.dense',), 'post_mlp_dropout': ('mlp.dense_4h_to_h',)},
    'BertLayer': {'attention.output.dropout': ('attention.output.dense',), 'output.dropout': ('output.dense',)},
    'MPTBlock': {
        'resid_attn_dropout': ('attn.out_proj',),
        'resid_ffn_dropout': ('ffn.down_proj',),
        'norm_attn_norm.resid_attn_dropout': ('norm_attn_norm.attn.out_proj',),
    },
    'MptBlock': {'resid_attn_dropout': ('attn.out_proj',)},
    # sum_e r_e(x)·w2_e(...): scaling every expert's output projection scales the block output
    'MixtralDecoderLayer': {'block_sparse_moe': ('block_sparse_moe.experts.*.w2',)},
    # sparse block: experts + sigmoid-gated shared expert; dense layers: the MLP's down_proj
    'Qwen2MoeDecoderLayer': {'mlp': ('mlp.down_proj', 'mlp.experts.*.down_proj', 'mlp.shared_expert.down_proj')},
}


def fold_targets_for(layer, branch: str) -> tuple[str, ...] | None:
    """The fnmatch patterns (relative to `layer`) of the modules that carry α for `branch`, from the layer's
    own `prores_fold_targets` dict or from FOLD_TARGETS; None when neither names that branch."""
    own = getattr(layer, FOLD_TARGETS_ATTRIBUTE, None)
    if isinstance(own, dict) and branch in own:
        return tuple(own[branch])
    return FOLD_TARGETS.get(type(layer).__name__, {}).get(branch)


def check_branches(branches: Sequence[str]) -> tuple[str, ...]:
    """The one validation of a user's branch list: a non-empty list of dotted module names."""
    if isinstance(branches, str):  # tuple('attn.o_proj') would be single characters
        raise ValueError(
            f"branches must be a non-empty list of dotted module names, e.g. ['attn.o_proj', "
            f"'mlp.down_proj'], got the string {branches!r}"
        )
    try:
        names = tuple(branches)
    except TypeError:
        names = ()
    if not names or not all(isinstance(b, str) and b for b in names):
        raise ValueError(
            f"branches must be a non-empty list of dotted module names, e.g. ['attn.o_proj', "
            f"'mlp.down_proj'], got {branches!r}"
        )
    return names


def register_policy(layer_class_name: str, branches: tuple[str, ...] | list[str], *, overwrite: bool = False) -> None:
    """Teach ProRes a new layer class: `register_policy('MyBlock', ('attn.proj', 'mlp.fc2'))`."""
    if not isinstance(layer_class_name, str) or not layer_class_name:
        raise ValueError(f'layer_class_name must be a non-empty class name, got {layer_class_name!r}')
    branches = check_branches(branches)
    if layer_class_name in LAYER_POLICIES and not overwrite and LAYER_POLICIES[layer_class_name] != branches:
        raise ValueError(
            f'a policy for {layer_class_name!r} exists ({LAYER_POLICIES[layer_class_name]}); '
            'pass overwrite=True to replace it'
        )
    if LAYER_POLICIES.get(layer_class_name) != branches:
        LAYER_VARIANTS.pop(layer_class_name, None)  # the registered branches hold for every configuration
    LAYER_POLICIES[layer_class_name] = branches
