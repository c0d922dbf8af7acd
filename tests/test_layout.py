"""The package's shape: the torch-only core (the top-level modules) imports no training framework and
nothing of the training kit or the integrations, anywhere in its code; no module imports another that
(directly or not) imports it back; modules and functions stay small enough to read."""

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
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


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


def _imported_names(path: Path) -> set[str]:
    """Every module name `path` imports, at module level or inside a function (absolute imports)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_modules_never_import_a_framework_or_the_training_kit():
    """Not even lazily: the top-level modules (the package's `__init__` aside, which re-exports the
    integrations' names on first use) run where only torch is installed."""
    core = sorted(p for p in PACKAGE.glob('*.py') if p.name != '__init__.py')
    assert {p.stem for p in core} >= {'alpha_schedules', 'surgery', 'spec', 'timing', 'lr_schedules', 'monitor'}
    for path in core:
        for name in _imported_names(path):
            root = name.split('.')[0]
            assert root not in FRAMEWORKS, f'{path.name} imports {name}'
            assert not name.startswith(('prores_algo.training', 'prores_algo.integrations')), (
                f'{path.name} imports {name}'
            )


def test_integrations_do_not_depend_on_the_training_kit():
    for path in (PACKAGE / 'integrations').rglob('*.py'):
        for name in _imported_names(path):
            assert not name.startswith('prores_algo.training'), f'{path.relative_to(PACKAGE)} imports {name}'


def test_modules_and_functions_are_small():
    too_long = []
    for path in sorted(PACKAGE.rglob('*.py')):
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f'{path.relative_to(PACKAGE)}: {lines} lines')
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f'{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {length} lines')
    assert not too_long, f'over {MAX_MODULE_LINES} lines per module / {MAX_FUNCTION_LINES} per function: {too_long}'
