"""Reference decoder models. Importing this package needs only torch; `ComposerDecoder` (which needs
Composer) is imported lazily on first access."""

from prores_algo.training.models.decoder import NORM_PLACEMENTS, Block, Decoder, DecoderConfig, build_decoder

__all__ = ['NORM_PLACEMENTS', 'Block', 'Decoder', 'DecoderConfig', 'build_decoder', 'ComposerDecoder']


def __getattr__(name: str):
    if name == 'ComposerDecoder':
        from prores_algo.training.models.composer_decoder import ComposerDecoder

        return ComposerDecoder
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
