"""What the Hugging Face tests share: a tiny Llama, its token dataset and the TrainingArguments of a
short CPU run (no reporting, no progress bar, one log per step)."""

import torch
import transformers as T
from transformers.trainer_callback import CallbackHandler, TrainerControl, TrainerState

from prores_algo.surgery import ALPHA_BUFFER, has_prores_hook
from tests.support.helpers import RandomTokens

NUM_LAYERS = 3


def hf_tokens(n: int = 48, seq_len: int = 8, seed: int = 0) -> RandomTokens:
    """Token sequences with labels, for `transformers.Trainer`."""
    return RandomTokens(n, seq_len, 64, seed, labels=True)


def hf_args(output_dir, max_steps: int, **overrides) -> T.TrainingArguments:
    """A short CPU run; `overrides` are any other TrainingArguments."""
    settings = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to=[],
        max_steps=max_steps,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_strategy='no',
        learning_rate=1e-3,
        disable_tqdm=True,
        seed=0,
    )
    return T.TrainingArguments(**{**settings, **overrides})


def tiny_llama(seed=0, num_layers=NUM_LAYERS):
    torch.manual_seed(seed)
    return T.LlamaForCausalLM(
        T.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            max_position_embeddings=64,
        )
    )


def alpha_by_layer(model):
    """{layer index: α} read from the buffers the forward pass uses (both branches must agree); the inert
    1.0 buffers a removal leaves behind are read by no hook and are not counted."""
    out = {}
    for name, module in model.named_modules():
        if ALPHA_BUFFER in module._buffers and has_prores_hook(module):
            layer = int(name.split('layers.')[1].split('.')[0])
            buf = module._buffers[ALPHA_BUFFER]
            assert out.setdefault(layer, float(buf)) == float(buf)
    return out


class StepRecorder(T.TrainerCallback):
    """Remembers the optimizer step at which each forward pass runs (Trainer events only)."""

    def __init__(self):
        self.step = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step


def record_forwards(model, recorder):
    seen = []
    model.register_forward_pre_hook(
        lambda m, a: seen.append((recorder.step, alpha_by_layer(m))) if m.training else None
    )
    return seen


def simulated_train(model, callbacks, steps, grad_accum, start_step=0, lr=1e-2):
    """A faithful copy of the event order of Trainer._inner_training_loop (no accelerate needed)."""
    args = None  # TrainingArguments itself needs accelerate; the callbacks here do not read it
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    handler = CallbackHandler(callbacks, model, None, opt, None)
    state, control = TrainerState(), TrainerControl()
    state.global_step, state.max_steps = start_step, steps
    data = hf_tokens(n=steps * grad_accum * 2)
    control = handler.on_train_begin(args, state, control)
    losses = []
    for step in range(start_step, steps):
        for micro in range(grad_accum):
            if micro == 0:
                control = handler.on_step_begin(args, state, control)
            i = (step * grad_accum + micro) * 2
            batch = {k: torch.stack([data[j][k] for j in (i, i + 1)]) for k in ('input_ids', 'labels')}
            loss = model(**batch).loss / grad_accum
            loss.backward()
            losses.append(float(loss))
            if micro < grad_accum - 1:
                control = handler.on_substep_end(args, state, control)
        control = handler.on_pre_optimizer_step(args, state, control)
        opt.step()
        control = handler.on_optimizer_step(args, state, control)
        model.zero_grad()
        state.global_step += 1
        control = handler.on_step_end(args, state, control)
        logs = {'loss': losses[-1]}
        state.log_history.append({**logs, 'step': state.global_step})
        control = handler.on_log(args, state, control, logs)
    handler.on_train_end(args, state, control)
    return state, losses
