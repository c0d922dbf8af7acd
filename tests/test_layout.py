"""The package's shape: the torch-only core imports no training framework, and no module imports
another that (directly or not) imports it back, at module level or inside a function."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / 'prores_algo'
CORE = (
    'prores_algo',
    'prores_algo.alpha_schedules',
    'prores_algo.policies',
    'prores_algo.surgery',
    'prores_algo.scaled_linear',
    'prores_algo.spec',
    'prores_algo.timing',
    'prores_algo.monitor',
    'prores_algo.paired_stats',
    'prores_algo.export',
    'prores_algo.training.models.decoder',
)
FRAMEWORKS = ('composer', 'transformers', 'deepspeed', 'streaming')


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _internal_imports(path: Path, modules: set[str]) -> set[str]:
    """prores_algo modules `path` imports anywhere in its body (an attribute import `from a import b`
    counts as importing `a.b` when that is a module, else `a`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in modules else node.module for a in node.names
            ]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def test_no_import_cycles():
    files = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
    modules = set(files)
    graph = {m: _internal_imports(p, modules) - {m} for m, p in files.items()}
    # a package's __init__ re-exporting its children is not a cycle: drop edges from a package to its own children
    graph = {m: {d for d in deps if not d.startswith(m + '.')} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                raise AssertionError('import cycle: ' + ' -> '.join(cycle))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_core_imports_no_training_framework():
    code = (
        f'import sys, importlib\nfor m in {CORE!r}: importlib.import_module(m)\n'
        f'print(sorted(f for f in {FRAMEWORKS!r} if f in sys.modules))'
    )
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == '[]', f'the core imported {out}'
