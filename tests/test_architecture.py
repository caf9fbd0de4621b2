"""The architecture rule import-linter cannot express: no module of lmforge uses a private name
(`_name`) of another module, whether imported (`from lmforge.x import _y`, relative too) or reached
through an imported module (`x._y`, `lmforge.x._y`). The layers and acyclic packages are
pyproject.toml's [tool.importlinter] contracts, which `make test` checks with lint-imports first."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "lmforge"


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_name_uses(package_dir: Path) -> list[str]:
    """`file:line module.name` for every private name of one module used by another, in file order."""
    top, root = package_dir.name, package_dir.parent

    def is_module(name: str) -> bool:
        path = root.joinpath(*name.split("."))
        return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()

    found: list[str] = []
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        me = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        here = me if parts[-1] == "__init__" else me.rpartition(".")[0]  # the package relative imports start from
        where = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        modules: dict[str, str] = {}  # a name bound to a module of the package -> that module
        uses: list[tuple[int, str]] = []

        def use(line: int, module: str, name: str) -> None:
            if module != me and is_private(name):
                uses.append((line, f"{where}:{line} {module}.{name}"))

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == top:
                        modules[a.asname or top] = a.name if a.asname else top
                        for i, part in enumerate(a.name.split(".")[1:], 1):  # a private module on the path
                            use(node.lineno, ".".join(a.name.split(".")[:i]), part)
            elif isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:
                    anchor = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                    source = ".".join(anchor + ([node.module] if node.module else []))
                if source.split(".")[0] != top:
                    continue
                for i, part in enumerate(source.split(".")[1:], 1):
                    use(node.lineno, ".".join(source.split(".")[:i]), part)
                for a in node.names:
                    if is_module(f"{source}.{a.name}"):
                        modules[a.asname or a.name] = f"{source}.{a.name}"
                    use(node.lineno, source, a.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and is_private(node.attr):
                chain, value = [], node.value
                while isinstance(value, ast.Attribute):
                    chain.insert(0, value.attr)
                    value = value.value
                if isinstance(value, ast.Name) and value.id in modules:
                    module = ".".join([modules[value.id], *chain])
                    if is_module(module):
                        use(node.lineno, module, node.attr)
        found += [text for _, text in sorted(uses, key=lambda u: u[0])]
    return found


def test_no_module_uses_a_private_name_of_another():
    offenders = private_name_uses(PACKAGE_DIR)
    assert not offenders, ("private names used outside their module (make them public with a good name, or move "
                           "them):\n" + "\n".join(offenders))


def test_the_scan_finds_each_kind_of_private_use(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '1'\n")
    (pkg / "a.py").write_text("_x = _y = _z = 1\nfrom pkg.a import _x\nprint(_y)\n")  # its own private names: fine
    (pkg / "sub" / "__init__.py").write_text("from .. import a\n")
    (pkg / "sub" / "_hidden.py").write_text("")
    (pkg / "sub" / "b.py").write_text(
        "import os\n"
        "from pkg import __version__, a\n"          # dunders and public names: fine
        "from pkg.a import _x\n"                     # line 3: imported
        "from ..a import _y as y\n"                  # line 4: imported relatively, under another name
        "import pkg.a as m\n"
        "print(m._z, a._x, a.__name__)\n"            # line 6: two through an imported module
        "import pkg\n"
        "print(pkg.a._y, os._exit, y._w)\n"          # line 8: through the package; os and objects: fine
        "from . import _hidden\n"                    # line 9: a private module
        "def f(obj):\n"
        "    from pkg import a as _a\n"              # a private alias of a public module: fine
        "    return obj._state, _a._z\n")            # line 12: but its private name is not
    assert private_name_uses(pkg) == [
        "pkg/sub/b.py:3 pkg.a._x", "pkg/sub/b.py:4 pkg.a._y", "pkg/sub/b.py:6 pkg.a._z", "pkg/sub/b.py:6 pkg.a._x",
        "pkg/sub/b.py:8 pkg.a._y", "pkg/sub/b.py:9 pkg.sub._hidden", "pkg/sub/b.py:12 pkg.a._z"]


FAMILY_NAMES = {"decoder", "encoder", "seq2seq", "decoder_classifier", "decoder_value"}


def family_switches(package_dir: Path, own: tuple[str, ...] = ()) -> list[str]:
    """`file:line` of every comparison with a model family's name outside models/ (the registry and
    the family files) and the `own` files (a family's interop module may name its own parts):
    callers ask the registry instead."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir)
        if rel.parts[0] == "models" or rel.as_posix() in own:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Compare):
                names = [c.value for c in [node.left, *node.comparators]
                         if isinstance(c, ast.Constant) and c.value in FAMILY_NAMES]
                names += [e.value for c in node.comparators if isinstance(c, (ast.Tuple, ast.List, ast.Set))
                          for e in c.elts if isinstance(e, ast.Constant) and e.value in FAMILY_NAMES]
                if names:
                    found.append(f"lmforge/{rel.as_posix()}:{node.lineno} {names[0]}")
    return found


def test_nobody_outside_the_registry_switches_on_family_names():
    from lmforge.models.registry import FAMILIES

    interop = tuple(f.interop.replace("lmforge.", "").replace(".", "/") + ".py" for f in FAMILIES.values() if f.interop)
    assert family_switches(PACKAGE_DIR, own=interop) == []


def test_the_family_switch_scan_finds_one(tmp_path):
    (tmp_path / "pkg" / "infer").mkdir(parents=True)
    (tmp_path / "pkg" / "infer" / "x.py").write_text('if model.family == "seq2seq":\n    pass\n'
                                                     'ok = kind in ("encoder", "other")\n')
    assert family_switches(tmp_path / "pkg") == ["lmforge/infer/x.py:1 seq2seq", "lmforge/infer/x.py:3 encoder"]
