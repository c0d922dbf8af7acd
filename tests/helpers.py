"""Small shared builders for tests: tiny models and synthetic token loaders (real data is tested in test_data)."""

import torch
from torch.utils.data import DataLoader, Dataset

from prores_algo.models.decoder import DecoderConfig


class RandomTokens(Dataset):
    """Deterministic random token sequences: sample i is the same in every run."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (n, seq_len), generator=g)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {'input_ids': self.data[i]}


def token_loader(n=64, seq_len=16, vocab=64, batch_size=4, seed=0):
    from composer.core import DataSpec
    loader = DataLoader(RandomTokens(n, seq_len, vocab, seed), batch_size=batch_size, shuffle=False)
    return DataSpec(loader, get_num_tokens_in_batch=lambda b: int(b['input_ids'].numel()))


def tiny_config(**kw):
    cfg = dict(vocab_size=64, d_model=32, n_layers=4, n_heads=4, max_seq_len=16, norm='pre')
    cfg.update(kw)
    return DecoderConfig(**cfg)


def tiny_composer_model(seed=0, **kw):
    from prores_algo.models.composer_decoder import ComposerDecoder
    torch.manual_seed(seed)
    return ComposerDecoder(tiny_config(**kw))


def alpha_buffers(model):
    """Current α of every hooked branch module, grouped by module path."""
    return {name.rsplit('.', 1)[0]: float(buf) for name, buf in model.named_buffers() if name.endswith('prores_alpha')}


def set_alphas(controller, alphas):
    """Write α per layer straight into every branch's buffer, bypassing the schedule; returns the list."""
    from prores_algo.surgery import ALPHA_BUFFER, resolve_branch
    alphas = list(alphas)
    for layer, a in zip(controller.layers, alphas):
        for name in layer.branches:
            resolve_branch(layer.module, name)._buffers[ALPHA_BUFFER].fill_(a)
    return alphas


def set_random_alphas(controller, seed=1):
    """A different α in [0.05, 0.95) per layer, so a per-layer comparison catches a mix-up of layers."""
    g = torch.Generator().manual_seed(seed)
    return set_alphas(controller, (0.05 + 0.9 * torch.rand(controller.num_layers, generator=g)).tolist())
