"""Run by tests under `torchrun --nproc_per_node 2`: builds the decoder under deepspeed.zero.Init for every
norm placement, ProRes on and off, and compares its gathered initial parameters bitwise with the same
seed's build without ZeRO-3.

usage: torchrun --nproc_per_node 2 tests/support/zero3_init_driver.py OUT.json ZERO3.json
Writes OUT.json with '{rank}' replaced: one record per case (norm, prores, the init kinds used, whether
zero.Init partitioned every parameter, and the names of the parameters that differ).
"""

import json
import sys

import torch

from prores_algo.integrations.deepspeed import apply_prores, check_deepspeed_config
from prores_algo.training.deepspeed.loop import build_model
from prores_algo.training.deepspeed.process_group import init_distributed
from prores_algo.training.deepspeed.settings import from_flat, resolve
from prores_algo.training.models.decoder import NORM_PLACEMENTS

TINY = {'n_layers': 2, 'd_model': 32, 'n_heads': 4, 'seq_len': 16, 'vocab_size': 64, 'steps': 4, 'seed': 7}


def gathered_state(model) -> dict[str, torch.Tensor]:
    import deepspeed

    out = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().clone()
    return out


def case(norm: str, prores: bool, ds_config: dict) -> dict:
    plan = resolve(from_flat({**TINY, 'norm': norm, 'prores': prores})[0])
    zero = build_model(plan, ds_config, zero_init=True)
    if plan.prores.enabled:  # as ds_train does (adds hooks and α buffers, no parameters)
        apply_prores(zero, plan.prores.schedule, plan.t_warmup)
    partitioned = all(hasattr(p, 'ds_id') and p.numel() == 0 for p in zero.parameters())
    got = gathered_state(zero)
    ref = dict(build_model(plan, zero_init=False).named_parameters())
    differ = sorted(n for n in ref if n not in got or not torch.equal(got[n], ref[n].detach()))
    differ += sorted(n for n in got if n not in ref)
    kinds = sorted({m._init_spec[0] for m in zero.modules() if hasattr(m, '_init_spec')})
    return {
        'norm': norm,
        'prores': prores,
        'kinds': kinds,
        'partitioned': partitioned,
        'num_params': len(ref),
        'differ': differ,
    }


def main():
    out, ds_json = sys.argv[1:]
    rank, world = init_distributed()
    with open(ds_json) as f:
        ds_config = check_deepspeed_config(json.load(f), world_size=world)
    records = [case(norm, prores, ds_config) for norm in NORM_PLACEMENTS for prores in (True, False)]
    with open(out.format(rank=rank), 'w') as f:
        json.dump({'rank': rank, 'world_size': world, 'cases': records}, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()
