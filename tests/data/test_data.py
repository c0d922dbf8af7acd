"""Data layer: sources -> packed MDS shards -> StreamingDataset loaders, plus every user-facing error.

Samples read back are compared against a token stream packed independently here, so packing,
eos placement, the train/val split and the loader order are all checked exactly.
"""

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from prores_algo.training import data
from prores_algo.training.data import (
    build_dataloader,
    ensure_dataset,
    iter_documents,
    loader,
    main,
    read_metadata,
    write_mds,
    writer,
)
from prores_algo.training.tokenizers import ByteTokenizer, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
EOS = 256


# ----------------------------------------------------------------------------------------------- helpers


def make_corpus(root: Path) -> list[str]:
    """A small folder corpus; returns the documents in the order the source must yield them."""
    root.mkdir(parents=True, exist_ok=True)
    files = {}  # relative path -> documents it contributes
    for i in range(24):
        text = f'DOC-{i:02d} unique text é {"lorem ipsum " * (i % 5 + 1)}\nline two of {i}\n'
        suffix = ('.txt', '.md', '.py', '.rst')[i % 4]
        rel = f'{"sub/" if i % 3 == 0 else ""}f{i:02d}{suffix}'
        files[rel] = [text]
    rows = [f'DOC-J{k} from jsonl {"x" * k}' for k in range(6)]
    files['rows.jsonl'] = rows
    for rel, docs in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith('.jsonl'):
            p.write_text(''.join(json.dumps({'text': t, 'id': n}) + '\n' for n, t in enumerate(docs)) + '\n')
        else:
            p.write_text(docs[0], encoding='utf-8')
    # Must be ignored: hidden folder, unsupported suffix, whitespace-only document.
    (root / '.git').mkdir()
    (root / '.git' / 'HEAD.txt').write_text('DOC-HIDDEN')
    (root / 'blob.bin').write_bytes(b'\x00\x01DOC-BIN')
    (root / 'zz_blank.txt').write_text('  \n\n')
    return [d for rel in sorted(files) for d in files[rel]]


def is_val(index: int, seed: int, val_fraction: float) -> bool:
    # The documented split rule: blake2b-64 of "seed:index" as a fraction of 2**64.
    h = int.from_bytes(hashlib.blake2b(f'{seed}:{index}'.encode(), digest_size=8).digest(), 'big')
    return h / 2.0**64 < val_fraction


def reference(docs, seq_len, val_fraction=0.0, seed=0, max_tokens=None):
    """Independent packing: per split, concat(bytes(doc) + [eos]) cut into seq_len rows, remainder dropped."""
    streams = {'train': [], 'val': []}
    owner = {}
    budget = max_tokens
    for i, doc in enumerate(docs):
        toks = list(doc.encode('utf-8')) + [EOS]
        if budget is not None:
            toks = toks[:budget]
            budget -= len(toks)
        split = 'val' if val_fraction > 0 and is_val(i, seed, val_fraction) else 'train'
        owner[i] = split
        streams[split] += toks
        if budget == 0:
            break
    rows = {s: [t[k * seq_len : (k + 1) * seq_len] for k in range(len(t) // seq_len)] for s, t in streams.items()}
    return rows, owner


def read_split(path, split, seq_len=None, batch_size=1):
    spec = build_dataloader(str(path), split, batch_size, shuffle=False, seq_len=seq_len, drop_last=False)
    rows = []
    for batch in spec.dataloader:
        x = batch['input_ids']
        assert x.dtype == torch.int64 and x.ndim == 2
        rows += x.tolist()
    return rows, spec


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path, monkeypatch):
    # streaming leaves a pair of '<prefix>_*_filelock' files in tempfile.gettempdir() per dataset;
    # point it at the test's tmp folder so test runs do not litter /tmp. (Shared-memory names stay
    # global, so prefixes still cannot collide with live datasets.)
    d = tmp_path / 'systmp'
    d.mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(d))


@pytest.fixture
def corpus(tmp_path):
    return tmp_path / 'corpus', make_corpus(tmp_path / 'corpus')


# ----------------------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    ids = tok.encode('héllo ✓')
    assert all(0 <= i < 256 for i in ids) and tok.vocab_size == 257 and tok.eos_token_id == 256
    assert tok.decode(ids + [tok.eos_token_id]) == 'héllo ✓'
    assert tok.encode_array('héllo').tolist() == list('héllo'.encode())
    assert load_tokenizer('byte').name == 'byte'


def _save_hf_tokenizer(path: Path, eos: bool = True) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {'<unk>': 0, '</s>': 1, 'hello': 2, 'world': 3, 'DOC': 4}
    t = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    kw = {'eos_token': '</s>'} if eos else {}
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token='<unk>', **kw).save_pretrained(path)
    return path


def test_hf_tokenizer_local_folder(tmp_path):
    tok = load_tokenizer(str(_save_hf_tokenizer(tmp_path / 'tok')))
    assert tok.vocab_size == 5 and tok.eos_token_id == 1
    assert tok.encode('hello world') == [2, 3]  # no special tokens added
    assert tok.decode([2, 1, 3]) == 'hello world'  # eos skipped

    src = tmp_path / 'src'
    src.mkdir()
    for i in range(8):
        (src / f'{i}.txt').write_text('hello world ' * (i + 3))
    meta = write_mds(
        str(src), tmp_path / 'ds', tokenizer=str(tmp_path / 'tok'), seq_len=4, val_fraction=0, progress=False
    )
    assert meta['vocab_size'] == 5 and meta['eos_token_id'] == 1
    assert meta['tokenizer'] == str((tmp_path / 'tok').resolve())
    rows, _ = read_split(tmp_path / 'ds', 'train')
    stream = [t for i in range(8) for t in [2, 3] * (i + 3) + [1]]
    assert rows == [stream[k : k + 4] for k in range(0, len(stream) // 4 * 4, 4)]


def test_tokenizer_errors_name_the_field(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match='`tokenizer`'):
        load_tokenizer(str(tmp_path / 'no_such_tokenizer'))
    with pytest.raises(ValueError, match='`tokenizer`.*no eos'):
        load_tokenizer(str(_save_hf_tokenizer(tmp_path / 'noeos', eos=False)))

    # A hub id that cannot be fetched: the original error is wrapped (patched: no network in tests).
    import transformers

    def fail(name, *a, **k):
        raise OSError(f'{name} is not a local folder and is not a valid model identifier')

    monkeypatch.setattr(transformers.AutoTokenizer, 'from_pretrained', fail)
    with pytest.raises(ValueError, match=r'`tokenizer`.*not a valid model identifier'):
        load_tokenizer('some-org/not-a-tokenizer')
    with pytest.raises(ValueError, match='`tokenizer`'):
        write_mds('stdlib', tmp_path / 'ds', tokenizer='some-org/not-a-tokenizer', progress=False)
    assert not (tmp_path / 'ds').exists()


# ----------------------------------------------------------------------------------------------- sources


def test_folder_source_order_and_filters(corpus):
    root, docs = corpus
    assert list(iter_documents(str(root))) == docs  # sorted, recursive, jsonl rows, filters applied
    # a single file, and the byte cap (cut at a UTF-8 boundary)
    assert list(iter_documents(str(root / 'f01.md'))) == [docs[[d[:6] for d in docs].index('DOC-01')]]
    capped = list(iter_documents(str(root), max_bytes=100))
    assert sum(len(d.encode()) for d in capped) <= 100 and ''.join(capped) == ''.join(docs)[: len(''.join(capped))]


def test_stdlib_source_is_sorted_stdlib_py():
    root = Path(sysconfig.get_paths()['stdlib'])
    docs = list(iter_documents('stdlib', max_bytes=20_000))
    assert docs and sum(len(d.encode()) for d in docs) <= 20_000
    first = sorted(
        (p for p in root.rglob('*.py') if 'site-packages' not in p.parts), key=lambda p: p.relative_to(root).as_posix()
    )[0]
    assert docs[0].startswith(first.read_text(encoding='utf-8')[:1000])


def test_source_errors_name_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match='`source`.*stdlib'):
        iter_documents(str(tmp_path / 'missing'))
    with pytest.raises(FileNotFoundError, match='`source`'):
        write_mds(str(tmp_path / 'missing'), tmp_path / 'ds', progress=False)
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'a.txt').write_text(' \n')
    with pytest.raises(ValueError, match='empty corpus.*`source`'):
        write_mds(str(tmp_path / 'empty'), tmp_path / 'ds', progress=False)
    (tmp_path / 'x.csv').write_text('a,b')
    with pytest.raises(ValueError, match='`source`.*suffix'):
        iter_documents(str(tmp_path / 'x.csv'))
    (tmp_path / 'bad.jsonl').write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(ValueError, match="line 2.*'text'"):
        list(iter_documents(str(tmp_path / 'bad.jsonl')))
    assert not (tmp_path / 'ds').exists()


def test_hf_source_without_datasets_is_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, 'datasets', None)  # import datasets -> ImportError
    with pytest.raises(ValueError, match='`source`.*pip install datasets'):
        next(iter_documents('hf:allenai/c4:en'))
    with pytest.raises(ValueError, match='hf:NAME'):
        iter_documents('hf:')


# ----------------------------------------------------------------------------------------------- write + read


def test_write_and_read_back_exact(corpus, tmp_path):
    root, docs = corpus
    seq_len, vf, seed = 16, 0.25, 3
    meta = write_mds(str(root), tmp_path / 'ds', seq_len=seq_len, val_fraction=vf, seed=seed, progress=False)
    expected, owner = reference(docs, seq_len, vf, seed)
    assert expected['train'] and expected['val'], 'fixture must exercise both splits'

    for split in ('train', 'val'):
        rows, spec = read_split(tmp_path / 'ds', split, seq_len=seq_len, batch_size=4)
        assert rows == expected[split]
        assert spec.num_tokens == len(rows) * seq_len
        batch = next(iter(spec.dataloader))
        assert batch['input_ids'].shape == (4, seq_len)
        assert spec.get_num_tokens_in_batch(batch) == 4 * seq_len

    # Disjoint by document: each document's text appears in exactly the split that owns it.
    text = {s: ByteTokenizer().decode([t for r in expected[s] for t in r]) for s in ('train', 'val')}
    for i, doc in enumerate(docs):
        marker = doc[:7]
        other = 'train' if owner[i] == 'val' else 'val'
        assert marker not in text[other]

    assert meta == read_metadata(tmp_path / 'ds') == json.loads((tmp_path / 'ds' / 'prores_data.json').read_text())
    assert meta['tokenizer'] == 'byte' and meta['vocab_size'] == 257 and meta['eos_token_id'] == EOS
    assert meta['seq_len'] == seq_len and meta['seed'] == seed and meta['source'] == str(root.resolve())
    for s in ('train', 'val'):
        assert meta['splits'][s]['samples'] == len(expected[s])
        assert meta['splits'][s]['tokens'] == len(expected[s]) * seq_len
        assert meta['splits'][s]['documents'] == sum(1 for o in owner.values() if o == s)
    assert sorted(p.name for p in (tmp_path / 'ds').iterdir()) == ['prores_data.json', 'train', 'val']


def test_stdlib_capped_train_only(tmp_path):
    # val_fraction=0 keeps this independent of which stdlib files come first on this machine.
    meta = write_mds('stdlib', tmp_path / 'ds', seq_len=32, val_fraction=0, max_tokens=30_000, progress=False)
    expected, _ = reference(iter_documents('stdlib'), 32, max_tokens=30_000)
    rows, _ = read_split(tmp_path / 'ds', 'train')
    assert rows == expected['train'] and len(rows) == 30_000 // 32
    assert list(meta['splits']) == ['train'] and meta['splits']['train']['tokens_read'] == 30_000
    with pytest.raises(FileNotFoundError, match="split 'val'"):
        build_dataloader(str(tmp_path / 'ds'), 'val', 2)


def test_shuffle_and_several_loaders_in_one_process(corpus, tmp_path):
    root, _ = corpus
    write_mds(str(root), tmp_path / 'ds', seq_len=8, val_fraction=0, progress=False)
    ordered, _ = read_split(tmp_path / 'ds', 'train')
    # Several live StreamingDatasets over the same local folder (remote=None) need no shm cleanup.
    specs = [build_dataloader(str(tmp_path / 'ds'), 'train', 4, shuffle=True, seed=s) for s in (1, 1, 2)]
    runs = [[r for b in sp.dataloader for r in b['input_ids'].tolist()] for sp in specs]
    assert runs[0] == runs[1] != runs[2]  # seeded, deterministic
    n = len(ordered) // 4 * 4  # drop_last
    for run in runs:  # a permutation of the samples, minus the dropped partial batch
        assert len(run) == n and Counter(map(tuple, run)) <= Counter(map(tuple, ordered))


RACE_SCRIPT = """
import sys, time
from prores_algo.training.data import TokenDataset
path, n, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
while time.time() < start:
    time.sleep(0.001)
live = [TokenDataset(local=path, remote=None, split='train', batch_size=1, shuffle=False) for _ in range(n)]
print('constructed', len(live))
"""


def test_concurrent_jobs_register_shared_memory_without_collisions(corpus, tmp_path):
    # Separate processes (separate jobs on one machine) constructing datasets at the same moment.
    # streaming 0.13 alone picks the same shared-memory prefix in two processes and one dies with
    # FileExistsError '/000NNN_locals' (5 of 6 processes here, before the lock in TokenDataset).
    root, _ = corpus
    write_mds(str(root), tmp_path / 'ds', seq_len=8, val_fraction=0, progress=False)
    start = time.time() + 6.0  # all interpreters are up by then
    procs = [
        subprocess.Popen(
            [sys.executable, '-c', RACE_SCRIPT, str(tmp_path / 'ds'), '8', str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(5)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and 'constructed 8' in out, err[-2000:]


DIST_RACE_SCRIPT = """
import sys, time, traceback
import torch.distributed as dist
from prores_algo.training.data import TokenDataset
dist.init_process_group('gloo')
path, n, start, report = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
while time.time() < start:
    time.sleep(0.001)
try:
    live = [TokenDataset(local=path, remote=None, split='train', batch_size=1, shuffle=False) for _ in range(n)]
except Exception:  # torchrun prints only the last rank's traceback: keep each rank's own
    with open(report.format(rank=dist.get_rank()), 'w') as f:
        f.write(traceback.format_exc())
    raise
dist.barrier()
# one file per rank: both ranks share the launcher's stdout, where unbuffered prints can interleave
with open(report.format(rank=dist.get_rank()), 'w') as f:
    f.write(f'constructed {len(live)}')
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_concurrent_multi_rank_jobs_register_shared_memory_consistently(corpus, tmp_path):
    # Two 2-rank jobs plus two single-process jobs at the same moment. In a 2-rank job every rank scans
    # for the prefix; a non-leader must not scan before its leader holds the machine lock, or another
    # job can take the prefix in between ('shared memory prefix=N was not registered by local leader').
    root, _ = corpus
    write_mds(str(root), tmp_path / 'ds', seq_len=8, val_fraction=0, progress=False)
    start = time.time() + 12.0
    args = [str(tmp_path / 'ds'), '6', str(start)]
    script = tmp_path / 'dist_race.py'
    script.write_text(DIST_RACE_SCRIPT)
    reports = [str(tmp_path / f'job{job}_rank{{rank}}.txt') for job in range(2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                '-m',
                'torch.distributed.run',
                '--standalone',
                '--nproc_per_node',
                '2',
                str(script),
                *args,
                report,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for report in reports
    ]
    procs += [
        subprocess.Popen(
            [sys.executable, '-c', RACE_SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    failed = [Path(r.format(rank=rank)) for r in reports for rank in range(2)]
    failed = {p.name: p.read_text()[-3000:] for p in failed if p.exists() and 'constructed' not in p.read_text()}
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, failed or err[-3000:]
    constructed = [Path(report.format(rank=rank)).read_text() for report in reports for rank in range(2)]
    assert constructed == ['constructed 6'] * 4


def _two_rank_job(script_text, corpus, tmp_path, arg):
    """Run `script_text` as a 2-rank torchrun job over a fresh dataset, with arguments (dataset, arg,
    report path pattern); each rank writes its result to its report. Returns the two results."""
    root, _ = corpus
    write_mds(str(root), tmp_path / 'ds', seq_len=8, val_fraction=0, progress=False)
    script = tmp_path / 'two_rank_job.py'
    script.write_text(script_text)
    report = str(tmp_path / 'rank{rank}.txt')
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(script)]
        + [str(tmp_path / 'ds'), arg, report],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [Path(report.format(rank=rank)).read_text() for rank in range(2)]


FREED_DURING_SCAN_SCRIPT = """
import os, sys, time, traceback
import torch.distributed as dist
from streaming.base.constant import LOCALS
from streaming.base.shared import SharedMemory, prefix
from prores_algo.training.data import TokenDataset
dist.init_process_group('gloo')
path, marker, report = sys.argv[1], sys.argv[2], sys.argv[3]
rank, scan = dist.get_rank(), prefix._check_and_find_retrying
if rank == 0:
    # another job's dataset holds the lowest free prefix, and exits right after this leader has scanned
    free = scan(['/elsewhere'], [None], shm_name=LOCALS, retry=0)
    other = SharedMemory(prefix._get_path(free, LOCALS), True, 64, auto_cleanup=False)
    def leader_scan(*args, **kwargs):
        found = scan(*args, **kwargs)
        if not os.path.exists(marker):
            other.cleanup()
            open(marker, 'w').close()
        return found
    prefix._check_and_find_retrying = leader_scan
else:
    def late_scan(*args, **kwargs):  # streaming has every rank scan; this one scans after the exit
        while not os.path.exists(marker):
            time.sleep(0.01)
        return scan(*args, **kwargs)
    prefix._check_and_find_retrying = late_scan
try:
    ds = TokenDataset(local=path, remote=None, split='train', batch_size=1, shuffle=False)
    result = f'prefix {ds._shm_prefix_int}'
except Exception:
    result = traceback.format_exc()
with open(report.format(rank=rank), 'w') as f:
    f.write(result)
os._exit(0)  # a failed rank would leave its peer in a barrier
"""


def test_multi_rank_job_survives_another_job_freeing_a_prefix_during_registration(corpus, tmp_path):
    # streaming 0.13 alone: rank 0 registers the prefix it scanned, rank 1 scans after the other job
    # freed a lower one and dies with 'shared memory prefix=N was not registered by local leader'
    # (seen in CI with two 2-rank jobs and two single-process jobs starting and exiting together).
    results = _two_rank_job(FREED_DURING_SCAN_SCRIPT, corpus, tmp_path, str(tmp_path / 'freed'))
    assert (tmp_path / 'freed').exists()
    assert results[0] == results[1] and results[0].startswith('prefix '), results


REUSED_LOCAL_SCRIPT = """
import os, sys
import torch.distributed as dist
from prores_algo.training.data import TokenDataset
dist.init_process_group('gloo')
remote, local, report = sys.argv[1], sys.argv[2], sys.argv[3]
first = TokenDataset(local=local, remote=remote, split='train', batch_size=1, shuffle=False)
try:  # the same local cache for a second remote dataset: the leader's scan refuses it
    TokenDataset(local=local, remote=remote, split='train', batch_size=1, shuffle=False)
    result = 'constructed'
except Exception as e:
    result = f'{type(e).__name__}: {e}'
with open(report.format(rank=dist.get_rank()), 'w') as f:
    f.write(result)
os._exit(0)
"""


def test_multi_rank_job_whose_leader_refuses_the_prefix_fails_on_every_rank(corpus, tmp_path):
    # Only the leader scans now; its refusal must reach the other ranks instead of leaving them waiting.
    leader, other = _two_rank_job(REUSED_LOCAL_SCRIPT, corpus, tmp_path, str(tmp_path / 'cache'))
    assert leader.startswith('ValueError: Reused local directory'), leader
    assert other.startswith('RuntimeError: a local leader could not register'), other


OTHER_NODE_FAILS_SCRIPT = """
import os, sys
from datetime import timedelta
os.environ['LOCAL_WORLD_SIZE'] = '1'  # two simulated nodes of one rank each: both ranks are local leaders
import torch.distributed as dist
from streaming.base.shared import prefix
from prores_algo.training.data import TokenDataset, token_dataset
dist.init_process_group('gloo', timeout=timedelta(seconds=60))
path, lock_dir, report = sys.argv[1], sys.argv[2], sys.argv[3]
rank = dist.get_rank()
token_dataset._SHM_LOCK_DIR = f'{lock_dir}{rank}'  # each simulated node has a machine (and a lock) of its own
os.makedirs(token_dataset._SHM_LOCK_DIR)
if rank == 0:
    def failing_scan(*args, **kwargs):
        raise OSError('node 0 cannot read /dev/shm')
    prefix._check_and_find_retrying = failing_scan
try:
    TokenDataset(local=path, remote=None, split='train', batch_size=1, shuffle=False)
    result = 'constructed'
except Exception as e:
    result = f'{type(e).__name__}: {e}'
with open(report.format(rank=rank), 'w') as f:
    f.write(result)
os._exit(0)
"""


def test_a_leader_failing_on_one_node_fails_the_other_nodes_instead_of_leaving_them_waiting(corpus, tmp_path):
    # Node 1's own leader found a prefix, but node 0 gave up: node 1 must not wait in streaming's barrier
    # for it (that would last the process group's timeout, 60 s here, 30 min by default).
    start = time.time()
    node0, node1 = _two_rank_job(OTHER_NODE_FAILS_SCRIPT, corpus, tmp_path, str(tmp_path / 'lock'))
    assert node0 == 'OSError: node 0 cannot read /dev/shm'
    assert node1.startswith('RuntimeError: a local leader could not register'), node1
    assert time.time() - start < 55


# ----------------------------------------------------------------------------------------------- atomicity


def test_interrupted_write_leaves_nothing_loadable_and_rerun_completes(corpus, tmp_path, monkeypatch):
    root, docs = corpus
    out = tmp_path / 'ds'
    real = data.iter_documents

    def crashing(source, **kw):
        for i, doc in enumerate(real(source, **kw)):
            if i == 15:
                raise RuntimeError('disk on fire')
            yield doc

    monkeypatch.setattr(writer, 'iter_documents', crashing)
    with pytest.raises(RuntimeError, match='disk on fire'):
        write_mds(str(root), out, seq_len=8, val_fraction=0.25, progress=False)
    assert not out.exists() and read_metadata(out) is None
    assert not [p for p in tmp_path.iterdir() if 'prores-tmp' in p.name]  # temp folder removed
    with pytest.raises(FileNotFoundError):
        build_dataloader(str(out), 'train', 2)

    # A hard-killed run leaves its temp folder (with a finished-looking index.json) behind:
    # it must not be taken for the dataset, and the next run removes it.
    stale = tmp_path / f'.ds{data._TMP_MARK}999-deadbeef'
    (stale / 'train').mkdir(parents=True)
    (stale / 'train' / 'index.json').write_text('{"shards": [], "version": 2}')
    with pytest.raises(FileNotFoundError):
        build_dataloader(str(out), 'train', 2)

    monkeypatch.setattr(writer, 'iter_documents', real)
    meta = write_mds(str(root), out, seq_len=8, val_fraction=0.25, progress=False)
    assert not stale.exists()
    rows, _ = read_split(out, 'train')
    assert rows == reference(docs, 8, 0.25)[0]['train'] and meta['splits']['train']['samples'] == len(rows)


def test_overwrite_rules(corpus, tmp_path):
    root, docs = corpus
    out = tmp_path / 'ds'
    write_mds(str(root), out, seq_len=8, val_fraction=0, progress=False)
    with pytest.raises(ValueError, match='`out_dir`.*overwrite'):
        write_mds(str(root), out, seq_len=8, val_fraction=0, progress=False)
    meta = write_mds(str(root), out, seq_len=12, val_fraction=0, overwrite=True, progress=False)
    assert meta['seq_len'] == 12 and read_metadata(out)['seq_len'] == 12
    assert read_split(out, 'train')[0] == reference(docs, 12)[0]['train']
    # Never replace a folder that holds other things, even with overwrite.
    other = tmp_path / 'home'
    other.mkdir()
    (other / 'precious.txt').write_text('keep me')
    with pytest.raises(ValueError, match='`out_dir`'):
        write_mds(str(root), other, seq_len=8, val_fraction=0, overwrite=True, progress=False)
    assert (other / 'precious.txt').read_text() == 'keep me'


# ----------------------------------------------------------------------------------------------- ensure_dataset


def test_ensure_dataset_reuses_and_detects_mismatch(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    out = tmp_path / 'ds'
    built = ensure_dataset(str(root), out, seq_len=8, val_fraction=0.25, progress=False)

    def no_rebuild(*a, **k):
        raise AssertionError('should have reused the dataset')

    monkeypatch.setattr(writer, '_build', no_rebuild)
    # relative vs absolute source path and a different compression still count as the same data
    monkeypatch.chdir(tmp_path)
    assert ensure_dataset('corpus', 'ds', seq_len=8, val_fraction=0.25, compression='zstd', progress=False) == built
    with pytest.raises(ValueError, match='seq_len: dataset has 8, requested 16'):
        ensure_dataset(str(root), out, seq_len=16, val_fraction=0.25)
    with pytest.raises(ValueError, match='seed'):
        ensure_dataset(str(root), out, seq_len=8, val_fraction=0.25, seed=1)
    with pytest.raises(ValueError, match='source'):
        ensure_dataset('stdlib', out, seq_len=8, val_fraction=0.25)


def test_ensure_dataset_concurrent_callers_build_once(corpus, tmp_path, monkeypatch):
    # Every rank of a job may call ensure_dataset at once: one builds, the others wait and reuse.
    root, _ = corpus
    builds = []
    real_build = writer._build

    def counting_build(*a, **k):
        builds.append(1)
        return real_build(*a, **k)

    monkeypatch.setattr(writer, '_build', counting_build)
    with ThreadPoolExecutor(3) as pool:
        metas = list(
            pool.map(lambda _: ensure_dataset(str(root), tmp_path / 'ds', seq_len=8, progress=False), range(3))
        )
    assert len(builds) == 1 and metas[0] == metas[1] == metas[2] == read_metadata(tmp_path / 'ds')


# ----------------------------------------------------------------------------------------------- load errors


def test_split_too_small_for_seq_len(corpus, tmp_path):
    root, docs = corpus
    with pytest.raises(ValueError, match=r'`seq_len`.*`max_tokens`.*`val_fraction`') as e:
        write_mds(str(root), tmp_path / 'ds', seq_len=128, max_tokens=100, val_fraction=0, progress=False)
    assert '100 tokens' in str(e.value)
    # seq_len between the two splits' token counts: the smaller split is the one reported empty.
    streams, _ = reference(docs, 1, 0.25)
    small, large = sorted(streams, key=lambda s: len(streams[s]))
    assert len(streams[small]) < len(streams[large])
    with pytest.raises(ValueError, match=f"split '{small}' got 0 samples: it has {len(streams[small])} tokens"):
        write_mds(str(root), tmp_path / 'ds', seq_len=len(streams[small]) + 1, val_fraction=0.25, progress=False)
    assert not (tmp_path / 'ds').exists()
    with pytest.raises(ValueError, match='`seq_len`'):
        write_mds(str(root), tmp_path / 'ds', seq_len=1, progress=False)
    with pytest.raises(ValueError, match='`val_fraction`'):
        write_mds(str(root), tmp_path / 'ds', val_fraction=1.0, progress=False)
    with pytest.raises(ValueError, match='`compression`'):
        write_mds(str(root), tmp_path / 'ds', compression='lzma9000', progress=False)


def test_loader_errors_name_the_field(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / 'ds'
    write_mds(str(root), out, seq_len=8, val_fraction=0.25, progress=False)
    with pytest.raises(ValueError, match='`seq_len` 16 .*seq_len=8'):
        build_dataloader(str(out), 'train', 2, seq_len=16)
    with pytest.raises(ValueError, match="model's `vocab_size` 100 .*257"):
        build_dataloader(str(out), 'train', 2, vocab_size=100)
    build_dataloader(str(out), 'train', 2, seq_len=8, vocab_size=257)  # exactly enough is fine
    with pytest.raises(FileNotFoundError, match='prores-data'):
        build_dataloader(str(tmp_path / 'missing'), 'train', 2)
    with pytest.raises(FileNotFoundError, match=r"split 'test'.*\['train', 'val'\]"):
        build_dataloader(str(out), 'test', 2)
    with pytest.raises(ValueError, match='`batch_size`'):
        build_dataloader(str(out), 'val', 10_000)


def test_remote_url_goes_to_streaming_remote(tmp_path, monkeypatch):
    seen = {}

    class FakeDataset:
        def __init__(self, **kw):
            seen.update(kw)
            self.seq_len = 8

        def __len__(self):
            return 10

    monkeypatch.setattr(loader, 'TokenDataset', FakeDataset)
    monkeypatch.setattr(loader, '_remote_metadata', lambda remote: {'seq_len': 8, 'vocab_size': 257})
    spec = build_dataloader('s3://bucket/ds', 'train', 2, local_cache=str(tmp_path / 'cache'))
    assert seen['remote'] == 's3://bucket/ds' and seen['local'] == str(tmp_path / 'cache')
    assert seen['split'] == 'train' and seen['batch_size'] == 2 and spec.num_tokens == 80
    build_dataloader('gs://b/ds', 'train', 2)
    assert seen['local'] == data._default_cache_dir('gs://b/ds')  # deterministic: same on every rank
    with pytest.raises(ValueError, match='`seq_len`'):
        build_dataloader('s3://bucket/ds', 'train', 2, seq_len=16)
    with pytest.raises(ValueError, match='`vocab_size`'):
        build_dataloader('s3://bucket/ds', 'train', 2, vocab_size=50)


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_main(corpus, tmp_path, capsys):
    root, docs = corpus
    out = tmp_path / 'cli'
    rc = main(
        [
            '--source',
            str(root),
            '--out',
            str(out),
            '--seq_len',
            '8',
            '--val_fraction',
            '0.25',
            '--seed',
            '3',
            '--compression',
            'zstd',
            '--no_progress',
        ]
    )
    assert rc == 0 and 'prores-data: wrote' in capsys.readouterr().out
    meta = read_metadata(out)
    assert meta['compression'] == 'zstd' and meta['seq_len'] == 8
    assert read_split(out, 'val')[0] == reference(docs, 8, 0.25, 3)[0]['val']
    with pytest.raises(SystemExit) as e:
        main(['--source', str(root), '--out', str(out), '--no_progress'])
    assert e.value.code == 2 and '`out_dir`' in capsys.readouterr().err
    assert main(['--source', str(root), '--out', str(out), '--seq_len', '8', '--overwrite', '--no_progress']) == 0


def test_cli_module_help():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    r = subprocess.run(
        [sys.executable, '-m', 'prores_algo.training.data', '--help'],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert 'usage: prores-data' in r.stdout and '--source' in r.stdout and '--overwrite' in r.stdout


def test_cli_counts_accept_scientific_notation():
    """docs/training.md writes `--max_tokens 2e9`: whole numbers in scientific notation parse, fractions do not."""
    import argparse

    from prores_algo.training.data import _whole_number

    assert _whole_number('2e9') == 2_000_000_000 and _whole_number('150000') == 150_000
    with pytest.raises(argparse.ArgumentTypeError, match='whole number'):
        _whole_number('2.5')
    with pytest.raises(argparse.ArgumentTypeError, match='not a number'):
        _whole_number('lots')
