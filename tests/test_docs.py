"""The documentation points at things that exist: every page (README.md, docs/*.md and the other Markdown
pages listed in PAGES) is checked for

- relative links: the file exists, and a `#fragment` names a heading of that file;
- commands (code lines and inline code that start with a command): a `prores-*` command is one of
  pyproject's console scripts, `python -m X` (or a launcher's `-m X` / `--module X`) with X in this
  repository names an importable module, every `--flag` given to one of these is listed by that
  command's `--help` (for the prores-* commands in either spelling, `--seq-len` or `--seq_len`: they
  accept both), and every script, YAML or JSON path a command names exists;
- dotted names: every `prores_algo.<module>[.<attribute>]` a page names can be imported or looked up.

A renamed flag, module or file then fails here instead of in a reader's shell.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [ROOT / 'README.md', *(ROOT / 'docs').glob('*.md'), ROOT / 'benchmarks' / 'RESULTS.md']
    + [ROOT / 'yamls' / 'deepspeed' / 'README.md']
)
# pyproject's [project.scripts] table (read with a regex: tomllib is not in Python 3.10)
_SCRIPTS_TABLE = re.search(
    r'^\[project\.scripts\]\n(.*?)(?=^\[|\Z)', (ROOT / 'pyproject.toml').read_text(), re.M | re.S
)
SCRIPTS = dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', _SCRIPTS_TABLE.group(1), re.M))
OWN_PACKAGES = ('prores_algo', 'benchmarks')
LAUNCHERS = ('composer', 'torchrun', 'deepspeed')
COMMAND_START = re.compile(
    r'^(?:[A-Z_]+=\S+\s+)*(?:\.venv/bin/)?(prores-[a-z-]+|python3?|composer|torchrun|deepspeed|llmfoundry|bash)\b'
)
PATH_SUFFIXES = ('.yaml', '.yml', '.json', '.sh', '.py')

LINK = re.compile(r'(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)')
INLINE_CODE = re.compile(r'`([^`]+)`')


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
    return text.replace(' ', '-')


def _anchors(page: Path) -> set[str]:
    text = _strip_fences(page.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r'^#{1,6}\s+(.*)$', text, re.M)}


def _strip_fences(text: str) -> str:
    """The text without fenced code blocks (a `# comment` inside one is not a heading)."""
    return re.sub(r'^```.*?^```', '', text, flags=re.S | re.M)


def _links(page: Path) -> list[str]:
    text = _strip_fences(page.read_text())
    text = re.sub(r'^( {4,}|\t).*$', '', text, flags=re.M)  # indented code
    return [a or b for a, b in LINK.findall(text)]


def _code_lines(page: Path) -> list[str]:
    """Commands: lines of indented or fenced code blocks (continuations joined) and inline code spans
    that start with a command."""
    out, in_fence, fence_lang, pending = [], False, '', ''
    for line in page.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith('```'):
            in_fence, fence_lang = not in_fence, stripped[3:].strip()
            continue
        code = (in_fence and fence_lang in ('', 'bash', 'sh', 'shell')) or (
            not in_fence and re.match(r'^ {4,}\S', line)
        )
        if pending:
            stripped = pending + ' ' + stripped
            pending = ''
        if code and stripped.endswith('\\'):
            pending = stripped[:-1]
            continue
        if code:
            out.append(stripped)
        elif not in_fence:
            out.extend(span for span in INLINE_CODE.findall(line) if COMMAND_START.match(span))
    return [c for c in out if COMMAND_START.match(re.sub(r'^(export|env)\s+', '', c))]


def _segments(command: str) -> list[list[str]]:
    command = re.sub(r'\s#.*$', '', command)  # a trailing comment
    out = []
    for part in re.split(r'\s*(?:&&|\|\||;|\|)\s*', command):
        try:
            tokens = shlex.split(part)
        except ValueError:
            tokens = part.split()
        while tokens and (re.match(r'^[A-Za-z_]+=', tokens[0]) or tokens[0] in ('env', 'export')):
            tokens = tokens[1:]
        if tokens:
            tokens[0] = tokens[0].removeprefix('.venv/bin/')
            out.append(tokens)
    return out


def _module_of(tokens: list[str]) -> tuple[str | None, list[str]]:
    """(module this command runs, the arguments given to it), or (None, []) for a command of someone else."""
    head = tokens[0]
    if head in SCRIPTS:
        return SCRIPTS[head].split(':')[0], tokens[1:]
    if head in ('python', 'python3') or head in LAUNCHERS:
        for i, tok in enumerate(tokens[1:-1], start=1):
            if tok in ('-m', '--module'):
                module = tokens[i + 1]
                if module.split('.')[0] in OWN_PACKAGES:
                    return module, tokens[i + 2 :]
                return None, []
    return None, []


def _commands() -> list[tuple[str, list[str]]]:
    return [(_rel(page), tokens) for page in PAGES for line in _code_lines(page) for tokens in _segments(line)]


def _is_repo_path(token: str) -> bool:
    return (
        token.endswith(PATH_SUFFIXES)
        and '/' in token
        and not token.startswith(('/', '~', 'path/', 'http'))
        and not re.search(r'[{}*<>=\[\]]|\.\.\.', token)
    )


def test_pages_exist_and_readme_is_short():
    assert len(PAGES) >= 8, [_rel(p) for p in PAGES]
    lines = (ROOT / 'README.md').read_text().count('\n')
    assert lines <= 250, f'README.md has {lines} lines; move the details to a page under docs/'


@pytest.mark.parametrize('page', PAGES, ids=_rel)
def test_relative_links_resolve(page):
    bad = []
    links = _links(page)
    for link in links:
        if re.match(r'^[a-z]+:', link):  # https:, mailto:
            continue
        target, _, fragment = link.partition('#')
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            bad.append(f'{link}: no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}')
        elif fragment and path.suffix == '.md' and fragment not in _anchors(path):
            bad.append(f'{link}: no heading #{fragment} in {path.relative_to(ROOT)}')
    assert not bad, f'{_rel(page)}: ' + '; '.join(bad)


def test_commands_are_found_on_the_pages():
    """The extraction itself: the README's set-up commands and a launcher's module are seen."""
    commands = _commands()
    heads = {tokens[0] for _, tokens in commands}
    assert {'prores-train', 'prores-preview', 'prores-compare', 'prores-data', 'torchrun', 'composer'} <= heads
    readme = [tokens for page, tokens in commands if page == 'README.md']
    assert ['python3', '-m', 'venv', '.venv'] in readme
    assert ['prores-train', 'yamls/quickstart.yaml'] in readme
    assert any(_module_of(t)[0] == 'prores_algo.training.deepspeed.loop' for t in readme)


def test_commands_name_existing_scripts_modules_and_files():
    bad = []
    for page, tokens in _commands():
        head = tokens[0]
        if head.startswith('prores-') and head not in SCRIPTS:
            bad.append(f'{page}: {head} is not a console script ({", ".join(SCRIPTS)})')
        module, _ = _module_of(tokens)
        if module is not None and importlib.util.find_spec(module) is None:
            bad.append(f'{page}: no module {module}')
        for tok in tokens[1:]:
            tok = tok.split('=', 1)[1] if re.match(r'^--?[\w-]+=', tok) else tok
            if _is_repo_path(tok) and not (ROOT / tok).exists() and not tok.startswith(('data/', 'out/', 'runs/')):
                bad.append(f'{page}: {" ".join(tokens[:3])} ... names {tok}, which does not exist')
    assert not bad, '\n'.join(bad)


def _help_texts(modules: list[str]) -> dict[str, str]:
    """Each module's `main(['--help'])` output, all in one fresh interpreter (a CLI's imports and
    logging set-up stay out of the test process)."""
    code = (
        'import contextlib, importlib, io, json, sys\n'
        'out = {}\n'
        'for name in sys.argv[1:]:\n'
        '    buf = io.StringIO()\n'
        '    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):\n'
        '        try:\n'
        "            importlib.import_module(name).main(['--help'])\n"
        '        except SystemExit:\n'
        '            pass\n'
        '    out[name] = buf.getvalue()\n'
        'print(json.dumps(out))\n'
    )
    run = subprocess.run(
        [sys.executable, '-c', code, *modules], cwd=ROOT, capture_output=True, text=True, timeout=600, check=True
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_every_flag_is_one_the_command_accepts():
    wanted: dict[str, set[tuple[str, str]]] = {}
    for page, tokens in _commands():
        module, args = _module_of(tokens)
        if module is None:
            continue
        for tok in args:
            if re.match(r'^--[a-z]', tok):
                wanted.setdefault(module, set()).add((page, tok.split('=', 1)[0]))
    assert 'prores_algo.preview' in wanted and 'benchmarks.quality' in wanted, sorted(wanted)
    helps = _help_texts(sorted(wanted))
    bad = []
    for module, uses in sorted(wanted.items()):
        text = helps[module]
        assert '--help' in text or 'usage' in text.lower(), f'{module} --help printed nothing'
        if module.startswith('prores_algo.'):  # the prores-* commands take `--seq-len` for `--seq_len`
            text = text.replace('-', '_').replace('__', '--')
        for page, flag in sorted(uses):
            if module.startswith('prores_algo.'):
                flag = '--' + flag[2:].replace('-', '_')
            if not re.search(re.escape(flag) + r'(?![\w-])', text):
                bad.append(f'{page}: {module} has no flag {flag}')
    assert not bad, '\n'.join(bad)


def _resolve(dotted: str) -> bool:
    """Whether `dotted` names a module of this package or an attribute reachable from one."""
    parts = dotted.split('.')
    for i in range(len(parts), 0, -1):
        module = '.'.join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_dotted_name_resolves():
    names = {
        (_rel(page), name)
        for page in PAGES
        for name in re.findall(r'(?<![\w/.])prores_algo(?:\.\w+)+', page.read_text())
    }
    assert len(names) >= 10, sorted(names)
    bad = [f'{page}: {name}' for page, name in sorted(names) if not _resolve(name)]
    assert not bad, 'names that do not exist:\n' + '\n'.join(bad)
