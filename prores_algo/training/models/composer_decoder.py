"""Composer wrapper around the reference `Decoder`.

Batch: a dict with 'input_ids' LongTensor (B, S) and optionally 'labels' (B, S) (default: input_ids;
-100 marks positions to ignore). The loss is next-token cross entropy: logits at position i predict
labels at i + 1, as in Composer's `HuggingFaceModel(shift_labels=True)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel
from torchmetrics import Metric

from prores_algo.training.models.decoder import Decoder, DecoderConfig

__all__ = ['ComposerDecoder', 'IGNORE_INDEX']

IGNORE_INDEX = -100


def shifted_targets(batch: Mapping[str, Any]) -> torch.Tensor:
    """Targets aligned with the logits: targets[:, i] = labels[:, i + 1], last position ignored.

    Keeping the full (B, S) shape (instead of slicing the logits to S - 1) avoids copying the large
    logits tensor; the ignored last column drops out of the mean.
    """
    labels = batch.get('labels')
    if labels is None:
        labels = batch['input_ids']
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat((labels[:, 1:], pad), dim=1)


class ComposerDecoder(ComposerModel):
    """`ComposerModel` holding `self.model = Decoder(config)`."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        # Separate instances for train and eval (Composer deep-copies them per dataloader anyway).
        self.train_metrics = {
            'LanguageCrossEntropy': LanguageCrossEntropy(),
            'LanguagePerplexity': LanguagePerplexity(),
        }
        self.val_metrics = {'LanguageCrossEntropy': LanguageCrossEntropy(), 'LanguagePerplexity': LanguagePerplexity()}

    @classmethod
    def from_kwargs(cls, **kwargs) -> ComposerDecoder:
        return cls(DecoderConfig(**kwargs))

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return self.model(batch['input_ids'])

    def loss(self, outputs: torch.Tensor, batch: Mapping[str, Any], *args, **kwargs) -> torch.Tensor:
        targets = shifted_targets(batch)
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)

    def eval_forward(self, batch: Mapping[str, Any], outputs: Any | None = None) -> torch.Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return self.train_metrics if is_train else self.val_metrics

    def update_metric(self, batch: Mapping[str, Any], outputs: torch.Tensor, metric: Metric) -> None:
        # Flattened (B*S, V) logits and (B*S,) shifted targets, as Composer's HuggingFaceModel feeds
        # LanguageCrossEntropy; the metric ignores IGNORE_INDEX itself.
        targets = shifted_targets(batch).to(outputs.device)
        metric.update(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))

    def flops_per_batch(self, batch: Mapping[str, Any]) -> int:
        """Training FLOPs of one batch for Composer's SpeedMonitor (MFU); see `Decoder.flops_per_token`."""
        bs, seq_len = batch['input_ids'].shape[:2]
        return self.model.flops_per_token(seq_len) * bs * seq_len

    def param_groups(self, weight_decay: float) -> list[dict]:
        return self.model.param_groups(weight_decay)
