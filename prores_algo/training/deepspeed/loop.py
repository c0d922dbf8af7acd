"""A thin DeepSpeed training loop for the reference decoder with ProRes (ZeRO-3 ready).

    torchrun --nproc_per_node 2 -m prores_algo.training.deepspeed.loop --deepspeed_config yamls/deepspeed/zero3.json \
        --steps 200 --prores_warmup 100 --summary out/summary.json
    torchrun --nproc_per_node 2 -m prores_algo.training.deepspeed.loop --config yamls/quickstart.yaml [key=value ...]
    deepspeed --num_gpus 2 --module prores_algo.training.deepspeed.loop ...   (or `composer -n 2 -m prores_algo.training.deepspeed.loop ...`)

Every launcher sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain `python -m
prores_algo.training.deepspeed.loop` runs one process. Backend: gloo on CPU, nccl on CUDA.

A run is a `TrainConfig` (the schema prores-train reads; the flat flags map onto it) plus `DSOptions`
(`prores_algo.training.deepspeed.settings`); model, ProRes, optimizer, LR schedule and dataset come from
`prores_algo.training.recipe` as for prores-train. What is DeepSpeed's is here (DeepSpeed does the rest from its
JSON: ZeRO partitioning, gradient accumulation, clipping, bf16):
  * the JSON is checked against the config before any process group exists;
  * the decoder is built under `deepspeed.zero.Init` for stage 3 (unless `zero_init=False`) with the
    same seed on every rank, then `apply_prores`; torch AdamW unless the JSON has an "optimizer"
    block; the LR schedule is a `LambdaLR` from `lr_lambda_from` (WSD by default);
  * data: a synthetic token set, or MDS shards (`prores_algo.training.deepspeed.data`);
  * each optimizer step t: `prores.step(engine)` (α(t) from engine.global_steps) before every
    micro-batch forward, `engine.backward`, `engine.step`;
  * checkpoints through `save_checkpoint` / `load_checkpoint` (ProRes configuration guarded); on resume
    the data position is restored by skipping the micro-batches already consumed.

`train(cfg) -> dict` is the entry point for code (the flat options as a dict, or a TrainConfig and
DSOptions); `main()` parses the CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import sys
import time
import zlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from prores_algo import alpha_schedules
from prores_algo.integrations.deepspeed import (
    SIDECAR_FILE,
    apply_prores,
    check_checkpoint,
    load_checkpoint,
    lr_scheduler_factory,
    save_checkpoint,
)
from prores_algo.spec import WARMUP_STEPS_METRIC
from prores_algo.surgery import ALPHA_BUFFER
from prores_algo.timing import auto_warmup_steps, is_auto
from prores_algo.training import recipe
from prores_algo.training.checkpoint_store import fetch_staged, save_to_store, store_locations
from prores_algo.training.config import ConfigError, TrainConfig, report
from prores_algo.training.deepspeed.cli import parse
from prores_algo.training.deepspeed.data import SyntheticTokens, loaders, micro_batches
from prores_algo.training.deepspeed.process_group import init_distributed
from prores_algo.training.deepspeed.settings import DEFAULTS, DSOptions, StepPlan, checked_ds_config, from_flat, resolve
from prores_algo.training.models.decoder import Decoder
from prores_algo.warmup_advice import MEASURE_SAMPLES, advise_warmup

__all__ = ['DEFAULTS', 'DSOptions', 'train', 'main', 'SyntheticTokens', 'build_model']


# ---------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------
def build_model(
    cfg: StepPlan | TrainConfig | Mapping[str, Any], ds_config: dict | None = None, zero_init: bool = False
) -> Decoder:
    """The reference decoder of `cfg` (a StepPlan, a TrainConfig or the flat options), seeded with its
    seed; under `deepspeed.zero.Init` if `zero_init`.

    `Decoder.__init__` initialises its weights after its children are built; under zero.Init those
    are already partitioned (0 elements here), and `Decoder.param_init_fn` gathers each module's
    parameters for its init (GatheredParameters, modifier_rank=0). The random draws happen in the same
    order as without zero.Init, so both builds give the same weights, bit for bit.
    """
    plan = cfg if isinstance(cfg, StepPlan) else resolve(cfg if isinstance(cfg, TrainConfig) else from_flat(cfg)[0])
    torch.manual_seed(plan.seed)
    if not zero_init:
        return Decoder(plan.model)
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        return Decoder(plan.model)


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _partition_stats(engine) -> dict:
    params = list(engine.module.parameters())
    if not params or not hasattr(params[0], 'ds_numel'):
        return {'zero3': False}
    stats = {
        'zero3': True,
        'num_params': len(params),
        'total_numel': int(sum(p.ds_numel for p in params)),
        'local_numel': int(sum(p.ds_tensor.numel() for p in params)),
        'visible_numel': int(sum(p.numel() for p in params)),
        'persistent_params': int(sum(bool(getattr(p, 'ds_persist', False)) for p in params)),
    }
    flat = getattr(engine.optimizer, 'fp32_partitioned_groups_flat', None)
    if flat:
        stats['optimizer_fp32_numel'] = int(sum(t.numel() for t in flat))
    return stats


# ---------------------------------------------------------------------------------------------------
# the DeepSpeed JSON and distributed setup
# ---------------------------------------------------------------------------------------------------
def _prores_expected(plan: StepPlan) -> dict:
    """The ProRes record a checkpoint must carry to be resumed here (unknown names fail here)."""
    if not plan.prores.enabled:
        return {'enabled': False}
    n_layers = plan.model.n_layers
    return {
        'enabled': True,
        'schedule': alpha_schedules.canonical_name(plan.prores.schedule),
        't_warmup': float(plan.t_warmup if plan.t_warmup is not None else 1000 * n_layers),
        'num_layers': n_layers,
        'time_unit': 'steps',
    }


def _recorded_warmup(load_dir: str, tag: str | None) -> float | None:
    """W (`t_warmup`) recorded in the checkpoint's ProRes sidecar, or None when there is none."""
    if tag is None:
        latest = os.path.join(load_dir, 'latest')
        if not os.path.isfile(latest):
            return None
        with open(latest) as f:
            tag = f.read().strip()
    path = os.path.join(load_dir, str(tag), SIDECAR_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        w = json.load(f).get('t_warmup')
    return None if w is None else float(w)


def _build_engine(plan: StepPlan, opts: DSOptions, ds_config: dict, lr: float, lr_factory, advise: bool = True):
    """(engine, prores or None, zero_init): the model (under zero.Init for stage 3), ProRes, optimizer.
    `advise` False: the short-warmup advice waits for the first batch (`train`)."""
    import deepspeed

    stage = (ds_config.get('zero_optimization') or {}).get('stage', 0)
    zero_init = bool(opts.zero_init) and stage == 3
    model = build_model(plan, ds_config, zero_init=zero_init)
    prores = None
    if plan.prores.enabled:
        w = plan.t_warmup
        if is_auto(plan.prores.t_warmup) and w == auto_warmup_steps(plan.model.n_layers, plan.steps):
            w = 'auto'  # the same W, through the same rule: its warning names the cap (a resume keeps its W)
        prores = apply_prores(
            model, plan.prores.schedule, w, total_steps=plan.steps, mechanism=plan.prores.mechanism, advise=advise
        )
    groups = recipe.param_groups(model, plan.optimizer.weight_decay)
    if ds_config.get('optimizer') is None:
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(plan.optimizer.betas), eps=plan.optimizer.eps)
        init_kwargs = {'optimizer': optimizer}
    else:
        for g in groups:
            g['lr'] = lr
        init_kwargs = {'model_parameters': groups}
    engine, _, _, _ = deepspeed.initialize(
        model=model, lr_scheduler=lr_factory, config=ds_config, dist_init_required=False, **init_kwargs
    )
    return engine, prores, zero_init


# ---------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------
def train(cfg: Mapping[str, Any] | TrainConfig, options: DSOptions | None = None) -> dict:
    """Train; returns a summary dict (identical keys on every rank; rank-local `partition` stats).

    `cfg` is the flat options (DEFAULTS' keys) or a TrainConfig, with `options` (default DSOptions()).
    Per optimizer step i (`steps[i]` = engine.global_steps during its forward = t): `losses[i]` (mean
    over micro-batches and ranks), `lrs[i]` (the LR used), `alphas[i]` (α per layer used, equal to
    `alpha_schedules.alphas(schedule, n_layers, t, t_warmup)`), and `eval` entries {step, loss, perplexity}.
    """
    if isinstance(cfg, TrainConfig):
        config, opts = cfg, options or DSOptions()
    elif options is not None:
        raise TypeError('train(flat_options) takes no DSOptions: they are among the flat options')
    else:
        config, opts = from_flat(cfg)
    t_start = time.time()
    try:
        plan, ds_config, lr, lr_factory, (load_dir, load_tag, store) = _prepare(config, opts)
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:  # the user's settings: one-line errors
        raise ConfigError(str(e)) from e
    if not opts.verbose:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    rank, world = init_distributed()
    measure = plan.prores.enabled and plan.prores.measure_init and not load_dir  # a fresh run's first batch
    engine, prores, zero_init = _build_engine(plan, opts, ds_config, lr, lr_factory, advise=not measure)
    partition_init = _partition_stats(engine)
    if load_dir:
        fetch_staged(plan, load_dir, load_tag)  # a checkpoint from an object store: its files, on every node
    resumed_from = load_checkpoint(engine, prores, load_dir, tag=load_tag)[0] if load_dir else None
    start = engine.global_steps
    micro, accum = ds_config['train_micro_batch_size_per_gpu'], ds_config['gradient_accumulation_steps']
    train_loader, sampler, eval_loader = loaders(plan, opts, micro, accum, rank, world)
    loop = _Loop(plan, opts, engine, prores, eval_loader, rank, accum, store)
    batches = micro_batches(train_loader, sampler, start * accum)
    if measure:  # on the first samples of each rank's first micro-batch, which is then trained on as usual
        first = next(batches)
        ids = first['input_ids'][:MEASURE_SAMPLES].to(loop.device)
        measured = advise_warmup(prores.controller, engine, ids, every_rank=True)
        if measured is not None and rank == 0:
            print(f'prores: branches start at {measured.ratio:.3g} of the residual stream ({measured.regime})')
        batches = itertools.chain([first], batches)
    loop.run(batches)
    out = loop.out
    last = out['eval'][-1] if out['eval'] else {}
    out.update(
        {
            'final_eval_loss': last.get('loss'),
            'final_perplexity': last.get('perplexity'),
            'rank': rank,
            'world_size': world,
            'zero_stage': (ds_config.get('zero_optimization') or {}).get('stage', 0),
            'zero_init': zero_init,
            'micro_batch_size': micro,
            'grad_accum': accum,
            'train_batch_size': ds_config['train_batch_size'],
            'lr': lr,
            'prores': None if prores is None else prores.state(),
            WARMUP_STEPS_METRIC: None if prores is None else float(prores.t_warmup),
            'prores_removed': None if prores is None else prores.removed,
            'init_measure': None
            if prores is None or prores.controller.init_measure is None
            else dataclasses.asdict(prores.controller.init_measure),
            'start_step': start,
            'resumed_from': resumed_from,
            'partition_init': partition_init,
            'partition_end': _partition_stats(engine),
            'alpha_buffers_end': {
                name: float(buf) for name, buf in engine.module.named_buffers() if name.endswith(ALPHA_BUFFER)
            },
            'wall_s': time.time() - t_start,
            'config': _summary_config(plan, opts),
        }
    )
    _write_summary(out, opts.summary, rank)
    return out


def _prepare(config: TrainConfig, opts: DSOptions):
    """Every configuration check, before the process group exists: a bad config fails fast on every rank
    with the same message instead of hanging in a collective. The dataset is built here (file-locked)."""
    plan = resolve(config)
    world = (
        torch.distributed.get_world_size()
        if torch.distributed.is_initialized()
        else int(os.environ.get('WORLD_SIZE', '1'))
    )
    ds_config, lr = checked_ds_config(plan, opts, world)
    if plan.data_build is not None:  # shards from the YAML's data.source; safe on every rank
        from prores_algo.training.data import ensure_dataset

        try:
            ensure_dataset(**plan.data_build, progress=int(os.environ.get('RANK', '0')) == 0)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f'data: {e}') from e
    lr_factory = lr_scheduler_factory(plan.lr_schedule, max_steps=plan.steps, lr_warmup_delay=plan.lr_warmup_delay)
    store, load_dir, load_tag = store_locations(plan, opts.load_tag)
    if plan.autoresume and not load_dir and plan.save_dir and os.path.exists(os.path.join(plan.save_dir, 'latest')):
        load_dir = plan.save_dir
    if load_dir and plan.prores.enabled and is_auto(plan.prores.t_warmup):
        recorded = _recorded_warmup(load_dir, load_tag)
        if recorded is not None:  # t_warmup='auto': the checkpoint's W, whatever the new run length
            plan = dataclasses.replace(plan, t_warmup=recorded)
    if load_dir:  # refuse a resume under another ProRes configuration before building anything
        check_checkpoint(load_dir, _prores_expected(plan), load_tag)
    return plan, ds_config, lr, lr_factory, (load_dir, load_tag, store)


class _Loop:
    """The optimizer steps from engine.global_steps to plan.steps, with evaluation and checkpoints."""

    def __init__(self, plan: StepPlan, opts: DSOptions, engine, prores, eval_loader, rank: int, accum: int, store):
        self.plan, self.opts, self.engine, self.prores, self.store = plan, opts, engine, prores, store
        self.eval_loader, self.rank, self.accum = eval_loader, rank, accum
        self.device = (
            torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
            if torch.cuda.is_available()
            else torch.device('cpu')
        )
        self.out: dict[str, Any] = {'steps': [], 'losses': [], 'lrs': [], 'alphas': [], 'eval': [], 'saved': []}
        self.out['upload_failed'] = []  # tags whose upload to the object store failed (kept locally)
        if opts.record_samples:
            self.out['samples'] = []

    def run(self, batches) -> None:
        plan, engine = self.plan, self.engine
        while engine.global_steps < plan.steps:
            self.step(batches)
            done = engine.global_steps
            if plan.eval_every and done % plan.eval_every == 0 and done < plan.steps:
                self.evaluate(done)
            if plan.save_dir and plan.save_interval and done % plan.save_interval == 0 and done < plan.steps:
                self.save()
        self.evaluate(engine.global_steps)
        if plan.save_dir:
            self.save()

    def step(self, batches) -> None:
        """One optimizer step: `accum` micro-batches, each after `prores.step(engine)`."""
        engine, out, steps = self.engine, self.out, self.plan.steps
        t = engine.global_steps
        lr_now = float(engine.get_lr()[0])
        micro_losses, step_alphas, step_samples = [], None, []
        for _ in range(self.accum):
            ids = next(batches)['input_ids'].to(self.device)
            if self.opts.record_samples:
                step_samples += [zlib.crc32(row.numpy().tobytes()) for row in ids.cpu()]
            if self.prores is not None:
                alphas = self.prores.step(engine)
                if step_alphas is None:
                    step_alphas = alphas
                elif alphas != step_alphas:  # cannot happen: global_steps moves only at the boundary
                    raise RuntimeError(f'α changed inside optimizer step {t}')
            loss = _lm_loss(engine(ids), ids)
            engine.backward(loss)
            engine.step()
            micro_losses.append(loss.item())
        if engine.global_steps != t + 1:
            raise RuntimeError(
                f'engine.global_steps went {t} -> {engine.global_steps} in one step: '
                'gradient_accumulation_steps disagrees with the loop'
            )
        loss = _all_mean([sum(micro_losses) / len(micro_losses)], self.device)[0]
        alphas = step_alphas if step_alphas is not None else [1.0] * self.plan.model.n_layers
        out['steps'].append(t)
        if self.opts.record_samples:
            out['samples'].append(step_samples)
        out['losses'].append(loss)
        out['lrs'].append(lr_now)
        out['alphas'].append(list(alphas))
        log_interval = self.opts.log_interval
        if self.rank == 0 and log_interval and ((t + 1) % log_interval == 0 or t + 1 == steps):
            # one write per line: other ranks share this stdout, and under PYTHONUNBUFFERED print() would
            # issue the text and its newline as two writes that another rank's output can split
            sys.stdout.write(
                f'step {t + 1}/{steps} loss {loss:.4f} lr {lr_now:.4e} prores/alpha/mean {sum(alphas) / len(alphas):.4f}\n'
            )
            sys.stdout.flush()

    def evaluate(self, step: int) -> None:
        if self.eval_loader is not None:
            loss, ppl = _evaluate(self.engine, self.eval_loader, self.device)
            self.out['eval'].append({'step': step, 'loss': loss, 'perplexity': ppl})
            if self.rank == 0:
                print(f'eval step {step} loss {loss:.4f} perplexity {ppl:.3f}', flush=True)

    def save(self) -> None:
        save_dir, tag = self.plan.save_dir, f'global_step{self.engine.global_steps}'
        if self.store is not None:
            if not save_to_store(self.engine, self.prores, self.store, tag):
                self.out['upload_failed'].append(tag)
        else:
            save_checkpoint(self.engine, self.prores, save_dir, tag=tag)
        self.out['saved'].append(f'{save_dir.rstrip("/")}/{tag}')


def _all_mean(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return (t / torch.distributed.get_world_size()).tolist()


@torch.no_grad()
def _evaluate(engine, loader, device) -> tuple[float, float]:
    """Token-weighted mean next-token loss over the eval set (every rank its part) and its perplexity."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in loader:
        ids = batch['input_ids'].to(device)
        loss = _lm_loss(engine(ids), ids)
        n = ids[:, 1:].numel()
        total += torch.tensor([loss.item() * n, n], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    engine.train()
    loss = (total[0] / total[1]).item()
    return loss, math.exp(min(loss, 80.0))


def _summary_config(plan: StepPlan, opts: DSOptions) -> dict:
    """The run's settings for the summary (JSON-ready; the DeepSpeed JSON itself is left out)."""
    values = {**dataclasses.asdict(plan), **dataclasses.asdict(opts)}
    values.pop('deepspeed_config')
    return json.loads(json.dumps(values, default=str))


def _write_summary(out: dict, path: str | None, rank: int) -> None:
    if path and ('{rank}' in path or rank == 0):
        path = path.format(rank=rank)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, 'w') as f:
            json.dump(out, f, indent=1)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """The CLI (`prores_algo.training.deepspeed.cli`): a user's mistake is one line on stderr and exit status 2."""
    try:
        config, options = parse(argv)
        summary = train(config, options)
    except ConfigError as e:  # as prores-train reports it
        return report(e)
    finally:
        if torch.distributed.is_initialized():
            with contextlib.suppress(Exception):
                torch.distributed.destroy_process_group()
    if summary['rank'] == 0 and summary['final_eval_loss'] is not None:
        print(
            f'final eval loss {summary["final_eval_loss"]:.4f} perplexity {summary["final_perplexity"]:.3f}', flush=True
        )
    return 0


if __name__ == '__main__':
    sys.exit(main())
