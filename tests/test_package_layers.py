"""utils/ is layered: each package imports only from packages below it, so the folders read as the architecture
(README "Layout") and a change in a lower room cannot need one in a higher room. Imports inside functions count too."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UTILS = os.path.join(ROOT, 'utils')
# lower first; a package may import from its own and any lower rank (export and evaluation share a rank: neither
# imports the other); the platform glue sits on top
RANKS = {'core': 0, 'data': 1, 'modeling': 2, 'export': 3, 'evaluation': 3, 'training': 4, 'inference': 4,
         'platform': 5}


def imported_modules(path: str):
    """Every module named by an import statement in `path`, with its line."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno


def package_files():
    for package in sorted(os.listdir(UTILS)):
        folder = os.path.join(UTILS, package)
        if os.path.isdir(folder) and not package.startswith('__'):
            for name in sorted(os.listdir(folder)):
                if name.endswith('.py'):
                    yield package, os.path.join(folder, name)


def test_every_package_of_utils_has_a_rank():
    assert {package for package, _ in package_files()} == set(RANKS)


@pytest.mark.parametrize('package', sorted(RANKS))
def test_a_package_imports_only_from_lower_packages(package):
    upward = []
    for owner, path in package_files():
        if owner != package:
            continue
        for module, line in imported_modules(path):
            parts = module.split('.')
            if parts[0] in ('fasterrcnn_adapter', 'local_runner'):
                upward.append(f'{os.path.relpath(path, ROOT)}:{line} imports {module}')
            elif parts[0] == 'utils' and len(parts) > 1 and parts[1] != package and parts[1] in RANKS \
                    and RANKS[parts[1]] >= RANKS[package]:
                upward.append(f'{os.path.relpath(path, ROOT)}:{line} imports {module}')
    assert not upward, '\n'.join(upward)
