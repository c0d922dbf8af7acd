"""Warnings that point at the user's line: the first frame outside prores_algo and the training
frameworks that call it (Composer's event loop, transformers' Trainer, DeepSpeed, torch), so a warning
raised at a Composer event names the user's `trainer.fit()`, not a line of this package."""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ['warn_user']

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_LIBRARIES = tuple(
    f'{os.sep}{name}{os.sep}' for name in ('composer', 'transformers', 'deepspeed', 'torch', 'streaming', 'accelerate')
)


def _is_library(filename: str) -> bool:
    if filename.startswith(_PACKAGE) or filename.startswith('<frozen'):
        return True
    return 'site-packages' in filename and any(lib in filename for lib in _LIBRARIES)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn` with the stack level of the first caller outside this package and the frameworks
    (the caller of `warn_user` when every frame is library code, as under a console script)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and _is_library(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 2)
