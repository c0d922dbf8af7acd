"""`prores-data` (also `python -m prores_algo.training.data`): convert a text source into packed-token MDS shards."""

from __future__ import annotations

import argparse
import sys

from prores_algo.command_line import CommandParser
from prores_algo.training.data.sources import _SOURCE_HELP
from prores_algo.training.data.writer import write_mds


def _whole_number(text: str) -> int:
    """argparse type: a whole number, also in scientific notation ('2e9'); its range is checked by write_mds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number: use e.g. 2000000 or 2e6') from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f'{text!r} must be a whole number, e.g. 2000000 or 2e6')
    return int(value)


def main(argv: list[str] | None = None) -> int:
    """`prores-data`: convert a text source into packed-token MDS shards (train/val). Returns the exit code."""
    parser = CommandParser(
        prog='prores-data',
        description='Tokenize a text source and write packed fixed-length samples as MDS shards '
        '(OUT/train, OUT/val, OUT/prores_data.json) for prores_algo training.',
    )
    parser.add_argument('--source', default='stdlib', help=f'text source: {_SOURCE_HELP} (default: stdlib)')
    parser.add_argument(
        '--out',
        required=True,
        help='output folder (created atomically), or an object-store URL such as s3://bucket/prefix '
        '(uploaded through streaming; S3_ENDPOINT_URL selects an S3-compatible endpoint)',
    )
    parser.add_argument(
        '--keep_local',
        default=None,
        metavar='DIR',
        help='with a URL --out: also keep a complete local copy in DIR (default: none)',
    )
    parser.add_argument(
        '--tokenizer', default='byte', help="'byte' (default, no files needed), a local tokenizer folder or a HF hub id"
    )
    parser.add_argument('--seq_len', type=int, default=128, help='tokens per sample (default: 128)')
    parser.add_argument(
        '--val_fraction',
        type=float,
        default=0.05,
        help='fraction of documents for the val split; 0: no val split (default: 0.05)',
    )
    parser.add_argument(
        '--max_tokens',
        type=_whole_number,
        default=None,
        help='stop after this many tokens (default: all); 2e9 and 2000000000 both work',
    )
    parser.add_argument('--max_bytes', type=int, default=None, help='stop after this much text (default: all)')
    parser.add_argument('--compression', default=None, help='MDS shard compression, e.g. zstd (default: none)')
    parser.add_argument('--seed', type=int, default=0, help='train/val split seed (default: 0)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing dataset at --out')
    parser.add_argument('--no_progress', action='store_true', help='hide the progress bar')
    args = parser.parse_args(argv)
    try:
        meta = write_mds(
            args.source,
            args.out,
            tokenizer=args.tokenizer,
            seq_len=args.seq_len,
            val_fraction=args.val_fraction,
            max_tokens=args.max_tokens,
            compression=args.compression,
            seed=args.seed,
            max_bytes=args.max_bytes,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            keep_local=args.keep_local,
        )
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))  # exits 2 with the message, no traceback
    parts = ', '.join(
        f'{s} {v["samples"]} samples ({v["tokens"]} tokens, {v["documents"]} docs)' for s, v in meta['splits'].items()
    )
    version = f' (version {meta["version"]})' if meta.get('version') else ''
    print(
        f'prores-data: wrote {args.out}{version}: {parts}; seq_len={meta["seq_len"]} tokenizer={meta["tokenizer"]} '
        f'vocab_size={meta["vocab_size"]}'
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
