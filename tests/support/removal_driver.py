"""Run by tests/test_removal_under_wrappers.py in 2 processes (gloo, CPU): ProRes ends mid-run on a model
that has NO buffers of its own, under a wrapper that watches the module's buffers.

usage:
  composer -n 2 tests/support/removal_driver.py composer OUT [fsdp2]     Composer Trainer (DDP, or FSDP2): a straight
                                                                 run, then the same run resumed from a
                                                                 checkpoint saved after the removal
  torchrun --nproc_per_node 2 tests/support/removal_driver.py ddp OUT     apply_prores + raw torch DDP: set_step past
                                                                 W, then fold_prores mid-run, then re-apply
  torchrun --nproc_per_node 2 tests/support/removal_driver.py hf OUT      transformers.Trainer + ProResCallback (DDP)
  torchrun --nproc_per_node 2 tests/support/removal_driver.py deepspeed OUT   apply_prores + DeepSpeed ZeRO-3

Each rank writes OUT/<mode>_rank{r}.json: what it saw, and the final parameters' bytes (hex digests).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, D, HEADS, LAYERS, SEQ = 64, 32, 4, 3, 16
T_WARMUP = 4  # α reaches 1 (and ProRes removes itself) at step 4 ...
STEPS = 8  # ... of 8


class Block(nn.Module):
    """Pre-LN block with plain causal attention: parameters only, no buffer anywhere."""

    prores_branches = ('attn_out', 'mlp_out')

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.attn_out = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc, self.mlp_out = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, D)
        x = x + self.attn_out(a)
        return x + self.mlp_out(F.gelu(self.fc(self.ln2(x))))


class PlainLM(nn.Module):
    """A tiny decoder-only LM with learned positions and NO buffers (like llm-foundry's MPT with ALiBi off)."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, D), nn.Embedding(SEQ, D)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f, self.head = nn.LayerNorm(D), nn.Linear(D, VOCAB, bias=False)

    def forward(self, input_ids):
        x = self.tok(input_ids) + self.pos.weight[: input_ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def lm_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))


def fresh_model() -> PlainLM:
    torch.manual_seed(0)
    model = PlainLM()
    assert not list(model.buffers()), 'the point of this model is that it has no buffers'
    return model


def batches(n, rank, batch_size=2):
    g = torch.Generator().manual_seed(1000 + rank)
    return [torch.randint(0, VOCAB, (batch_size, SEQ), generator=g) for _ in range(n)]


def digests(named_tensors) -> dict[str, str]:
    return {
        n: hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest() for n, t in named_tensors
    }


def alpha_buffers(model) -> dict[str, float]:
    return {n: float(b) for n, b in model.named_buffers() if n.endswith('prores_alpha')}


def branch_hooks(model) -> int:
    """ProRes hooks still on the model (DeepSpeed ZeRO-3 adds hooks of its own to every module)."""
    from prores_algo.surgery import has_prores_hook

    return sum(has_prores_hook(m) for m in model.modules())


def write(out, mode, rank, result):
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, f'{mode}_rank{rank}.json').write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------ Composer
def run_composer(out: str, fsdp2: bool) -> None:
    from composer import Callback, Trainer
    from composer.models import ComposerModel
    from composer.utils import dist
    from torch.utils.data import DataLoader

    from prores_algo import ProRes
    from tests.support.helpers import RandomTokens

    class Wrapped(ComposerModel):
        def __init__(self):
            super().__init__()
            self.model = fresh_model()

        def forward(self, batch):
            return self.model(batch['input_ids'])

        def loss(self, outputs, batch):
            return lm_loss(outputs, batch['input_ids'])

    class Record(Callback):
        def __init__(self):
            self.seen = {}

        def before_forward(self, state, logger):
            self.seen[int(state.timestamp.batch)] = [alpha_buffers(state.model), branch_hooks(state.model)]

    def fit(save_folder, load_path=None):
        ds = RandomTokens(64, SEQ, VOCAB, seed=0)
        loader = DataLoader(ds, batch_size=2, sampler=dist.get_sampler(ds, shuffle=False))
        model = Wrapped()
        rec = Record()
        algo = ProRes(t_warmup=f'{T_WARMUP}ba', remove_when_done=True)
        kwargs = {}
        if fsdp2:
            from composer.utils.parallelism import FSDP2Config

            kwargs['parallelism_config'] = {'fsdp': FSDP2Config(state_dict_type='full')}
        trainer = Trainer(
            model=model,
            train_dataloader=loader,
            max_duration=f'{STEPS}ba',
            algorithms=[algo],
            callbacks=[rec],
            optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2),
            save_folder=save_folder,
            save_interval='6ba',
            save_overwrite=True,
            load_path=load_path,
            device='cpu',
            seed=0,
            progress_bar=False,
            log_to_console=False,
            **kwargs,
        )
        wrapper = 'FSDP2' if trainer.state.fsdp_enabled else type(trainer.state.model).__name__
        trainer.fit()
        if fsdp2:
            from torch.distributed.tensor import DTensor

            params = [(n, p.full_tensor() if isinstance(p, DTensor) else p) for n, p in model.named_parameters()]
        else:
            params = list(model.named_parameters())
        res = {
            'wrapper': wrapper,
            'seen': rec.seen,
            'removed': algo.controller.removed,
            'alphas_end': alpha_buffers(model),
            'hooks_end': branch_hooks(model),
            'params': digests(params),
            'state_dict_keys': sorted(model.state_dict()),
        }
        trainer.close()
        return res

    straight = fit(f'{out}/ck')
    resumed = fit(f'{out}/ck_resumed', load_path=f'{out}/ck/ep0-ba6-rank0.pt')
    write(out, 'composer', dist.get_global_rank(), {'straight': straight, 'resumed': resumed})


# ------------------------------------------------------------------------------------------------ raw DDP
def run_ddp(out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from prores_algo import apply_prores
    from prores_algo.export import fold_prores

    dist.init_process_group('gloo')
    rank = dist.get_rank()
    result = {}

    def train(ddp, controller, steps, start=0):
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        losses = []
        for t, ids in enumerate(batches(steps, rank), start=start):
            if controller is not None:
                controller.set_step(t)  # removes the hooks at t = T_WARMUP
            loss = lm_loss(ddp(ids), ids)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    # 1. ProRes attached before DDP wraps the model; it removes itself mid-run.
    model = fresh_model()
    controller = apply_prores(model, t_warmup=T_WARMUP)
    ddp = DDP(model)
    result['removal'] = {
        'losses': train(ddp, controller, STEPS),
        'removed': controller.removed,
        'alphas_end': alpha_buffers(model),
        'hooks_end': branch_hooks(model),
    }
    # 2. fold_prores mid-warmup, then training goes on under the same DDP wrapper.
    model = fresh_model()
    controller = apply_prores(model, t_warmup=T_WARMUP)
    ddp = DDP(model)
    losses = train(ddp, controller, 2)
    fold_prores(model)  # by model: hooks found on the model; controller left as is (not stepped again)
    losses += train(ddp, None, 2, start=2)
    result['fold'] = {'losses': losses, 'alphas_end': alpha_buffers(model), 'hooks_end': branch_hooks(model)}
    # 3. ProRes removed, then applied again to the same wrapped model (a second warmup), removed again.
    controller = apply_prores(model, t_warmup=2)
    losses = train(ddp, controller, 4)
    result['reapply'] = {'losses': losses, 'removed': controller.removed, 'alphas_end': alpha_buffers(model)}
    # 4. ProRes attached AFTER DDP wrapped the model.
    model = fresh_model()
    ddp = DDP(model)
    controller = apply_prores(ddp.module, t_warmup=T_WARMUP)
    result['attach_after_wrap'] = {'losses': train(ddp, controller, STEPS), 'removed': controller.removed}
    result['params'] = digests(model.named_parameters())
    write(out, 'ddp', rank, result)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ HF Trainer
def run_hf(out: str) -> None:
    from transformers import Trainer

    from prores_algo.integrations.hf import ProResCallback
    from tests.support.helpers import RandomTokens
    from tests.support.hf import hf_args

    class HFWrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = fresh_model()

        def forward(self, input_ids, labels=None):
            logits = self.model(input_ids)
            return {'loss': lm_loss(logits, input_ids), 'logits': logits}

    def fit(max_steps, model, callback):
        args = hf_args(f'{out}/hf', max_steps, learning_rate=1e-2, ddp_backend='gloo', dataloader_num_workers=0)
        trainer = Trainer(
            model=model, args=args, train_dataset=RandomTokens(64, SEQ, VOCAB, seed=0), callbacks=[callback]
        )
        trainer.train()
        return trainer

    model = HFWrap()
    cb = ProResCallback(t_warmup=T_WARMUP)
    # The Trainer wraps the model in DDP *before* on_train_begin attaches ProRes, so a first train() never
    # shows DDP an α buffer. A second Trainer on the same model and callback (a later stage in the same
    # process) wraps it in a NEW DDP that records the α buffers; ProRes then removes itself under it.
    first = fit(3, model, cb)  # stops before W: the hooks stay on
    wrapper = type(first.model_wrapped).__name__
    kept = not cb.controller.removed
    second = fit(STEPS, model, cb)  # same model, same callback: α from step 0 again, removed at step 4
    rank = int(os.environ.get('RANK', 0))
    write(
        out,
        'hf',
        rank,
        {
            'wrapper': wrapper,
            'second_wrapper': type(second.model_wrapped).__name__,
            'new_wrapper': second.model_wrapped is not first.model_wrapped,
            'kept_after_first': kept,
            'removed': cb.controller.removed,
            'alphas_end': alpha_buffers(model),
            'hooks_end': branch_hooks(model),
            'step': second.state.global_step,
            'params': digests(model.named_parameters()),
        },
    )


# ------------------------------------------------------------------------------------------------ DeepSpeed
def run_deepspeed(out: str) -> None:
    import deepspeed

    from prores_algo.integrations.deepspeed import apply_prores

    deepspeed.init_distributed(dist_backend='gloo')
    model = fresh_model()
    prores = apply_prores(model, t_warmup=T_WARMUP)  # before deepspeed.initialize, as documented
    config = {
        'train_micro_batch_size_per_gpu': 2,
        'gradient_accumulation_steps': 1,
        'zero_optimization': {'stage': 3},
        'steps_per_print': 10**6,
    }
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)
    rank = engine.global_rank
    losses = []
    for ids in batches(STEPS, rank):
        prores.step(engine)
        loss = lm_loss(engine(ids), ids)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    write(
        out,
        'deepspeed',
        rank,
        {
            'losses': losses,
            'removed': prores.removed,
            'alphas_end': alpha_buffers(model),
            'hooks_end': branch_hooks(model),
        },
    )


def main():
    mode, out, *rest = sys.argv[1:]
    torch.set_num_threads(1)
    warnings.filterwarnings('ignore', message='ProRes t_warmup')  # W = 4 steps is short on purpose
    if mode == 'composer':
        run_composer(out, fsdp2='fsdp2' in rest)
    elif mode == 'ddp':
        run_ddp(out)
    elif mode == 'hf':
        run_hf(out)
    elif mode == 'deepspeed':
        run_deepspeed(out)
    else:
        raise SystemExit(f'unknown mode {mode!r}')


if __name__ == '__main__':
    main()
