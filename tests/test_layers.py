"""The package's import graph, read from the source (ast; nothing is imported) and held to DESIGN.md's layers.

Layers, lowest first; a module may import its own component, any component of a lower layer, and a component of its
own layer only where that layer allows it (``free``: any, acyclic; or the listed pairs). A component is a top-level
module (``utils``) or subpackage (``erasure``); a subpackage's ``cli`` module is a command-line tool (top layer).

0. base: ``utils`` (helpers, the version, the optional-dependency list, ``flag_field``).
1. core (free): ``concepts``, ``config``, ``families``, ``masking``, ``objectives``, ``delta`` and the small modules
   beside them: ``saliency``, ``tokenizer``, ``data`` (classifier datasets), ``data_cache`` (cache keys),
   ``digits`` (the bundled digit world), ``hub``, ``lora``, ``runs``, ``testing`` (tiny test models),
   ``flow_matching`` (flow-matching noise/targets), ``provenance`` (environment records).
2. loaders (free): ``loaders``, ``pipelines`` (the erased pipelines, built on the loaders), ``export`` (single-file
   and kohya formats).
3. components: ``erasure``, ``attacks``, ``evaluation``, ``classification``, ``reporting``, ``methods`` (peer
   erasure methods); sideways only in this order: evaluation imports neither attacks nor erasure, attacks may import
   evaluation, methods may import attacks, erasure may import attacks, evaluation and methods, classification imports
   none of them.
4. facade: ``erase`` (the erasure run) and the package's ``__init__``.
5. command line: ``cli_args`` and every ``*/cli.py`` (``train_erase.py`` is outside the package, above it all).

Imports sit at module top; a function-local import is allowed only for a third-party module in
``salun_diffusers.utils.OPTIONAL_DEPENDENCIES`` (optional extras, heavy report/metric libraries). No import cycles
between modules.
"""

from __future__ import annotations

import ast
import os
import pathlib
import textwrap
from typing import Dict, List, Optional, Sequence, Set, Tuple

from salun_diffusers.utils import OPTIONAL_DEPENDENCIES

PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1] / "salun_diffusers"
COMPONENTS, SIDEWAYS, ROOT = "components", "sideways", "__init__"

LAYERS: List[dict] = [
    {"name": "base", COMPONENTS: {"utils"}, SIDEWAYS: "free"},
    {"name": "core", COMPONENTS: {"concepts", "config", "families", "masking", "objectives", "delta", "saliency",
                                  "tokenizer", "data", "data_cache", "digits", "hub", "lora", "runs", "testing",
                                  "flow_matching", "provenance"},
     SIDEWAYS: "free"},
    {"name": "loaders", COMPONENTS: {"loaders", "pipelines", "export"}, SIDEWAYS: "free"},
    {"name": "components", COMPONENTS: {"erasure", "attacks", "evaluation", "classification", "reporting", "methods"},
     SIDEWAYS: {("attacks", "evaluation"), ("erasure", "attacks"), ("erasure", "evaluation"), ("methods", "attacks"),
                ("erasure", "methods")}},
    {"name": "facade", COMPONENTS: {"erase", ROOT}, SIDEWAYS: "free"},
    {"name": "command line", COMPONENTS: {"cli_args", "cli"}, SIDEWAYS: "free"},
]


# ------------------------------------------------------------------------------------------------------ the checker
def module_name(path: pathlib.Path, package_dir: pathlib.Path) -> str:
    parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def component(module: str) -> str:
    """``pkg.erasure.data`` -> ``erasure``; ``pkg.attacks.cli`` -> ``cli``; ``pkg`` -> ``__init__``."""
    parts = module.split(".")[1:]
    if not parts:
        return ROOT
    return "cli" if parts[-1] == "cli" else parts[0]


def _imports(tree: ast.AST, module: str, is_package: bool, known: Set[str]):
    """``(line, target module or None for third party, top-level third-party name, inside a function)`` per import."""
    inside: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    package = module if is_package else module.rsplit(".", 1)[0]
    root = module.split(".")[0]
    for node in ast.walk(tree):
        local = id(node) in inside
        if isinstance(node, ast.Import):
            for alias in node.names:
                own = alias.name.split(".")[0] == root
                yield node.lineno, alias.name if own else None, alias.name.split(".")[0], local
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != root:
                yield node.lineno, None, target.split(".")[0], local
                continue
            # ``from . import x``: x may be a submodule (an edge to it) or a name of the package's __init__
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            for sub in subs or [target]:
                yield node.lineno, sub, None, local


def import_graph(package_dir: pathlib.Path) -> Tuple[Dict[str, Set[str]], List[str]]:
    """Module -> imported package modules, and the function-local imports that are not allowed."""
    files = {module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}
    graph: Dict[str, Set[str]] = {m: set() for m in files}
    problems = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        for line, target, third_party, local in _imports(tree, module, path.name == "__init__.py", set(files)):
            where = f"{path.relative_to(package_dir.parent)}:{line}"
            if local and (target is not None or third_party not in OPTIONAL_DEPENDENCIES):
                problems.append(f"{where}: function-local import of {target or third_party} (imports go at module "
                                "top; only utils.OPTIONAL_DEPENDENCIES may be imported where used)")
            if target is not None and target != module:
                graph[module].add(target)
    return graph, problems


def layer_of(comp: str, layers: Sequence[dict]) -> Optional[int]:
    return next((i for i, layer in enumerate(layers) if comp in layer[COMPONENTS]), None)


def layer_problems(graph: Dict[str, Set[str]], layers: Sequence[dict]) -> List[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        src = component(module)
        i = layer_of(src, layers)
        if i is None:
            problems.append(f"{module}: component {src!r} is on no layer (add it to LAYERS in tests/test_layers.py)")
            continue
        for target in sorted(targets):
            dst = component(target)
            j = layer_of(dst, layers)
            if dst == src or j is None:
                continue  # own component; an unplaced target is reported as a module of its own
            if j > i:
                problems.append(f"{module} imports {target}: up from layer {layers[i]['name']!r} to "
                                f"{layers[j]['name']!r}")
            elif j == i and layers[i][SIDEWAYS] != "free" and (src, dst) not in layers[i][SIDEWAYS]:
                problems.append(f"{module} imports {target}: sideways {src} -> {dst} is not allowed in layer "
                                f"{layers[i]['name']!r}")
    return problems


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                found.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def check_package(package_dir: pathlib.Path, layers: Sequence[dict] = LAYERS) -> List[str]:
    graph, problems = import_graph(package_dir)
    problems += layer_problems(graph, layers)
    problems += [f"import cycle: {' <-> '.join(scc)}" for scc in cycles(graph)]
    return problems


# -------------------------------------------------------------------------------------------------------- the tests
def test_the_package_keeps_its_layers_without_hidden_or_cyclic_imports():
    problems = check_package(PACKAGE_DIR)
    assert not problems, "\n".join(problems)


def test_every_module_is_on_a_layer():
    graph, _ = import_graph(PACKAGE_DIR)
    unplaced = sorted(m for m in graph if layer_of(component(m), LAYERS) is None)
    assert not unplaced


def _tree(tmp_path, files: Dict[str, str]) -> pathlib.Path:
    pkg = tmp_path / "salun_diffusers"
    for name, text in {"__init__.py": "", **files}.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return pkg


CLEAN = {"utils.py": "import os\n", "config.py": "from .utils import os\n",
         "erasure/__init__.py": "", "erasure/data.py": "from ..config import os\nfrom ..evaluation import gen\n",
         "evaluation/__init__.py": "from .gen import gen\n", "evaluation/gen.py": "gen = 1\n",
         "attacks/__init__.py": "from ..evaluation import gen\n", "erase.py": "from .erasure import data\n",
         "attacks/cli.py": "from ..erase import data\n",
         "erasure/report.py": "def plot():\n    import matplotlib\n"}


def test_the_checker_passes_a_clean_synthetic_tree(tmp_path):
    assert check_package(_tree(tmp_path, CLEAN)) == []


def test_the_checker_reports_a_planted_upward_import(tmp_path):
    problems = check_package(_tree(tmp_path, {**CLEAN, "concepts.py": "from .erasure import data\n"}))
    assert len(problems) == 1 and "salun_diffusers.concepts imports salun_diffusers.erasure.data: up from layer " \
        "'core' to 'components'" in problems[0]
    # the real package with the same import planted fails too
    copy = _tree(tmp_path / "copy", {})
    for src in PACKAGE_DIR.rglob("*.py"):
        dst = copy / src.relative_to(PACKAGE_DIR)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(src.read_text())
    masking = copy / "masking.py"
    masking.write_text(masking.read_text() + "\nfrom .erase import erase  # planted\n")
    assert any("salun_diffusers.masking imports salun_diffusers.erase: up" in p for p in check_package(copy))


def test_the_checker_reports_forbidden_sideways_local_and_cyclic_imports(tmp_path):
    planted = {
        "evaluation/gen.py": "from ..attacks import x\ngen = 1\n",  # evaluation may not import attacks
        "erasure/report.py": "def plot():\n    import json\n    from ..utils import os\n",  # local, not optional
        "concepts.py": "from .masking import m\n", "masking.py": "from .concepts import c\n",  # a cycle
    }
    problems = check_package(_tree(tmp_path, {**CLEAN, **planted}))
    text = "\n".join(problems)
    assert "sideways evaluation -> attacks is not allowed" in text
    assert "report.py:2: function-local import of json" in text
    assert "report.py:3: function-local import of salun_diffusers.utils" in text
    assert "import cycle: salun_diffusers.concepts <-> salun_diffusers.masking" in text
    assert "matplotlib" not in text  # an optional dependency, imported where used: allowed


def test_optional_dependencies_are_third_party_names():
    assert OPTIONAL_DEPENDENCIES == tuple(sorted(OPTIONAL_DEPENDENCIES))
    assert not any(os.path.exists(PACKAGE_DIR / f"{name}.py") for name in OPTIONAL_DEPENDENCIES)


def test_no_two_modules_define_the_same_public_name():
    """One public name, one meaning: a function or class defined at module top in two modules of the package would
    be two things under one name (the command-line entry points' ``main`` / ``parse_args`` are the same role in each
    tool and are allowed)."""
    allowed = {"main", "parse_args"}
    where: Dict[str, List[str]] = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                where.setdefault(node.name, []).append(str(path.relative_to(PACKAGE_DIR)))
    twice = {name: files for name, files in where.items() if len(files) > 1 and name not in allowed}
    assert not twice, f"public names defined in more than one module: {twice}"
