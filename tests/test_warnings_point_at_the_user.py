"""A warning names the user's line, not a line of prores_algo or of the framework that called it."""

import warnings

from composer import Trainer

from prores_algo import ProRes, apply_prores
from tests.support.helpers import tiny_composer_model, tiny_decoder, token_loader


def _short_warmup_warnings(caught):
    return [w for w in caught if 'steps of alpha warmup per layer' in str(w.message)]


def test_short_warmup_from_apply_prores_names_this_file():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        apply_prores(tiny_decoder(), 'linear', 40)  # 10 steps per layer: the short-warmup warning
    (w,) = _short_warmup_warnings(caught)
    assert w.filename == __file__


def test_short_warmup_at_a_composer_event_names_the_fit_call():
    trainer = Trainer(
        model=tiny_composer_model(), train_dataloader=token_loader(), max_duration='2ba',
        algorithms=[ProRes(t_warmup='40ba')], device='cpu', progress_bar=False, log_to_console=False,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        trainer.fit()
    (w,) = _short_warmup_warnings(caught)
    assert w.filename == __file__
