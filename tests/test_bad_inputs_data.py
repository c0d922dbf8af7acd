"""The bad-input matrix, the data command prores-data and the loader (missing files, empty corpus, seq_len larger than the
data, bad numbers, truncated / missing shards, a damaged index): one row per bad input, checked by
`tests.support.bad_inputs.run_case`."""

import pytest

from tests.support.bad_inputs import (
    Bad,
    cli,
    loader,
    no_dataset,
    run_case,
    then,
    truncate_shard,
    write,
)


def _data():
    out = no_dataset('out')
    return [
        # --- prores-data CLI (exits 2 with the message on stderr) -----------------------------------------
        Bad(
            'cli-missing-source',
            cli('--source', '{tmp}/missing', '--out', '{tmp}/out'),
            SystemExit,
            (r"`source` '.*missing' does not exist", r"Accepted: 'stdlib'"),
            out,
        ),
        Bad(
            'cli-empty-corpus',
            then(
                lambda c: (c.tmp / 'empty').mkdir(),
                write('empty/a.txt', ' \n'),
                cli('--source', '{tmp}/empty', '--out', '{tmp}/out'),
            ),
            SystemExit,
            (r'empty corpus: `source`', r'yielded no text', r'Accepted:'),
            out,
        ),
        Bad(
            'cli-seq-len-larger-than-data',
            then(
                write('small.txt', 'tiny corpus ' * 10),
                cli('--source', '{tmp}/small.txt', '--out', '{tmp}/out', '--seq_len', '4096', '--val_fraction', '0'),
            ),
            SystemExit,
            (r"split 'train' got 0 samples", r'Lower `seq_len`', r'raise `max_tokens`'),
            out,
        ),
        Bad(
            'cli-seq-len-not-int',
            cli('--out', '{tmp}/out', '--seq_len', 'abc'),
            SystemExit,
            (r'argument --seq_len: invalid int value', r"'abc'"),
            out,
        ),
        Bad(
            'cli-seq-len-too-small',
            cli('--out', '{tmp}/out', '--seq_len', '1'),
            SystemExit,
            (r'`seq_len` must be an int >= 2',),
            out,
        ),
        Bad(
            'cli-val-fraction',
            cli('--out', '{tmp}/out', '--val_fraction', '1'),
            SystemExit,
            (r'`val_fraction` must be in \[0, 1\)', r'0 writes no val split'),
            out,
        ),
        Bad(
            'cli-negative-max-tokens',
            cli('--out', '{tmp}/out', '--max_tokens', '-5'),
            SystemExit,
            (r'`max_tokens` must be a positive int or None', r'got -5'),
            out,
        ),
        Bad(
            'cli-unknown-compression',
            cli('--out', '{tmp}/out', '--compression', 'lzma9000'),
            SystemExit,
            (r"`compression` 'lzma9000' is not supported", r"'zstd'"),
            out,
        ),
        Bad(
            'cli-unsupported-suffix',
            then(write('x.csv', 'a,b\n'), cli('--source', '{tmp}/x.csv', '--out', '{tmp}/out')),
            SystemExit,
            (r'unsupported suffix', r"'\.csv'", r'\.txt'),
            out,
        ),
        # writing to s3:// works (tests/data/test_object_store.py); without a reachable store the error names the URL
        Bad(
            'cli-out-is-a-url',
            cli('--out', 's3://bucket/ds'),
            SystemExit,
            (r'cannot write the dataset to s3://bucket/ds', r'credentials|cannot be reached|does not exist'),
        ),
        Bad(
            'cli-out-holds-a-dataset',
            lambda c: cli('--out', str(c.data_copy()), '--max_tokens', '100')(c),
            SystemExit,
            (r'`out_dir` .* already holds a dataset', r'--overwrite'),
            lambda c: loader(lambda c: c.tmp / 'copy', seq_len=32)(c),
        ),  # the old one still loads
        # --- the loader: damaged or mismatched datasets --------------------------------------------------
        Bad(
            'loader-truncated-shard',
            loader(truncate_shard),
            ValueError,
            (
                r'shard .*train/shard\.00000\.mds.* has \d+ bytes but its index\.json lists \d+',
                r'truncated',
                r'prores-data --out .* --overwrite',
            ),
        ),
        Bad(
            'loader-missing-shard',
            loader(
                lambda c: then(
                    lambda c: c.data_copy(),
                    lambda c: (c.tmp / 'copy/val/shard.00000.mds').unlink(),
                    lambda c: c.tmp / 'copy',
                )(c),
                split='val',
            ),
            ValueError,
            (r"shard 'shard\.00000\.mds' listed in .* is missing", r'rebuild it'),
        ),
        Bad(
            'loader-damaged-index',
            loader(
                lambda c: then(
                    lambda c: c.data_copy(),
                    lambda c: (c.tmp / 'copy/train/index.json').write_text('{"shar'),
                    lambda c: c.tmp / 'copy',
                )(c)
            ),
            ValueError,
            (r'index\.json.* is not a valid MDS index', r'rebuild it'),
        ),
        Bad(
            'loader-seq-len-mismatch',
            loader(lambda c: c.data, seq_len=16),
            ValueError,
            (r'`seq_len` 16 does not match', r'set seq_len to 32'),
        ),
        Bad(
            'loader-vocab-too-small',
            loader(lambda c: c.data, vocab_size=100),
            ValueError,
            (r"model's `vocab_size` 100", r'Set vocab_size >= 257'),
        ),
        Bad(
            'loader-unknown-split',
            loader(lambda c: c.data, split='test'),
            FileNotFoundError,
            (r"split 'test' not found", r"splits present: \['train', 'val'\]"),
        ),
        Bad(
            'loader-missing-folder',
            loader(lambda c: c.tmp / 'nothing'),
            FileNotFoundError,
            (r"data path '.*nothing' is not a folder", r'prores-data --out'),
        ),
    ]


CASES = _data()


@pytest.mark.parametrize('case', CASES, ids=lambda c: c.id)
def test_bad_input(case, tmp_path, request, capsys, monkeypatch):
    run_case(case, tmp_path, request, capsys, monkeypatch)
