"""Training entry: `python -m prores_algo.training.composer_train CONFIG.yaml [key=value ...]`.

Runs under the `composer` launcher (`composer -n N -m prores_algo.training.composer_train CONFIG.yaml`), torchrun, or
plain python; also installed as the console script `prores-train`. The YAML is validated by
`prores_algo.training.config`; this module only turns it into Composer objects and runs the Trainer.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from typing import Any

import torch

from prores_algo.training import recipe
from prores_algo.training.checkpoint_store import StoreError, check_composer_locations, save_overwrite
from prores_algo.training.composer_uploads import UploadFailed, stop_uploads, use_threads
from prores_algo.training.config import ConfigError, TrainConfig, check_kwargs, load_config, report

__all__ = ['main', 'build_trainer', 'build_model', 'named_class']
__all__ += ['ALGORITHMS', 'CALLBACKS', 'LOGGERS']


def _snake(name: str) -> str:
    name = re.sub(r'(?<=[a-z0-9])(?=[A-Z])', '_', name)
    return re.sub(r'(?<=[A-Z])(?=[A-Z][a-z])', '_', name).lower()


def _registry(module, base) -> dict[str, Any]:
    """snake_case name → class, for every public subclass of `base` in a Composer package."""
    out = {}
    for name in getattr(module, '__all__', []):
        obj = getattr(module, name, None)
        if isinstance(obj, type) and issubclass(obj, base) and obj is not base:
            out[_snake(name)] = obj
    return out


def _algorithms() -> dict[str, Any]:
    import composer.algorithms as algos
    from composer.core import Algorithm

    from prores_algo.integrations.composer import ProRes

    table = _registry(algos, Algorithm)
    table['low_precision_layernorm'] = algos.LowPrecisionLayerNorm  # Composer's own spelling
    table['prores'] = ProRes
    return table


def _callbacks() -> dict[str, Any]:
    import composer.callbacks as cbs
    from composer.core import Callback

    table = _registry(cbs, Callback)
    try:
        from prores_algo.integrations.composer import ResidualMonitor

        table['residual_monitor'] = ResidualMonitor
    except ImportError:  # pragma: no cover
        pass
    return table


def _loggers() -> dict[str, Any]:
    import composer.loggers as lg
    from composer.loggers import LoggerDestination

    table = _registry(lg, LoggerDestination)
    return {k.removesuffix('_logger') if k.endswith('_logger') else k: v for k, v in table.items()}


ALGORITHMS, CALLBACKS, LOGGERS = _algorithms, _callbacks, _loggers


def named_class(kind: str, table: dict[str, Any], name: str, kwargs: dict[str, Any]):
    """`table[name]` once the name and every key of `kwargs` are checked (ConfigError, 'did you mean');
    the DeepSpeed entry runs this check too."""
    if name not in table:
        from prores_algo.training.config import _suggest

        raise ConfigError(f"{kind}: unknown name '{name}'{_suggest(name, table)}; available: {sorted(table)}")
    check_kwargs(f'{kind}.{name}', table[name], kwargs)
    return table[name]


def _build_named(kind: str, table: dict[str, Any], spec: dict[str, dict[str, Any] | None]) -> list[Any]:
    objs = []
    for name, kwargs in spec.items():
        kwargs = dict(kwargs or {})
        cls = named_class(kind, table, name, kwargs)
        try:
            objs.append(cls(**kwargs))
        except (TypeError, ValueError) as e:
            raise ConfigError(f'{kind}.{name}: {e}') from None
    return objs


# --- models -------------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, tokenizer_vocab: int | None = None):
    """The ComposerModel named by `model.name`; checks vocab against the tokenizer and seq_len."""
    if cfg.model.name != 'reference':
        return _build_hf_causal_lm(cfg.model.kwargs, tokenizer_vocab, cfg.data.seq_len)
    from prores_algo.training.models.composer_decoder import ComposerDecoder

    dcfg = recipe.decoder_config(cfg)  # the model the DeepSpeed loop builds from the same YAML
    vocab = dcfg.vocab_size
    if tokenizer_vocab is not None and vocab < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary ({tokenizer_vocab} "
            f'ids, tokenizer {cfg.tokenizer!r}): set model.vocab_size >= {tokenizer_vocab}'
        )
    return ComposerDecoder(dcfg)


def _build_hf_causal_lm(kwargs: dict[str, Any], tokenizer_vocab: int | None, seq_len: int):
    """A transformers causal LM built from a config (no download), wrapped in Composer's HuggingFaceModel."""
    import transformers
    from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
    from composer.models import HuggingFaceModel

    kwargs = dict(kwargs)
    model_type = kwargs.pop('model_type', None)
    if not model_type:
        raise ConfigError("model (hf_causal_lm): set model_type, e.g. 'llama', 'qwen2', 'gpt2', 'mistral'")
    try:
        hf_cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    except ValueError as e:
        raise ConfigError(f'model.model_type={model_type!r}: {e}') from None
    unknown = [k for k in kwargs if k not in hf_cfg.to_dict()]
    if unknown:
        raise ConfigError(f'model (hf_causal_lm, {model_type}): unknown config key(s) {unknown}')
    vocab = getattr(hf_cfg, 'vocab_size', None)
    if tokenizer_vocab is not None and vocab is not None and vocab < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary ({tokenizer_vocab}): "
            f'set model.vocab_size >= {tokenizer_vocab}'
        )
    max_pos = getattr(hf_cfg, 'max_position_embeddings', None) or getattr(hf_cfg, 'n_positions', None)
    if max_pos is not None and seq_len > max_pos:
        raise ConfigError(f"data.seq_len={seq_len} exceeds the model's max_position_embeddings={max_pos}")
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    metrics = [LanguageCrossEntropy(), LanguagePerplexity()]

    class CausalLM(HuggingFaceModel):
        """HF causal LMs take the (shifted) loss from `labels`; our shards carry only `input_ids`."""

        def forward(self, batch):
            return super().forward(_with_labels(batch))

        def eval_forward(self, batch, outputs=None):
            return super().eval_forward(_with_labels(batch), outputs)

        def update_metric(self, batch, outputs, metric):
            return super().update_metric(_with_labels(batch), outputs, metric)

    return CausalLM(model, use_logits=True, metrics=metrics, eval_metrics=metrics, shift_labels=True)


def _with_labels(batch):
    if isinstance(batch, dict) and 'labels' not in batch:
        # a copy: HuggingFaceModel.eval_forward shifts labels in place
        batch = {**batch, 'labels': batch['input_ids'].clone()}
    return batch


def _build_optimizer(cfg: TrainConfig, model):
    o = recipe.optimizer(cfg)
    groups = recipe.param_groups(model, o.weight_decay)
    if o.name == 'adamw':
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    from composer.optim import DecoupledAdamW

    return DecoupledAdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


def _build_scheduler(cfg: TrainConfig):
    """The YAML's `scheduler:` as a Composer scheduler (None: a constant LR); one table of names and keys
    for both entries (`prores_algo.lr_schedules.LR_SCHEDULES`)."""
    from prores_algo.integrations.composer.lr import composer_scheduler

    schedule = recipe.lr_schedule(cfg)
    if schedule is None:
        return None
    try:
        return composer_scheduler(schedule.name, schedule.kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# --- data ---------------------------------------------------------------------------------------------


def _require(cfg: TrainConfig) -> None:
    """What the schema leaves optional for the DeepSpeed loop (its JSON's lr and batch, synthetic data)
    prores-train needs."""
    missing = [
        key
        for key, value in (
            ('data.path', cfg.data.path),
            ('optimizer.lr', cfg.optimizer.lr),
            ('global_train_batch_size', cfg.global_train_batch_size),
        )
        if value is None
    ]
    if missing:
        raise ConfigError('; '.join(f"missing required key '{key}'" for key in missing))


def _prepare_data(cfg: TrainConfig):
    """Build MDS shards from `data.source` if `data.path` holds none (local rank 0 builds, others wait)."""
    from composer.utils import dist

    from prores_algo.training.data import ensure_dataset

    d = cfg.data
    if recipe.is_url(d.path):
        return
    if dist.get_local_rank() == 0:
        build = recipe.dataset_build_args(cfg)
        if build is None:
            if not os.path.isdir(d.path):
                raise ConfigError(
                    f'data.path={d.path!r} does not exist and data.source is null: build shards with '
                    '`prores-data` or set data.source (e.g. stdlib, a folder of text, hf:allenai/c4:en)'
                )
        else:
            try:
                ensure_dataset(**build, progress=dist.get_global_rank() == 0)
            except (ValueError, FileNotFoundError) as e:  # the YAML's data settings: one line, as prores-ds-train
                raise ConfigError(f'data: {e}') from None
    dist.barrier()


def _loaders(cfg: TrainConfig, vocab_size: int | None):
    from composer.utils import dist

    from prores_algo.training.data import build_dataloader

    world = dist.get_world_size()
    if cfg.global_train_batch_size % world:
        raise ConfigError(
            f'global_train_batch_size={cfg.global_train_batch_size} is not divisible by the number of '
            f'processes ({world})'
        )
    per_device = cfg.global_train_batch_size // world
    common = dict(
        seq_len=cfg.data.seq_len,
        num_workers=cfg.data.num_workers,
        vocab_size=vocab_size,
        local_cache=cfg.data.local_cache,
        seed=cfg.seed,
    )
    train = build_dataloader(cfg.data.path, 'train', per_device, shuffle=cfg.data.shuffle, **common)
    val = build_dataloader(
        cfg.data.path, 'val', cfg.eval_batch_size or per_device, shuffle=False, drop_last=False, **common
    )
    return train, val


# --- the trainer ----------------------------------------------------------------------------------------


def build_trainer(cfg: TrainConfig, extra_callbacks: tuple = (), extra_loggers: tuple = ()):
    """Every object the YAML names, assembled into a Composer Trainer (data shards built if needed)."""
    from composer import Trainer
    from composer.core import Evaluator
    from composer.utils import dist, get_device, reproducibility

    from prores_algo.training.tokenizers import load_tokenizer

    _require(cfg)
    check_composer_locations(cfg.save_folder, cfg.load_path)  # the store answers before anything is built
    device = get_device(cfg.device)
    if not dist.is_initialized() and dist.get_world_size() > 1:
        dist.initialize_dist(device, timeout=cfg.dist_timeout)
    reproducibility.seed_all(cfg.seed)
    try:
        tokenizer = load_tokenizer(cfg.tokenizer)
    except ValueError as e:
        raise ConfigError(f'tokenizer: {e}') from None
    algorithms = _build_named('algorithms', _algorithms(), cfg.algorithms)
    callbacks = _build_named('callbacks', _callbacks(), cfg.callbacks) + list(extra_callbacks)
    loggers = _build_named('loggers', _loggers(), cfg.loggers) + list(extra_loggers)
    scheduler = _build_scheduler(cfg)
    parallelism = _parallelism(cfg.parallelism)  # checked before any data is built
    model = build_model(cfg, tokenizer.vocab_size)
    _prepare_data(cfg)
    train_loader, val_loader = _loaders(cfg, model.model.config.vocab_size)
    optimizer = _build_optimizer(cfg, model)
    trainer = Trainer(
        run_name=cfg.run_name,
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=Evaluator(label='val', dataloader=val_loader),
        max_duration=cfg.max_duration,
        optimizers=optimizer,
        schedulers=scheduler,
        algorithms=algorithms,
        callbacks=callbacks,
        loggers=loggers,
        precision=cfg.precision,
        device=device,
        device_train_microbatch_size=cfg.device_train_microbatch_size,
        eval_interval=cfg.eval_interval,
        eval_subset_num_batches=cfg.eval_subset_num_batches,
        save_folder=cfg.save_folder,
        save_interval=cfg.save_interval,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        save_overwrite=save_overwrite(cfg),
        autoresume=cfg.autoresume,
        load_path=cfg.load_path,
        load_weights_only=cfg.load_weights_only,
        seed=cfg.seed,
        progress_bar=cfg.progress_bar,
        log_to_console=not cfg.progress_bar,
        console_log_interval=cfg.console_log_interval,
        compile_config={} if cfg.compile else None,
        parallelism_config=parallelism,
        dist_timeout=cfg.dist_timeout,
    )
    use_threads(trainer, cfg.save_folder)  # a lost store is one line, its checkpoint kept (composer_uploads)
    return trainer


def _parallelism(spec: dict[str, Any] | None):
    """`parallelism: {fsdp: {...}}` is Composer's FSDP (v1, or v2 under FSDP_VERSION=2);
    `parallelism: {fsdp2: {...}}` asks for FSDP2 (fully_shard, runs on CPU too) without the env var."""
    if not spec:
        return None
    unknown = set(spec) - {'fsdp', 'fsdp2', 'tp'}
    if unknown or ('fsdp' in spec and 'fsdp2' in spec):
        raise ConfigError(f'parallelism: use one of fsdp (FSDP1 / FSDP_VERSION=2) or fsdp2, got keys {sorted(spec)}')
    if 'fsdp2' in spec:
        from composer.utils.parallelism import FSDP2Config

        kwargs = dict(spec['fsdp2'] or {})
        check_kwargs('parallelism.fsdp2', FSDP2Config, kwargs)
        return {'fsdp': FSDP2Config(**kwargs)}
    return spec


def _LastEval():
    """A callback recording the batch of the last evaluation (Composer evaluates at the end of fit when
    eval_interval divides the run)."""
    from composer.core import Callback

    class LastEval(Callback):
        batch = -1

        def eval_end(self, state, logger) -> None:
            self.batch = int(state.timestamp.batch)

    return LastEval()


def _val_loss(trainer) -> float:
    values = trainer.state.eval_metric_values
    return float(values['LanguageCrossEntropy'])


def run(cfg: TrainConfig, extra_callbacks: tuple = (), extra_loggers: tuple = ()) -> dict[str, float]:
    """Train as configured; returns {'val_loss_start', 'val_loss', 'val_ppl', 'wall_s'} (rank 0 prints them)."""
    t0 = time.time()
    last_eval = _LastEval()
    trainer = build_trainer(cfg, (*extra_callbacks, last_eval), extra_loggers)
    result: dict[str, float] = {}
    if cfg.eval_first and int(trainer.state.timestamp.batch) == 0:
        trainer.eval()
        result['val_loss_start'] = _val_loss(trainer)
        _say(f'[prores] validation loss before training: {result["val_loss_start"]:.4f}')
    try:
        trainer.fit()
    except UploadFailed:
        stop_uploads(trainer)
        raise
    if last_eval.batch != int(trainer.state.timestamp.batch):  # else fit ended on an evaluation: not twice
        trainer.eval()
    result['val_loss'] = _val_loss(trainer)
    result['val_ppl'] = math.exp(result['val_loss'])
    result['wall_s'] = time.time() - t0
    msg = (
        f'[prores] validation loss after {trainer.state.timestamp.batch.value} batches: {result["val_loss"]:.4f} '
        f'(perplexity {result["val_ppl"]:.2f}'
    )
    if 'val_loss_start' in result:
        msg += f', from {result["val_loss_start"]:.4f}'
    _say(msg + f') in {result["wall_s"]:.0f} s')
    trainer.close()
    return result


def _say(msg: str) -> None:
    from composer.utils import dist

    if dist.get_global_rank() == 0:
        print(msg, flush=True)


_USAGE = 'usage: prores-train CONFIG.yaml [key=value ...]   (e.g. prores-train yamls/quickstart.yaml max_duration=50ba)'


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == '--version':
        from prores_algo import __version__

        print(f'prores-train (prores_algo) {__version__}')
        return 0
    if not argv or argv[0] in ('-h', '--help'):
        print(_USAGE)
        if argv:
            from prores_algo.training.config import keys_help

            print(f'\n{__doc__.strip()}\n\n{keys_help()}')
        return 0 if argv else 2
    if argv[0].startswith('-'):
        return report(ConfigError(f'unknown option {argv[0]!r}: {_USAGE}'))
    try:
        cfg = load_config(argv[0], argv[1:])
        run(cfg)
    except (ConfigError, StoreError) as e:
        return report(e)
    return 0


if __name__ == '__main__':
    sys.exit(main())
