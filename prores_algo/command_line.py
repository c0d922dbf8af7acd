"""What every prores-* command shares: one-line errors (exit 2, no usage block), `--version`, and one
spelling of each flag (underscores, as the YAML keys and DeepSpeed's own flags; `--seq-len` is read as
`--seq_len`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

__all__ = ['CommandParser']


class CommandParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from prores_algo import __version__

        self.add_argument('--version', action='version', version=f'%(prog)s (prores_algo) {__version__}')

    def error(self, message: str) -> NoReturn:
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):
        args = [self._one_spelling(a) for a in (sys.argv[1:] if args is None else args)]
        return super().parse_known_args(args, namespace)

    def _one_spelling(self, token: str) -> str:
        """`--seq-len` (or `--seq-len=128`) as `--seq_len` when only the underscore flag exists."""
        if not token.startswith('--') or '-' not in token[2:].split('=', 1)[0]:
            return token
        flag, sep, value = token.partition('=')
        if flag in self._option_string_actions:
            return token
        other = '--' + flag[2:].replace('-', '_')
        return other + sep + value if other in self._option_string_actions else token
