"""Small shared builders for tests: tiny models and synthetic token loaders (real data is tested in test_data)."""

import os
import socket
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from prores_algo.training.models.decoder import DecoderConfig


class RandomTokens(Dataset):
    """Deterministic random token sequences: sample i is the same in every run. `labels=True` adds the
    `labels` a transformers model computes its loss from (the inputs themselves)."""

    def __init__(self, n: int = 48, seq_len: int = 8, vocab: int = 64, seed: int = 0, labels: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (n, seq_len), generator=g)
        self.labels = labels

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {'input_ids': self.data[i], 'labels': self.data[i]} if self.labels else {'input_ids': self.data[i]}


def token_loader(n=64, seq_len=16, vocab=64, batch_size=4, seed=0):
    from composer.core import DataSpec

    loader = DataLoader(RandomTokens(n, seq_len, vocab, seed), batch_size=batch_size, shuffle=False)
    return DataSpec(loader, get_num_tokens_in_batch=lambda b: int(b['input_ids'].numel()))


# What a launcher (torchrun, `composer -n`, deepspeed) sets in its workers' environment (BASE_RANK and
# LOCAL_SIZE are Composer's). A test that starts its own job, or must look like a single process nobody
# launched, takes these out.
DIST_ENV = (
    'RANK',
    'WORLD_SIZE',
    'LOCAL_RANK',
    'LOCAL_WORLD_SIZE',
    'MASTER_ADDR',
    'MASTER_PORT',
    'GROUP_RANK',
    'NODE_RANK',
    'BASE_RANK',
    'TORCHELASTIC_RUN_ID',
    'LOCAL_SIZE',
)


def env_without_dist(env=None) -> dict:
    """A copy of `env` (default: os.environ) without the launcher variables in DIST_ENV."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k not in DIST_ENV}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a test's own rendezvous / server)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def tiny_config(**kw):
    cfg = dict(vocab_size=64, d_model=32, n_layers=4, n_heads=4, max_seq_len=16, norm='pre')
    cfg.update(kw)
    return DecoderConfig(**cfg)


def tiny_decoder(seed=0, **kw):
    from prores_algo.training.models.decoder import Decoder

    torch.manual_seed(seed)
    return Decoder(tiny_config(**kw))


def tiny_composer_model(seed=0, **kw):
    from prores_algo.training.models.composer_decoder import ComposerDecoder

    torch.manual_seed(seed)
    return ComposerDecoder(tiny_config(**kw))


def alpha_buffers(model):
    """Current α of every hooked branch module, grouped by module path (the inert 1.0 buffers that a
    removal leaves behind, which no hook reads, are not α any more and are left out)."""
    from prores_algo.surgery import ALPHA_BUFFER, has_prores_hook

    return {
        path: float(m._buffers[ALPHA_BUFFER])
        for path, m in model.named_modules()
        if ALPHA_BUFFER in m._buffers and has_prores_hook(m)
    }


def assert_prores_removed(model):
    """What ProRes leaves once removed or folded: no hook of its own on any module; every α buffer left is
    an inert 0-dim 1.0 that nothing reads (kept so that a DDP / FSDP wrapper keeps finding the buffers it
    recorded); no α in `state_dict`. Returns how many α buffers are left."""
    from prores_algo.surgery import ALPHA_BUFFER, has_prores_hook

    assert not any(has_prores_hook(m) for m in model.modules()), 'ProRes hooks left behind'
    left = [b for n, b in model.named_buffers() if n.endswith(ALPHA_BUFFER)]
    assert all(b.dim() == 0 and float(b) == 1.0 for b in left), 'an α buffer left behind is not the inert 1.0'
    assert not any(k.endswith(ALPHA_BUFFER) for k in model.state_dict()), 'α must stay out of state_dict'
    return len(left)


def set_alphas(controller, alphas):
    """Set α per layer directly, bypassing the schedule (both mechanisms: buffer and GEMM scalar); returns the list."""
    return controller.set_alphas(alphas)


def set_random_alphas(controller, seed=1):
    """A different α in [0.05, 0.95) per layer, so a per-layer comparison catches a mix-up of layers."""
    g = torch.Generator().manual_seed(seed)
    return set_alphas(controller, (0.05 + 0.9 * torch.rand(controller.num_layers, generator=g)).tolist())


def composer_launch(nproc: int, log_dir, *target: str) -> list[str]:
    """The command `composer -n NPROC ... TARGET` (Composer's launcher, this environment's), on a free
    port, with each rank's stdout / stderr in LOG_DIR/stdout{rank}.txt and stderr{rank}.txt (the
    launcher itself streams rank 0 to its own stdout too). TARGET: a script and its arguments, or
    '-m', a module and its arguments."""
    return [
        str(Path(sys.executable).parent / 'composer'),
        '-n',
        str(nproc),
        '--master_port',
        str(free_port()),
        '--stdout',
        f'{log_dir}/stdout{{rank}}.txt',
        '--stderr',
        f'{log_dir}/stderr{{rank}}.txt',
        *target,
    ]
