"""fold_prores: α folded into the weights gives a plain checkpoint that computes what the hooked model did."""

import copy

import pytest
import torch
import transformers as T

from prores_algo import apply_prores
from prores_algo.export import fold_prores
from prores_algo.surgery import ALPHA_BUFFER
from prores_algo.training.models.decoder import Decoder
from tests.support.helpers import assert_prores_removed, set_alphas, tiny_config

VOCAB = 64
ATOL = 1e-5


def _llama():
    return T.LlamaForCausalLM(
        T.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            max_position_embeddings=64,
        )
    )


def _gpt2():
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64))


def _gemma3():  # sandwich norms computing x·(1 + w): the α·(1 + w) − 1 rule
    return T.Gemma3ForCausalLM(
        T.Gemma3TextConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=48,
            max_position_embeddings=64,
            pad_token_id=0,
        )
    )


def _neox():
    return T.GPTNeoXForCausalLM(
        T.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
        )
    )


def _mixtral():  # the MoE block is the branch: α goes into every expert's w2
    return T.MixtralForCausalLM(
        T.MixtralConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            max_position_embeddings=64,
            num_local_experts=4,
            num_experts_per_tok=2,
        )
    )


def _qwen2_moe():  # sparse layer (experts + shared expert) and dense layers
    return T.Qwen2MoeForCausalLM(
        T.Qwen2MoeConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            max_position_embeddings=64,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            decoder_sparse_step=2,
        )
    )


HF_MODELS = {
    'llama': _llama,
    'gpt2': _gpt2,
    'gemma3': _gemma3,
    'gpt_neox': _neox,
    'mixtral': _mixtral,
    'qwen2_moe': _qwen2_moe,
}


def _randomise(model, seed=0):
    """Non-trivial norm weights and biases, so that a wrong fold rule cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def _ids(seed=1, batch=2, seq=8):
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids) if isinstance(model, Decoder) else model(input_ids=ids, use_cache=False)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize('arch', sorted(HF_MODELS))
@pytest.mark.parametrize('via', ['controller', 'model'])
def test_fold_save_pretrained_reload_matches_hooked(arch, via, tmp_path):
    torch.manual_seed(0)
    model = HF_MODELS[arch]().eval()
    _randomise(model)
    controller = apply_prores(model, schedule='linear', t_warmup=400)
    controller.set_step(100)  # α = 0.75, 0.375, 0.25
    assert controller.alphas == pytest.approx([0.75, 0.375, 0.25])
    ids = _ids()
    hooked = _logits(model, ids)
    unfolded = model.__class__(model.config).eval()
    unfolded.load_state_dict(model.state_dict())  # what saving without folding would give
    assert (_logits(unfolded, ids) - hooked).abs().max() > 1e-3
    controller_copy = None
    if via == 'controller':
        out = fold_prores(controller, model=model)
    else:
        controller_copy = controller
        out = fold_prores(model)
    assert out is model
    assert assert_prores_removed(model) > 0  # α buffers stay as inert 1.0 (a wrapper keeps seeing them)
    assert all(not m._forward_hooks for m in model.modules()), 'every ProRes hook must be gone'
    torch.testing.assert_close(_logits(model, ids), hooked, rtol=0, atol=ATOL)
    model.save_pretrained(tmp_path / arch)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / arch).eval()
    assert type(reloaded) is type(model)
    torch.testing.assert_close(_logits(reloaded, ids), hooked, rtol=0, atol=ATOL)
    if controller_copy is not None:  # folding through the model leaves the controller harmless
        controller_copy.remove()


def test_fold_is_exact_for_random_alphas_including_zero_and_one():
    torch.manual_seed(0)
    model = _gemma3().eval()
    _randomise(model)
    controller = apply_prores(model, t_warmup=100)
    set_alphas(controller, [0.0, 0.3, 1.0])
    ids = _ids()
    hooked = _logits(model, ids)
    fold_prores(controller)
    torch.testing.assert_close(_logits(model, ids), hooked, rtol=0, atol=ATOL)
    # α = 0: Gemma's (1 + w) norm weight becomes exactly -1 (the branch is 0)
    assert torch.all(model.model.layers[0].post_attention_layernorm.weight == -1)


@pytest.mark.parametrize('norm', ['pre', 'sandwich', 'post', 'deepnorm', 'lns'])
def test_fold_reference_decoder_state_dict_loads_into_fresh_decoder(norm):
    torch.manual_seed(0)
    config = tiny_config(norm=norm, n_layers=4)
    model = Decoder(config).eval()
    _randomise(model)
    controller = apply_prores(model, schedule='linear_square', t_warmup=400)
    controller.set_step(150)
    assert 0 < min(controller.alphas) < 1
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    hooked = _logits(model, ids)
    fold_prores(model)
    state = model.state_dict()
    assert not any(k.endswith(ALPHA_BUFFER) for k in state)
    fresh = Decoder(config).eval()
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(_logits(fresh, ids), hooked, rtol=0, atol=ATOL)


def test_fold_keeps_parameter_objects_and_training_continues():
    torch.manual_seed(0)
    model = Decoder(tiny_config())
    params_before = [id(p) for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    controller = apply_prores(model, t_warmup=40)
    controller.set_step(10)
    fold_prores(controller)
    assert [id(p) for p in model.parameters()] == params_before
    ids = torch.randint(0, 64, (2, 8))
    loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_fold_after_warmup_is_a_no_op_and_composer_algorithm_accepted():
    torch.manual_seed(0)
    model = Decoder(tiny_config())
    reference = copy.deepcopy(model)
    controller = apply_prores(model, t_warmup=4)
    controller.set_step(4)  # done: hooks removed
    assert controller.removed

    class Holder:  # like prores_algo.ProRes / ProResCallback: the controller lives in `.controller`
        pass

    holder = Holder()
    holder.controller = controller
    assert fold_prores(holder, model=model) is model
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


def test_weightless_branch_without_fold_target_gives_clear_error():
    class Block(torch.nn.Module):
        prores_branches = ('drop',)

        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.drop = torch.nn.Dropout(0.0)

        def forward(self, x):
            return x + self.drop(self.proj(x))

    model = torch.nn.Sequential(Block(), Block())
    controller = apply_prores(model, t_warmup=10)
    controller.set_step(5)
    with pytest.raises(ValueError, match='FOLD_TARGETS'):
        fold_prores(model)
    assert controller.num_hooks == 2, 'nothing may be half-folded after an error'
    Block.prores_fold_targets = {'drop': ('proj',)}
    x = torch.randn(3, 4)
    with torch.no_grad():
        hooked = model(x)
        fold_prores(model)
        torch.testing.assert_close(model(x), hooked, rtol=0, atol=1e-6)


def test_bert_fold_targets():
    torch.manual_seed(0)
    model = T.BertForMaskedLM(
        T.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
        )
    ).eval()
    _randomise(model)
    controller = apply_prores(model, t_warmup=200)
    controller.set_step(60)
    ids = _ids()
    with torch.no_grad():
        hooked = model(input_ids=ids).logits
        fold_prores(model)
        torch.testing.assert_close(model(input_ids=ids).logits, hooked, rtol=0, atol=ATOL)


def test_fold_refuses_partitioned_parameters_without_touching_anything():
    torch.manual_seed(0)
    model = Decoder(tiny_config())
    controller = apply_prores(model, t_warmup=40)
    controller.set_step(10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.blocks[2].mlp.down_proj.weight.data = torch.empty(0)  # what ZeRO-3 leaves outside a gather
    with pytest.raises(RuntimeError, match='GatheredParameters'):
        fold_prores(model)
    assert controller.num_hooks == 8
    for k, v in model.state_dict().items():
        if k != 'blocks.2.mlp.down_proj.weight':
            assert torch.equal(v, before[k]), k


def test_fold_from_the_composer_algorithm_gives_a_model_that_saves_pretrained(tmp_path):
    """The README's Composer line: `fold_prores(prores).save_pretrained(...)`, where `prores` is the
    algorithm and the Trainer's model is Composer's HuggingFaceModel around a transformers model."""
    from composer import Trainer
    from composer.models import HuggingFaceModel

    from prores_algo import ProRes

    torch.manual_seed(0)
    hf = _gpt2()
    prores = ProRes(t_warmup='40ba')
    batches = [{'input_ids': torch.randint(0, VOCAB, (2, 16)), 'labels': torch.randint(0, VOCAB, (2, 16))}] * 3
    Trainer(
        model=HuggingFaceModel(hf), train_dataloader=batches, max_duration='3ba', algorithms=[prores],
        optimizers=torch.optim.SGD(hf.parameters(), lr=0.1), device='cpu', progress_bar=False,
        device_train_microbatch_size=2,
    ).fit()  # fmt: skip
    x = torch.randint(0, VOCAB, (2, 16))
    hf.eval()  # no dropout: the two forwards must be comparable
    with torch.no_grad():
        hooked = hf(x).logits
    folded = fold_prores(prores)
    assert folded is hf  # the transformers model, not the Composer wrapper
    folded.save_pretrained(tmp_path / 'folded')
    reloaded = T.GPT2LMHeadModel.from_pretrained(tmp_path / 'folded')
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, hooked, rtol=1e-5, atol=1e-5)
    assert_prores_removed(hf)
