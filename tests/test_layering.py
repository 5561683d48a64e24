"""The package is layered as the notebooks are ordered: no module of `magma/` imports a module of a later notebook.

The notebooks `nbs/[0-9]*.ipynb`, sorted by file name, are the pipeline a reader follows (`00_manifold` to
`17_tables`), and each names the module it exports with `#| default_exp` (`04_mae` -> `magma.ssl.mae`). A module may
import the modules of its own and earlier notebooks, never a later one's: an import that points back up the pipeline
(at top level or inside a function, where a lazy import would hide it from a plain import test) is a back-edge, and
the test prints every such edge as `importer (notebook) -> imported (notebook)`.

Read with `ast`, nothing imported (no torch). Counted: `import magma.x`, `from magma.x import y`, `from magma import x`,
the relative forms (`from .x import y`, `from ..x import y`, `from . import x`), and `importlib.import_module` with a
literal name. The package itself (`import magma`, `magma/__init__.py`) is no notebook's module and is not counted; a
name built at run time (`methods.py`'s `import_module(f"{package.__name__}.{n}")`, which loads `magma.ssl.*` into the
registry) cannot be read statically.
"""
import ast, json, re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / 'magma'


def notebook_order(nbs: Path = ROOT / 'nbs') -> dict:
    "{module: (position, notebook name)} for every numbered notebook with a `#| default_exp`, in file-name order."
    order = {}
    for i, nb in enumerate(sorted(nbs.glob('[0-9]*.ipynb'))):
        for c in json.loads(nb.read_text(encoding='utf-8'))['cells']:
            if c['cell_type'] != 'code': continue
            m = re.search(r'^#\|\s*default_exp\s+(\S+)', ''.join(c['source']), re.M)
            if m:
                order[f'magma.{m.group(1)}'] = (i, nb.stem)
                break
    return order


def module_name(path: Path, pkg: Path = PKG) -> str:
    "`magma/ssl/mae.py` -> `magma.ssl.mae` (`__init__.py` names its package)."
    parts = path.relative_to(pkg.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _called(call: ast.Call):
    "The name a call calls: `f` of `f(...)` and of `mod.f(...)`."
    return getattr(call.func, 'attr', getattr(call.func, 'id', None))


def imported_names(path: Path, pkg: Path = PKG) -> set:
    "Every module name `path` may import (each `from a import b` gives `a` and `a.b`; the caller keeps the modules)."
    name = module_name(path, pkg)
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split('.')[:len(package.split('.')) - node.level + 1] if node.level else []
            base = '.'.join(base + ([node.module] if node.module else []))
            out |= {base} | {f'{base}.{a.name}' for a in node.names}
        elif isinstance(node, ast.Call) and _called(node) == 'import_module' and node.args:
            if isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                out.add(node.args[0].value)
    return out


def back_edges(pkg: Path = PKG, nbs: Path = ROOT / 'nbs') -> list:
    "Every import of a later notebook's module, as `importer (notebook) -> imported (notebook)`."
    order = notebook_order(nbs)
    edges = []
    for path in sorted(pkg.rglob('*.py')):
        me = order.get(module_name(path, pkg))
        if me is None: continue                         # magma/__init__.py, _modidx.py: no notebook's module
        for dep in sorted(imported_names(path, pkg)):
            it = order.get(dep)
            if it and it[0] > me[0]:
                edges.append(f'{module_name(path, pkg)} ({me[1]}) -> {dep} ({it[1]})')
    return edges


def test_every_module_has_its_notebook():
    "The order covers the package: every module of magma/ but the package files is some notebook's default_exp."
    order = notebook_order()
    assert len(order) >= 20, order
    mods = {module_name(p) for p in PKG.rglob('*.py') if p.name not in ('__init__.py', '_modidx.py')}
    assert mods <= set(order), sorted(mods - set(order))


def test_imports_resolve(tmp_path):
    "The reader of imports sees every form: absolute, relative (one and two dots), from the package, in a function."
    (tmp_path / 'magma' / 'ssl').mkdir(parents=True)
    mod = tmp_path / 'magma' / 'ssl' / 'm.py'
    mod.write_text('import magma.a as _a\nfrom magma.b import x\nfrom magma import c\nfrom ..d import y\n'
                   'from . import e\nfrom .f import z\n\ndef g():\n    import importlib\n    from ..h import w\n'
                   '    return importlib.import_module("magma.i")\n', encoding='utf-8')
    names = imported_names(mod, tmp_path / 'magma')
    want = {'magma.a', 'magma.b', 'magma.c', 'magma.d', 'magma.ssl.e', 'magma.ssl.f', 'magma.h', 'magma.i'}
    assert want <= names, sorted(want - names)
    assert {'magma.base', 'magma.patches', 'magma.losses'} <= imported_names(PKG / 'ssl' / 'mae.py')


def test_no_back_edges():
    edges = back_edges()
    assert not edges, (f'{len(edges)} import(s) of a later notebook\'s module (the modules follow the notebooks\' '
                       'order; move the code down the pipeline or the shared part up):\n' + '\n'.join(edges))


def test_a_planted_back_edge_is_found(tmp_path):
    "A copy of the package where 00_manifold's module imports 10_train's (inside a function) fails the check."
    import shutil
    pkg = tmp_path / 'magma'
    shutil.copytree(PKG, pkg, ignore=shutil.ignore_patterns('__pycache__', '*.txt'))
    src = pkg / 'manifold.py'
    late = '\n\ndef _late():\n    from .train import train\n    return train\n'
    src.write_text(src.read_text(encoding='utf-8') + late, encoding='utf-8')
    assert back_edges(pkg) == ['magma.manifold (00_manifold) -> magma.train (10_train)']
