"""Reference Llama-style decoder with five residual/norm placements, for ProRes experiments.

Torch only (no Composer import), so it also runs on a plain PyTorch GPU box.

Architecture (as in the ProRes paper, arXiv 2603.05369): RMSNorm, SwiGLU MLP, rotary position
embeddings (RoPE), causal `scaled_dot_product_attention`, no biases. One `Block` per layer; the norm
placement is chosen by `DecoderConfig.norm` (F = attention or MLP branch, l = 1..L):

    pre / lns   h = x + F(Norm(x))
    post        h = Norm(x + F(x))
    sandwich    h = x + Norm'(F(Norm(x)))
    deepnorm    h = Norm(beta * x + F(x)),  beta = (2L)^(1/4)

ProRes scales each F by alpha(l, t). The contract with the surgery is `Block.prores_branches`: the
dotted names (relative to the block) of the modules whose output *is* the branch entering the
residual add, so multiplying those outputs by alpha gives exactly the formulas above with alpha * F.

Defaults reproduce the paper's official code (`docs/official-code.md` lists every comparison):
- a final RMSNorm after the last layer for every placement, Post-LN and DeepNorm included
  (`final_norm=False` drops it for those two, where the last block already ends in a norm);
- RMSNorm eps 1e-5;
- Linear weights normal(0, init_std), token embedding normal(0, init_std * sqrt(d_model)), norm weights
  1 (lns: 1/sqrt(l) for layer l); `init='torch'` uses PyTorch's own defaults instead (Linear
  kaiming-uniform, std 1/sqrt(3 fan_in); embedding N(0, 1)), and `embed_std` sets the embedding's std
  under either.
  The initialisation sets how large each branch starts against the residual stream, which decides
  whether ProRes helps (`benchmarks/RESULTS.md`);
- DeepNorm: xavier-normal with gain (8L)^(-1/4) on v/o and the FFN, gain 1 on q/k (`deepnet_init`).
  The official code runs this initialisation for plain DeepNorm only: DeepNorm + ProRes starts from
  plain normal(0, init_std), and the paper's DeepNorm + ProRes numbers come from that. Training entries
  resolve it with `default_deepnet_init(prores_on)`.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from prores_algo.training.models.config import (
    INIT_SCHEMES,
    NORM_PLACEMENTS,
    DecoderConfig,
    default_d_ffn,
    default_deepnet_init,
)

__all__ = [
    'NORM_PLACEMENTS',
    'INIT_SCHEMES',
    'DecoderConfig',
    'RotaryEmbedding',
    'Attention',
    'SwiGLU',
    'Block',
    'Decoder',
    'build_decoder',
    'default_d_ffn',
    'default_deepnet_init',
]

# ---------------------------------------------------------------------------------------------------
# Init bookkeeping. Every module that directly owns parameters carries `_init_spec = (kind, value)`;
# `Decoder.param_init_fn(module)` initialises one module from it. Keeping the rule on the module (not
# in a loop over the model) is what lets Composer's meta-device/FSDP init, which visits modules one at
# a time, reproduce exactly the same initialisation as `Decoder.init_weights()`.
#   ('normal', std)    weight ~ N(0, std)
#   ('xavier', gain)   weight ~ xavier_normal(gain)
#   ('const', value)   weight = value (norms)
#   ('torch', None)    the module's own reset_parameters() (PyTorch's default initialisation)
#   ('tied', None)     weight is another module's parameter: leave it alone
# ---------------------------------------------------------------------------------------------------


def _set_init(module: nn.Module, kind: str, value: float | None) -> nn.Module:
    module._init_spec = (kind, value)
    return module


def _xavier_std(weight: torch.Tensor, gain: float) -> float:
    """`nn.init.xavier_normal_`'s std, gain * sqrt(2 / (fan_in + fan_out)), from the parameter's full
    shape (`ds_shape` for a ZeRO-3 partitioned parameter, whose local tensor is empty). The same float
    expression as torch's, so `normal_(0, std)` draws bitwise what `xavier_normal_(gain)` does."""
    shape = tuple(getattr(weight, 'ds_shape', weight.shape))
    if len(shape) < 2:
        raise ValueError(f'xavier init needs a weight of 2 or more dimensions, got shape {shape}')
    receptive_field = math.prod(shape[2:])
    fan_in, fan_out = shape[1] * receptive_field, shape[0] * receptive_field
    return gain * math.sqrt(2.0 / float(fan_in + fan_out))


def _gathered(params: list[nn.Parameter]):
    """`deepspeed.zero.GatheredParameters(params, modifier_rank=0)` if any of `params` is ZeRO-3
    partitioned (has `ds_id`, DeepSpeed's own test), else a no-op: the init then runs on the full
    tensors on every rank (same seed, same draws) and rank 0's result is partitioned again."""
    if not any(hasattr(p, 'ds_id') for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def _rms_norm(config: DecoderConfig, init_value: float = 1.0) -> nn.RMSNorm:
    return _set_init(nn.RMSNorm(config.d_model, eps=config.norm_eps), 'const', init_value)


def _linear_init(config: DecoderConfig) -> tuple[str, float | None]:
    return ('normal', config.init_std) if config.init == 'official' else ('torch', None)


def _embed_init(config: DecoderConfig) -> tuple[str, float | None]:
    if config.embed_std is not None:
        return ('normal', config.embed_std)
    if config.init == 'torch':
        return ('torch', None)
    return ('normal', config.init_std * math.sqrt(config.d_model))


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE tables (Llama's rotate-half convention).

    `cos`/`sin` are non-persistent buffers (not in the state_dict); `reset_parameters()` recomputes
    them in place on whatever device they live on, so a model built on `meta` works after
    `to_empty()` + `init_weights()` (or Composer's meta init, which calls `param_init_fn`).
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer('cos', torch.empty(max_seq_len, head_dim), persistent=False)
        self.register_buffer('sin', torch.empty(max_seq_len, head_dim), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        device = self.cos.device
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim)
        )
        pos = torch.arange(self.max_seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_seq_len, head_dim)
        self.cos.copy_(emb.cos())
        self.sin.copy_(emb.sin())

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[:seq_len], self.sin[:seq_len]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, S, head_dim) by position; computed in fp32 (bf16 angles drift at long positions)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos.float() + rotated * sin.float()).to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE; `o_proj`'s output is the branch F."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        d, self.n_heads, self.head_dim = config.d_model, config.n_heads, config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, D))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); `down_proj`'s output is the branch F."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ffn, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ffn, bias=False)
        self.down_proj = nn.Linear(config.d_ffn, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One transformer layer (`layer_idx` is 0-based; the paper's l = layer_idx + 1).

    Submodules: `attn`, `mlp`, `norm1`, `norm2`, and for sandwich also `attn_post_norm`,
    `mlp_post_norm`. `prores_branches` (plain tuple of str) names the branch-final modules for ProRes.
    """

    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.norm = config.norm
        L = config.n_layers
        self.attn = Attention(config)
        self.mlp = SwiGLU(config)
        # LNS (LayerNorm Scaling): the layer's norm weights start at 1/sqrt(l), l 1-based.
        norm_init = 1.0 / math.sqrt(layer_idx + 1) if config.norm == 'lns' else 1.0
        self.norm1 = _rms_norm(config, norm_init)
        self.norm2 = _rms_norm(config, norm_init)
        if config.norm == 'sandwich':
            self.attn_post_norm = _rms_norm(config)
            self.mlp_post_norm = _rms_norm(config)
            # The post-norm's output is what enters the residual add; scaling o_proj/down_proj
            # instead would be undone by that norm.
            self.prores_branches: tuple[str, ...] = ('attn_post_norm', 'mlp_post_norm')
        else:
            self.prores_branches = ('attn.o_proj', 'mlp.down_proj')
        # DeepNorm (DeepNet, decoder-only): residual up-weighted by beta, branch weights down-scaled.
        self.beta = (2.0 * L) ** 0.25 if config.norm == 'deepnorm' else 1.0

        for lin in (
            self.attn.q_proj,
            self.attn.k_proj,
            self.attn.v_proj,
            self.attn.o_proj,
            self.mlp.gate_proj,
            self.mlp.up_proj,
            self.mlp.down_proj,
        ):
            _set_init(lin, *_linear_init(config))
        if config.norm == 'deepnorm' and config.deepnet_init and config.init == 'official':
            gain = (8.0 * L) ** -0.25
            for lin in (self.attn.v_proj, self.attn.o_proj, self.mlp.gate_proj, self.mlp.up_proj, self.mlp.down_proj):
                _set_init(lin, 'xavier', gain)
            _set_init(self.attn.q_proj, 'xavier', 1.0)
            _set_init(self.attn.k_proj, 'xavier', 1.0)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.norm in ('pre', 'lns'):
            h = x + self.attn(self.norm1(x), cos, sin)
            return h + self.mlp(self.norm2(h))
        if self.norm == 'sandwich':
            h = x + self.attn_post_norm(self.attn(self.norm1(x), cos, sin))
            return h + self.mlp_post_norm(self.mlp(self.norm2(h)))
        if self.norm == 'post':
            h = self.norm1(x + self.attn(x, cos, sin))
            return self.norm2(h + self.mlp(h))
        # deepnorm
        h = self.norm1(self.beta * x + self.attn(x, cos, sin))
        return self.norm2(self.beta * h + self.mlp(h))

    def extra_repr(self) -> str:
        return f'layer_idx={self.layer_idx}, norm={self.norm!r}, beta={self.beta:.4g}'


class Decoder(nn.Module):
    """Decoder-only LM: embed -> blocks -> [final_norm] -> lm_head. `forward(input_ids) -> logits`."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        if not isinstance(config, DecoderConfig):
            raise TypeError(f'config must be a DecoderConfig, got {type(config).__name__}')
        self.config = config
        self.embed = _set_init(nn.Embedding(config.vocab_size, config.d_model), *_embed_init(config))
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        # Pre-LN, Sandwich and LNS leave the residual stream un-normalised, so they need a final norm.
        # Post-LN and DeepNorm end every block with a norm, yet the official code applies one more
        # (with its own learned weight) for every placement, and the paper's numbers come from that.
        self.final_norm: nn.RMSNorm | None = _rms_norm(config) if config.final_norm else None
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
            _set_init(self.lm_head, 'tied', None)  # initialised as the embedding
        else:
            _set_init(self.lm_head, *_linear_init(config))
        self.init_weights()

    # ----------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f'input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}')
        seq_len = input_ids.shape[1]
        if seq_len > self.config.max_seq_len:
            raise ValueError(f'sequence length {seq_len} exceeds DecoderConfig.max_seq_len={self.config.max_seq_len}')
        cos, sin = self.rope(seq_len)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.lm_head(x)

    # ------------------------------------------------------------------------------------- init
    @torch.no_grad()
    def param_init_fn(self, module: nn.Module) -> None:
        """Initialise the parameters/buffers `module` owns directly (not its children).

        Named for Composer's FSDP/meta-init hook (`obj.param_init_fn(module)`), which calls it per
        module after `to_empty`; `init_weights()` applies it to every module. Parameters that
        `deepspeed.zero.Init` has partitioned (ZeRO-3: an empty local tensor) are gathered for the
        init (`deepspeed.zero.GatheredParameters`, modifier_rank=0), so a Decoder built under zero.Init
        draws exactly the numbers, in the same order, of one built without it.
        """
        if isinstance(module, RotaryEmbedding):
            module.reset_parameters()
            return
        spec = getattr(module, '_init_spec', None)
        params = list(module.parameters(recurse=False))
        if spec is None:
            # A module swapped in after construction (e.g. by another algorithm): use its own init.
            if params:
                if not callable(getattr(module, 'reset_parameters', None)):
                    raise RuntimeError(f'no initialisation rule for {type(module).__name__}')
                with _gathered(params):
                    module.reset_parameters()
            return
        kind, value = spec
        if kind == 'tied':
            return
        with _gathered(params):
            self._apply_init_spec(module, kind, value)

    @staticmethod
    def _apply_init_spec(module: nn.Module, kind: str, value: float | None) -> None:
        if kind == 'torch':  # PyTorch's own default (kaiming-uniform Linear, N(0, 1) embedding)
            module.reset_parameters()
            return
        if kind == 'normal':
            nn.init.normal_(module.weight, mean=0.0, std=value)
        elif kind == 'xavier':
            nn.init.normal_(module.weight, mean=0.0, std=_xavier_std(module.weight, value))
        elif kind == 'const':
            nn.init.constant_(module.weight, value)
        else:
            raise RuntimeError(f'unknown init kind {kind!r}')
        if getattr(module, 'bias', None) is not None:
            nn.init.zeros_(module.bias)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and the RoPE buffers, e.g. after `to_empty()` from `meta`."""
        if self.config.tie_embeddings:
            # `to_empty()` may replace Parameter objects, which unties them; tie again.
            self.lm_head.weight = self.embed.weight
        for module in self.modules():
            self.param_init_fn(module)

    # Composer hooks (plain methods; Composer looks them up by name): shard / checkpoint per block.
    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        return isinstance(module, Block)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        return isinstance(module, Block)

    # ----------------------------------------------------------------------------- accounting
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of (unique) parameters; `exclude_embeddings` drops the token embedding (and so a tied
        head, which is the same tensor). An untied `lm_head` is a real matmul and is always counted."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward) for MFU, llm-foundry's formula.

        llm-foundry (`ComposerMPTCausalLM.flops_per_batch`, used by Composer's `SpeedMonitor` for MFU):
            flops_per_seq = 3 * (2 * N * S + n_layers * 2 * 2 * d_model * S**2)
        with N = all parameters (llm-foundry's `n_active_params`, embeddings included), S = seq_len,
        backward = 2x forward; attention scores (QK^T) and A@V cost 2 * 2 * d_model * S^2 per layer,
        counted without the causal halving. Per token (divide by S):
            6 * N + 12 * n_layers * d_model * S
        """
        c = self.config
        return 3 * (2 * self.num_params() + 2 * 2 * c.n_layers * c.d_model * seq_len)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer param groups as in the paper: weight decay on Linear weights only; none on norm
        weights, biases or embeddings (a tied head is the embedding, so it gets none either)."""
        decay: list[nn.Parameter] = []
        for module in self.modules():
            if isinstance(module, nn.Linear) and not (self.config.tie_embeddings and module is self.lm_head):
                decay.append(module.weight)
        decay_ids = {id(p) for p in decay}
        no_decay = [p for p in self.parameters() if id(p) not in decay_ids]
        return [
            {'params': decay, 'weight_decay': float(weight_decay)},
            {'params': no_decay, 'weight_decay': 0.0},
        ]


def build_decoder(**kwargs) -> Decoder:
    """`Decoder(DecoderConfig(**kwargs))`."""
    return Decoder(DecoderConfig(**kwargs))
