"""A thin DeepSpeed training loop for the reference decoder with ProRes (ZeRO-3 ready).

    torchrun --nproc_per_node 2 -m prores_algo.ds_train --deepspeed_config yamls/deepspeed/zero3.json \
        --steps 200 --t_warmup 100 --summary out/summary.json
    deepspeed --num_gpus 2 --module prores_algo.ds_train --deepspeed_config ...   (or `composer -n 2 -m ...`)

Every launcher sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain `python -m
prores_algo.ds_train` runs one process. Backend: gloo on CPU, nccl on CUDA.

What the loop does (DeepSpeed does the rest from its JSON: ZeRO partitioning, gradient accumulation,
clipping, bf16):
  * builds `prores_algo.models.decoder.Decoder` (under `deepspeed.zero.Init` for stage 3 unless
    `zero_init=False`) with the same seed on every rank, then `attach_prores`;
  * torch AdamW (β = (0.9, 0.95), weight decay on Linear weights only, as in the paper) unless the JSON
    has an "optimizer" block; the LR schedule is a `LambdaLR` from `lr_lambda_from` (WSD by default);
  * data: a synthetic deterministic token dataset (learnable arithmetic sequences) split over ranks by
    a `DistributedSampler`, or MDS shards (`--data`, via `prores_algo.data.build_dataloader`, which
    partitions over ranks itself);
  * each optimizer step t: `prores.step(engine)` (α(t) from engine.global_steps) before every
    micro-batch forward, `engine.backward`, `engine.step`;
  * checkpoints through `save_checkpoint` / `load_checkpoint` (ProRes configuration guarded); on resume
    the data position is restored by skipping the micro-batches already consumed.

`train(cfg) -> dict` is the entry point for code (the YAML path); `main()` parses the CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import sys
import time
import zlib
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from prores_algo import schedules
from prores_algo.integrations.deepspeed import (attach_prores, check_checkpoint, check_deepspeed_config,
                                                load_checkpoint, lr_scheduler_factory, save_checkpoint)
from prores_algo.models.decoder import Decoder, DecoderConfig, RotaryEmbedding, default_deepnet_init
from prores_algo.surgery import ALPHA_BUFFER

__all__ = ['DEFAULTS', 'train', 'main', 'SyntheticTokens', 'build_model']

DEFAULTS: dict[str, Any] = {
    'deepspeed_config': 'yamls/deepspeed/zero3.json',  # path or dict
    # model
    'n_layers': 4, 'd_model': 64, 'n_heads': 4, 'seq_len': 64, 'vocab': 256, 'norm': 'pre',
    'd_ffn': None,  # None: DecoderConfig's default (SwiGLU 8/3 x d_model, rounded); the paper's 1.3B sets 5632
    'final_norm': True, 'deepnet_init': None,  # None: the official rule, default_deepnet_init(prores on)
    # optimisation
    'steps': 20, 'lr': None, 'weight_decay': 0.1, 'betas': (0.9, 0.95),
    'lr_schedule': 'wsd', 'lr_warmup': '0.02dur', 'lr_decay': '0.1dur', 'alpha_f': 0.0, 'lr_warmup_delay': 0,
    # batch (None: take it from the DeepSpeed JSON; a value must agree with it)
    'micro_batch_size': None, 'grad_accum': None,
    # ProRes
    'prores': True, 'schedule': 'linear', 't_warmup': None,
    # ZeRO
    'require_stage3': False, 'zero_init': True,
    # data
    'data': None, 'local_cache': None, 'num_samples': None, 'eval_samples': 64, 'seed': 0,
    # loop
    'eval_every': 0, 'save_dir': None, 'save_interval': 0, 'load_dir': None, 'load_tag': None,
    'summary': None, 'log_every': 1, 'verbose': False,
    # the summary lists, per step, a CRC-32 of every sample this rank trained on (checks data partitioning)
    'record_samples': False,
    # set by cfg_from_yaml: the YAML's global batch (checked against the JSON) and the shards to build
    'global_train_batch_size': None, '_data_build': None,
    # resume from save_dir's `latest` checkpoint if there is one (the same command restarts a killed run)
    'autoresume': False,
}

_DEFAULT_LR = 1e-3


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------
class SyntheticTokens(Dataset):
    """Deterministic, learnable token sequences: x_i = (start + stride·i) mod vocab, stride in 1..4.

    Sample k is the same in every run and on every rank (a function of seed and k only).
    """

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 5, (n, 1), generator=g)
        self.data = (start + stride * torch.arange(seq_len)) % vocab

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {'input_ids': self.data[i]}


def _synthetic_loader(n: int, cfg: dict, micro: int, rank: int, world: int, seed: int, shuffle: bool):
    dataset = SyntheticTokens(n, cfg['seq_len'], cfg['vocab'], seed)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=micro, sampler=sampler, drop_last=True)
    if len(loader) == 0:
        raise ValueError(f'{n} samples give no micro-batch of {micro} per rank on {world} ranks; raise num_samples')
    return loader, sampler


def _mds_loader(cfg: dict, split: str, micro: int, shuffle: bool):
    try:
        from prores_algo.data import build_dataloader
    except ImportError as e:
        raise ValueError(f'--data needs prores_algo.data.build_dataloader (and mosaicml-streaming): {e}') from e
    spec = build_dataloader(cfg['data'], split, micro, seq_len=cfg['seq_len'], shuffle=shuffle, seed=cfg['seed'],
                            vocab_size=cfg['vocab'], local_cache=cfg.get('local_cache'))
    return getattr(spec, 'dataloader', spec)


def _micro_batches(loader, sampler, start: int) -> Iterator[dict]:
    """Endless micro-batches starting at micro-batch `start` (epochs re-shuffled via set_epoch)."""
    per_epoch = len(loader)
    epoch, skip = divmod(start, per_epoch)
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        for batch in loader:
            if skip:
                skip -= 1
                continue
            yield batch
        epoch += 1


# ---------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------
def _prores_on(cfg: dict) -> bool:
    """ProRes is on unless `prores` is false or the schedule is none/off."""
    return bool(cfg['prores']) and cfg['schedule'] not in (None, 'none', 'off')


def build_model(cfg: dict, ds_config: Optional[dict] = None, zero_init: bool = False) -> Decoder:
    """The reference decoder, seeded with cfg['seed']; under `deepspeed.zero.Init` if `zero_init`.

    `Decoder.__init__` initialises its weights after its children are built; under zero.Init those
    are already partitioned (0 elements here), so the initialisation is redone module by module with
    the parameters gathered. The random draws happen in the same order as without zero.Init, so both
    builds give the same weights.
    """
    prores_on = _prores_on(cfg)
    deepnet_init = cfg.get('deepnet_init')
    dc = DecoderConfig(vocab_size=cfg['vocab'], d_model=cfg['d_model'], n_layers=cfg['n_layers'],
                       n_heads=cfg['n_heads'], max_seq_len=cfg['seq_len'], norm=cfg['norm'], d_ffn=cfg.get('d_ffn'),
                       final_norm=cfg.get('final_norm', True),
                       deepnet_init=default_deepnet_init(prores_on) if deepnet_init is None else deepnet_init)
    torch.manual_seed(cfg['seed'])
    if not zero_init:
        return Decoder(dc)
    import deepspeed
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = Decoder(dc)
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if params:
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                model.param_init_fn(module)
        elif isinstance(module, RotaryEmbedding):
            model.param_init_fn(module)
    return model


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
# distributed setup
# ---------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _init_distributed() -> tuple[int, int]:
    import deepspeed
    if 'WORLD_SIZE' not in os.environ:  # plain `python -m prores_algo.ds_train`: one process
        os.environ.update(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0')
        os.environ.setdefault('MASTER_ADDR', '127.0.0.1')
        os.environ.setdefault('MASTER_PORT', str(_free_port()))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend='nccl' if torch.cuda.is_available() else 'gloo',
                                   auto_mpi_discovery=False, verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _load_ds_config(value) -> dict:
    if isinstance(value, dict):
        return value
    if not isinstance(value, (str, os.PathLike)) or not os.path.isfile(value):
        raise ValueError(f'deepspeed_config must be a dict or the path of a DeepSpeed JSON file, got {value!r}')
    with open(value) as f:
        return json.load(f)


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


# ---------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------
def train(cfg: dict) -> dict:
    """Train; returns a summary dict (identical keys on every rank; rank-local `partition` stats).

    Per optimizer step i (`steps[i]` = engine.global_steps during its forward = t): `losses[i]` (mean
    over micro-batches and ranks), `lrs[i]` (the LR used), `alphas[i]` (α per layer used, equal to
    `schedules.alphas(schedule, n_layers, t, t_warmup)`), and `eval` entries {step, loss, perplexity}.
    """
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f'unknown ds_train option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}')
    cfg = {**DEFAULTS, **cfg}
    import deepspeed
    if not cfg['verbose']:
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)
    t_start = time.time()
    # Every configuration check runs before the process group exists: a bad config fails fast on every
    # rank with the same message instead of hanging in a collective.
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else \
        int(os.environ.get('WORLD_SIZE', '1'))
    raw = _load_ds_config(cfg['deepspeed_config'])
    ds_config = check_deepspeed_config(raw, train_micro_batch_size_per_gpu=cfg['micro_batch_size'],
                                       gradient_accumulation_steps=cfg['grad_accum'], world_size=world,
                                       require_stage3=cfg['require_stage3'])
    if 'scheduler' in ds_config:
        raise ValueError('DeepSpeed config `scheduler` is set, but this loop builds the LR schedule itself '
                         '(lr_schedule / lr_warmup / lr_decay / lr_warmup_delay): remove "scheduler" from the JSON.')
    json_opt = ds_config.get('optimizer')
    if json_opt is not None:
        json_lr = (json_opt.get('params') or {}).get('lr')
        if cfg['lr'] is not None and json_lr is not None and float(json_lr) != float(cfg['lr']):
            raise ValueError(f'DeepSpeed config `optimizer.params.lr` = {json_lr} but lr = {cfg["lr"]}: set one of '
                             'them (or make them equal).')
        lr = float(json_lr if json_lr is not None else cfg['lr'] or _DEFAULT_LR)
    else:
        lr = float(cfg['lr'] if cfg['lr'] is not None else _DEFAULT_LR)
    micro = ds_config.setdefault('train_micro_batch_size_per_gpu', 1)
    accum = ds_config.setdefault('gradient_accumulation_steps', 1)
    ds_config.setdefault('train_batch_size', micro * accum * world)
    if cfg['global_train_batch_size'] is not None and cfg['global_train_batch_size'] != ds_config['train_batch_size']:
        raise ValueError(
            f"the YAML's global_train_batch_size={cfg['global_train_batch_size']} conflicts with the DeepSpeed config "
            f"(train_micro_batch_size_per_gpu={micro} x gradient_accumulation_steps={accum} x {world} processes = "
            f"{ds_config['train_batch_size']}): make them agree in the JSON or the YAML")
    if cfg['_data_build'] is not None:  # shards from the YAML's data.source; file-locked, safe on every rank
        from prores_algo.data import ensure_dataset
        ensure_dataset(**cfg['_data_build'], progress=int(os.environ.get('RANK', '0')) == 0)
    stage = (ds_config.get('zero_optimization') or {}).get('stage', 0)
    steps = int(cfg['steps'])
    if steps < 1:
        raise ValueError(f'steps must be >= 1, got {steps}')
    lr_factory = lr_scheduler_factory(cfg['lr_schedule'], max_steps=steps, t_warmup=cfg['lr_warmup'],
                                      t_decay=cfg['lr_decay'], alpha_f=cfg['alpha_f'],
                                      lr_warmup_delay=cfg['lr_warmup_delay'])
    prores_on = _prores_on(cfg)
    if prores_on:  # unknown names fail here, before any process group
        expected = {'enabled': True, 'schedule': schedules.canonical_name(cfg['schedule']),
                    't_warmup': float(cfg['t_warmup'] if cfg['t_warmup'] is not None else 1000 * cfg['n_layers']),
                    'num_layers': cfg['n_layers'], 'time_unit': 'steps'}
    else:
        expected = {'enabled': False}
    if cfg['autoresume'] and not cfg['load_dir'] and cfg['save_dir'] and \
            os.path.exists(os.path.join(cfg['save_dir'], 'latest')):
        cfg['load_dir'] = cfg['save_dir']
    if cfg['load_dir']:  # refuse a resume under another ProRes configuration before building anything
        check_checkpoint(cfg['load_dir'], expected, cfg['load_tag'])

    rank, world = _init_distributed()
    device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0))) if torch.cuda.is_available() else \
        torch.device('cpu')

    zero_init = bool(cfg['zero_init']) and stage == 3
    model = build_model(cfg, ds_config, zero_init=zero_init)
    prores = attach_prores(model, cfg['schedule'], cfg['t_warmup']) if prores_on else None

    groups = model.param_groups(cfg['weight_decay'])
    if json_opt is None:
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg['betas']), eps=1e-8)
        init_kwargs = {'optimizer': optimizer}
    else:
        for g in groups:
            g['lr'] = lr
        init_kwargs = {'model_parameters': groups}
    engine, _, _, lr_scheduler = deepspeed.initialize(model=model, lr_scheduler=lr_factory, config=ds_config,
                                                      dist_init_required=False, **init_kwargs)
    partition_init = _partition_stats(engine)

    resumed_from = None
    if cfg['load_dir']:
        resumed_from, _ = load_checkpoint(engine, prores, cfg['load_dir'], tag=cfg['load_tag'])
    start = engine.global_steps

    if cfg['data']:
        train_loader, train_sampler = _mds_loader(cfg, 'train', micro, shuffle=True), None
        try:
            eval_loader = _mds_loader(cfg, 'val', micro, shuffle=False)
        except (FileNotFoundError, ValueError) as e:  # no val split, or too small for one batch per rank
            eval_loader = None
            if rank == 0:
                print(f'no evaluation: {e}', flush=True)
    else:
        n = cfg['num_samples'] or max(steps * micro * accum * world, micro * world)
        train_loader, train_sampler = _synthetic_loader(n, cfg, micro, rank, world, cfg['seed'], shuffle=True)
        eval_loader = _synthetic_loader(max(cfg['eval_samples'], micro * world), cfg, micro, rank, world,
                                        cfg['seed'] + 1_000_003, shuffle=False)[0] if cfg['eval_samples'] else None
    batches = _micro_batches(train_loader, train_sampler, start * accum)

    out: dict[str, Any] = {'steps': [], 'losses': [], 'lrs': [], 'alphas': [], 'eval': [], 'saved': []}
    if cfg['record_samples']:
        out['samples'] = []

    def do_eval(step):
        if eval_loader is not None:
            loss, ppl = _evaluate(engine, eval_loader, device)
            out['eval'].append({'step': step, 'loss': loss, 'perplexity': ppl})
            if rank == 0:
                print(f'eval step {step} loss {loss:.4f} perplexity {ppl:.3f}', flush=True)

    def do_save():
        tag = save_checkpoint(engine, prores, cfg['save_dir'], tag=f'global_step{engine.global_steps}')
        out['saved'].append(os.path.join(cfg['save_dir'], tag))

    while engine.global_steps < steps:
        t = engine.global_steps
        lr_now = float(engine.get_lr()[0])
        micro_losses, step_alphas, step_samples = [], None, []
        for _ in range(accum):
            ids = next(batches)['input_ids'].to(device)
            if cfg['record_samples']:
                step_samples += [zlib.crc32(row.numpy().tobytes()) for row in ids.cpu()]
            if prores is not None:
                alphas = prores.step(engine)
                if step_alphas is None:
                    step_alphas = alphas
                elif alphas != step_alphas:  # cannot happen: global_steps moves only at the boundary
                    raise RuntimeError(f'α changed inside optimizer step {t}')
            loss = _lm_loss(engine(ids), ids)
            engine.backward(loss)
            engine.step()
            micro_losses.append(loss.item())
        if engine.global_steps != t + 1:
            raise RuntimeError(f'engine.global_steps went {t} -> {engine.global_steps} in one step: '
                               'gradient_accumulation_steps disagrees with the loop')
        loss = _all_mean([sum(micro_losses) / len(micro_losses)], device)[0]
        alphas = step_alphas if step_alphas is not None else [1.0] * cfg['n_layers']
        out['steps'].append(t)
        if cfg['record_samples']:
            out['samples'].append(step_samples)
        out['losses'].append(loss)
        out['lrs'].append(lr_now)
        out['alphas'].append(list(alphas))
        if rank == 0 and cfg['log_every'] and ((t + 1) % cfg['log_every'] == 0 or t + 1 == steps):
            # one write per line: other ranks share this stdout, and under PYTHONUNBUFFERED print() would
            # issue the text and its newline as two writes that another rank's output can split
            sys.stdout.write(f'step {t + 1}/{steps} loss {loss:.4f} lr {lr_now:.4e} '
                             f'alpha_mean {sum(alphas) / len(alphas):.4f}\n')
            sys.stdout.flush()
        done = engine.global_steps
        if cfg['eval_every'] and done % cfg['eval_every'] == 0 and done < steps:
            do_eval(done)
        if cfg['save_dir'] and cfg['save_interval'] and done % cfg['save_interval'] == 0 and done < steps:
            do_save()

    do_eval(engine.global_steps)
    if cfg['save_dir']:
        do_save()
    last = out['eval'][-1] if out['eval'] else {}
    out.update({
        'final_eval_loss': last.get('loss'),
        'final_perplexity': last.get('perplexity'),
        'rank': rank,
        'world_size': world,
        'zero_stage': stage,
        'zero_init': zero_init,
        'micro_batch_size': micro,
        'grad_accum': accum,
        'train_batch_size': ds_config['train_batch_size'],
        'lr': lr,
        'prores': None if prores is None else prores.state(),
        'prores_removed': None if prores is None else prores.removed,
        'start_step': start,
        'resumed_from': resumed_from,
        'partition_init': partition_init,
        'partition_end': _partition_stats(engine),
        'alpha_buffers_end': {name: float(buf) for name, buf in engine.module.named_buffers()
                              if name.endswith(ALPHA_BUFFER)},
        'wall_s': time.time() - t_start,
        'config': {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k != 'deepspeed_config'},
    })
    path = cfg['summary']
    if path and ('{rank}' in path or rank == 0):
        path = path.format(rank=rank)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, 'w') as f:
            json.dump(out, f, indent=1)
    return out


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------
# the same YAMLs as the Composer entry
# ---------------------------------------------------------------------------------------------------
def _batches(value: str, steps: Optional[int], field: str) -> int | str:
    """'Nba' → N; 'Xdur' stays a fraction string for the LR helpers, or becomes X·steps when given."""
    text = str(value).strip()
    if text.endswith('dur'):
        return int(round(float(text[:-3]) * steps)) if steps is not None else text
    if text.endswith('ba'):
        return int(float(text[:-2]))
    if text.lstrip('+-').isdigit():
        return int(text)
    raise ValueError(f'{field}={value!r}: the DeepSpeed path counts optimizer steps; use "Nba" or a "dur" fraction')


def cfg_from_yaml(path: str, overrides: Optional[list[str]] = None, deepspeed_config: Any = None) -> dict:
    """Map a training YAML (model, data, optimizer, scheduler, ProRes) onto this loop's settings.

    The DeepSpeed JSON owns micro-batch size, gradient accumulation and clipping; the YAML's
    `global_train_batch_size` must agree with them (checked in `train` once the world size is known).
    """
    from prores_algo.config import ConfigError, load_config
    c = load_config(path, overrides)
    if c.model.name != 'reference':
        raise ConfigError(f'model.name={c.model.name!r}: the DeepSpeed loop trains the reference decoder; '
                          'use model.name=reference (HF models: the Hugging Face Trainer with deepspeed=)')
    m = c.model.kwargs
    defaults = {f.name: f.default for f in dataclasses.fields(DecoderConfig)}
    mapped = {'n_layers', 'd_model', 'n_heads', 'vocab_size', 'norm', 'final_norm', 'deepnet_init', 'd_ffn',
              'max_seq_len'}
    dropped = sorted(k for k, v in m.items() if k not in mapped and (k not in defaults or v != defaults[k]))
    if dropped:  # never train a different model than the YAML describes
        raise ConfigError(f'model: the DeepSpeed loop does not take {dropped} (it maps {sorted(mapped)}); remove them '
                          'or leave them at their defaults')
    for key, value in (('save_folder', c.save_folder), ('load_path', c.load_path)):
        if value and '://' in value:
            raise ConfigError(f'{key}={value!r}: DeepSpeed reads and writes checkpoints as files; on several nodes '
                              'use a folder every node can reach (a shared filesystem), not an object-store URL')
    unknown_algos = set(c.algorithms) - {'prores', 'gradient_clipping'}
    if unknown_algos:
        raise ConfigError(f'algorithms: {sorted(unknown_algos)} are Composer algorithms; the DeepSpeed loop runs '
                          'only prores (clipping comes from the DeepSpeed JSON `gradient_clipping`)')
    steps = _batches(c.max_duration, None, 'max_duration')
    cfg = dict(DEFAULTS)
    cfg.update({
        'deepspeed_config': deepspeed_config or DEFAULTS['deepspeed_config'],
        'n_layers': m.get('n_layers'), 'd_model': m.get('d_model'), 'n_heads': m.get('n_heads'),
        'seq_len': c.data.seq_len, 'vocab': m.get('vocab_size'), 'norm': m.get('norm', 'pre'),
        'final_norm': m.get('final_norm', True), 'deepnet_init': m.get('deepnet_init'), 'd_ffn': m.get('d_ffn'),
        'steps': steps, 'lr': c.optimizer.lr, 'weight_decay': c.optimizer.weight_decay,
        'betas': tuple(c.optimizer.betas), 'seed': c.seed, 'data': c.data.path, 'local_cache': c.data.local_cache,
        'global_train_batch_size': c.global_train_batch_size,
        'save_dir': c.save_folder, 'save_interval': _batches(c.save_interval, steps, 'save_interval'),
        'eval_every': _batches(c.eval_interval, steps, 'eval_interval'),
        'load_dir': c.load_path, 'autoresume': c.autoresume,
        '_data_build': None if c.data.source is None or '://' in c.data.path else dict(
            source=c.data.source, out_dir=c.data.path, tokenizer=c.tokenizer, seq_len=c.data.seq_len,
            val_fraction=c.data.val_fraction, max_tokens=c.data.max_tokens, seed=c.seed, max_bytes=c.data.max_bytes),
    })
    if c.scheduler is not None:
        kw = c.scheduler.kwargs
        cfg.update({'lr_schedule': c.scheduler.name, 'lr_warmup': kw.get('t_warmup', DEFAULTS['lr_warmup']),
                    'lr_decay': kw.get('t_decay', DEFAULTS['lr_decay']), 'alpha_f': kw.get('alpha_f', 0.0)})
    else:
        cfg.update({'lr_schedule': 'constant', 'lr_warmup': 0})
    prores = c.algorithms.get('prores')
    if prores is None:
        cfg['prores'] = False
    else:
        prores = dict(prores or {})
        cfg['schedule'] = prores.get('schedule', 'linear')
        if prores.get('t_warmup') is not None:
            cfg['t_warmup'] = _batches(prores['t_warmup'], steps, 'algorithms.prores.t_warmup')
        cfg['lr_warmup_delay'] = _batches(prores.get('lr_warmup_delay', 0), steps, 'algorithms.prores.lr_warmup_delay')
    return cfg


def _time_arg(value: str):
    return int(value) if value.lstrip('+-').isdigit() else value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m prores_algo.ds_train',
                                description='Thin DeepSpeed (ZeRO-3 ready) training loop: reference decoder + ProRes.')
    d = DEFAULTS
    p.add_argument('--deepspeed_config', default=d['deepspeed_config'], help='DeepSpeed JSON (default: %(default)s)')
    p.add_argument('--local_rank', type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument('--config', default=None, help='a training YAML (as for prores-train); key=value overrides may '
                   'follow; model/data/optimizer/scheduler/ProRes then come from it')
    p.add_argument('overrides', nargs='*', help='key=value overrides of --config')  # passed by the deepspeed launcher
    g = p.add_argument_group('model')
    for k in ('n_layers', 'd_model', 'n_heads', 'seq_len', 'vocab'):
        g.add_argument(f'--{k}', type=int, default=d[k])
    g.add_argument('--d_ffn', type=int, default=d['d_ffn'], help='FFN width (default: 8/3 x d_model, rounded)')
    g.add_argument('--norm', default=d['norm'], choices=('pre', 'post', 'sandwich', 'deepnorm', 'lns'))
    g = p.add_argument_group('optimisation')
    g.add_argument('--steps', type=int, default=d['steps'], help='total optimizer steps (max duration)')
    g.add_argument('--lr', type=float, default=d['lr'], 
                   help=f'peak LR (default {_DEFAULT_LR}, or the JSON optimizer lr)')
    g.add_argument('--weight_decay', type=float, default=d['weight_decay'])
    g.add_argument('--lr_schedule', default=d['lr_schedule'], help='wsd | linear | cosine | constant')
    g.add_argument('--lr_warmup', type=_time_arg, default=d['lr_warmup'], help='steps, "Nba" or "Xdur"')
    g.add_argument('--lr_decay', type=_time_arg, default=d['lr_decay'], help='WSD decay length')
    g.add_argument('--alpha_f', type=float, default=d['alpha_f'])
    g.add_argument('--lr_warmup_delay', type=_time_arg, default=d['lr_warmup_delay'])
    g.add_argument('--micro_batch_size', type=int, default=d['micro_batch_size'],
                   help='must agree with the JSON train_micro_batch_size_per_gpu (fills it if absent/"auto")')
    g.add_argument('--grad_accum', type=int, default=d['grad_accum'],
                   help='must agree with the JSON gradient_accumulation_steps (fills it if absent/"auto")')
    g = p.add_argument_group('ProRes')
    g.add_argument('--schedule', default=d['schedule'], help="ProRes schedule, or 'none' for a baseline")
    g.add_argument('--t_warmup', type=float, default=d['t_warmup'], 
                   help='W in optimizer steps (default 1000 x n_layers)')
    g.add_argument('--no_prores', dest='prores', action='store_false')
    g = p.add_argument_group('ZeRO')
    g.add_argument('--require_stage3', action='store_true')
    g.add_argument('--no_zero_init', dest='zero_init', action='store_false',
                   help='do not build the model under deepspeed.zero.Init')
    g = p.add_argument_group('data and loop')
    g.add_argument('--data', default=None, help='folder/URL of MDS shards (prores_algo.data); default: synthetic')
    g.add_argument('--local_cache', default=None,
                   help='with a URL --data: where this node caches the shards (default: a folder under the temp dir)')
    g.add_argument('--num_samples', type=int, default=None, help='synthetic train samples (default: one epoch)')
    g.add_argument('--eval_samples', type=int, default=d['eval_samples'])
    g.add_argument('--seed', type=int, default=d['seed'])
    g.add_argument('--eval_every', type=int, default=d['eval_every'], help='0: only at the end')
    g.add_argument('--save_dir', default=None)
    g.add_argument('--save_interval', type=int, default=d['save_interval'], help='0: only at the end')
    g.add_argument('--load_dir', default=None)
    g.add_argument('--load_tag', default=None)
    g.add_argument('--autoresume', action='store_true',
                   help="resume from --save_dir's latest checkpoint when there is one (restart a killed run as is)")
    g.add_argument('--summary', default=None, help="JSON summary path (rank 0; '{rank}' in it: every rank)")
    g.add_argument('--log_every', type=int, default=d['log_every'])
    g.add_argument('--record_samples', action='store_true',
                   help='the summary lists a CRC-32 of every sample each rank trained on, per step')
    g.add_argument('--verbose', action='store_true', help='keep DeepSpeed INFO logs')
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = vars(_parser().parse_args(argv))
    args.pop('local_rank', None)
    config, overrides = args.pop('config'), args.pop('overrides')
    if config is not None:
        loop_keys = {k: args[k] for k in ('summary', 'log_every', 'verbose', 'require_stage3', 'zero_init', 'load_tag',
                                          'record_samples')}
        if args['autoresume']:  # else the YAML's autoresume
            loop_keys['autoresume'] = True
        for key in ('local_cache', 'micro_batch_size', 'grad_accum'):  # given: they win over the YAML / JSON "auto"
            if args[key] is not None:
                loop_keys[key] = args[key]
        args = {**cfg_from_yaml(config, overrides, args['deepspeed_config']), **loop_keys}
    elif overrides:
        raise SystemExit(f'key=value overrides {overrides} need --config YAML')
    try:
        summary = train(args)
    finally:
        if torch.distributed.is_initialized():
            with contextlib.suppress(Exception):
                torch.distributed.destroy_process_group()
    if summary['rank'] == 0 and summary['final_eval_loss'] is not None:
        print(f"final eval loss {summary['final_eval_loss']:.4f} perplexity {summary['final_perplexity']:.3f}",
              flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
