"""The package's layout (issue 16): no import cycles, ops/ below everything else, old module
paths that still work (with a warning), no module over 500 lines without a reason, and a
README whose layout section matches the tree.

Each check is a function over plain data (a graph, a text, a list of files) so that a test
can feed it a case that must fail, next to the run on the real package.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import subprocess
import sys
import warnings

import pytest

from hf_creative_sparse import _import_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.join(ROOT, "hf_creative_sparse")
PACKAGE = "hf_creative_sparse"
#: Public names of the release-0.1 modules (at commit fb444d4, before the package was
#: grouped by concern), written by `release01_public_names` (see the test that checks it).
RELEASE01_NAMES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "release01_names.json")
RELEASE01_COMMIT = "fb444d4"
#: Folders that are not the lower layers' business: ops/ imports none of them.
ABOVE_OPS = ("integrations", "calibration", "creative", "evaluation", "cli")
MAX_LINES = 500
#: Modules over MAX_LINES that this layout work may not edit, with why (the kernel work in
#: progress owns them; their split is that work's).
LONG_BY_OWNERSHIP: dict[str, str] = {}


# ---------------------------------------------------------------------------- the graph


def module_name(path: str) -> str:
    """``hf_creative_sparse/ops/config.py`` -> ``hf_creative_sparse.ops.config`` (a package's
    ``__init__.py`` is the package)."""
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def package_modules() -> dict[str, str]:
    """Module name -> file of every module under the package."""
    found = {}
    for folder, dirs, files in os.walk(PACKAGE_DIR):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                found[module_name(path)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(body: list[ast.stmt], *, at_import_time: bool) -> list[ast.stmt]:
    """The Import / ImportFrom statements of ``body``: with ``at_import_time`` only those that
    run when the module is imported (module level, inside module-level if / try / with,
    not under ``if TYPE_CHECKING:``); otherwise every one, function bodies included."""
    if not at_import_time:
        return [n for stmt in body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))]
    out: list[ast.stmt] = []
    for stmt in body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            out.append(stmt)
        elif isinstance(stmt, ast.If):
            if not _is_type_checking(stmt.test):
                out += _import_nodes(stmt.body, at_import_time=True)
            out += _import_nodes(stmt.orelse, at_import_time=True)
        elif isinstance(stmt, ast.Try):
            for block in (stmt.body, stmt.orelse, stmt.finalbody, *[h.body for h in stmt.handlers]):
                out += _import_nodes(block, at_import_time=True)
        elif isinstance(stmt, ast.With):
            out += _import_nodes(stmt.body, at_import_time=True)
    return out


def imported_modules(source: str, name: str, is_package: bool, known: set[str], *,
                     at_import_time: bool = True) -> set[str]:
    """Package modules that module ``name`` imports (relative imports resolved; ``from .x
    import y`` counts ``.x.y`` when that is a module, else ``.x``). Importing a submodule
    also runs its parent packages' ``__init__``, which counts too, except the importer's own
    packages (already being imported: a package's ``__init__`` importing its submodules is
    no cycle)."""
    tree = ast.parse(source)
    base = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _import_nodes(tree.body, at_import_time=at_import_time):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                parts = base.split(".")
                anchor = ".".join(parts[: len(parts) - (node.level - 1)])
                mod = f"{anchor}.{node.module}" if node.module else anchor
            else:
                mod = node.module or ""
            targets = [f"{mod}.{alias.name}" if f"{mod}.{alias.name}" in known else mod for alias in node.names]
        for target in targets:
            while target and target not in known:  # ``import a.b.c`` of a package-level name
                target = target.rpartition(".")[0]
            while target.startswith(PACKAGE):  # the target and the packages it runs first ...
                if target in known and not (name + ".").startswith(target + "."):  # ... but not ours
                    found.add(target)
                target = target.rpartition(".")[0]
    return found


def import_graph(*, at_import_time: bool = True) -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        with open(path, encoding="utf-8") as fh:
            graph[name] = imported_modules(fh.read(), name, path.endswith("__init__.py"), known,
                                           at_import_time=at_import_time)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as [a, b, ..., a], or None when it is acyclic (iterative DFS)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph.get(start, ()))))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return None


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond is no cycle


def test_imported_modules_resolves_relative_and_guarded_imports():
    known = {"hf_creative_sparse", "hf_creative_sparse.ops", "hf_creative_sparse.ops.config",
             "hf_creative_sparse.creative", "hf_creative_sparse.creative.control", "hf_creative_sparse.creative.moe",
             "hf_creative_sparse.evaluation", "hf_creative_sparse.evaluation.quality"}
    source = ("from typing import TYPE_CHECKING\n"
              "from ..ops.config import X\n"
              "from . import moe\n"
              "try:\n    import hf_creative_sparse.ops\nexcept ImportError:\n    pass\n"
              "if TYPE_CHECKING:\n    from ..evaluation import quality\n"
              "def f():\n    from ..evaluation import quality\n")
    found = imported_modules(source, "hf_creative_sparse.creative.control", False, known)
    assert found == {"hf_creative_sparse.ops.config", "hf_creative_sparse.ops", "hf_creative_sparse.creative.moe"}
    everywhere = imported_modules(source, "hf_creative_sparse.creative.control", False, known, at_import_time=False)
    assert everywhere == found | {"hf_creative_sparse.evaluation.quality", "hf_creative_sparse.evaluation"}


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 50 and graph["hf_creative_sparse.creative.wrapper"]  # the walk saw the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle at import time: " + " -> ".join(cycle)


def ops_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports from ops/ into the layers above it ('importer -> imported')."""
    above = tuple(f"{PACKAGE}.{p}" for p in ABOVE_OPS)
    return sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith(f"{PACKAGE}.ops")
                  for t in targets if t.startswith(above) and (t + ".").startswith(tuple(a + "." for a in above)))


def test_ops_imports_nothing_above_it_anywhere():
    graph = {"hf_creative_sparse.ops.masks": {"hf_creative_sparse.creative.control", "hf_creative_sparse.ops.config"}}
    assert ops_violations(graph) == ["hf_creative_sparse.ops.masks -> hf_creative_sparse.creative.control"]
    assert ops_violations(import_graph(at_import_time=False)) == []  # function-local imports included


# ------------------------------------------------------------------------- old module paths


def release01_public_names(source: str) -> list[str]:
    """Public names a release-0.1 module defined: functions, classes and assignments at
    module level, and names it imported from the package itself (``from .x import y``);
    not third-party imports, not names starting with an underscore."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom) and node.level:
            names.update((a.asname or a.name) for a in node.names)
    return sorted(n for n in names if not n.startswith("_"))


def _old_file(old: str) -> str:
    path = "hf_creative_sparse/" + old.replace(".", "/")
    return f"{path}/__init__.py" if old in ("commands",) else f"{path}.py"


def test_the_recorded_release01_names_are_those_of_the_commit():
    """The JSON the next test reads is what `release01_public_names` finds at fb444d4 (when
    the checkout has that commit), so the names cannot drift from the release."""
    try:
        subprocess.run(["git", "-C", ROOT, "cat-file", "-e", RELEASE01_COMMIT], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"no git history with commit {RELEASE01_COMMIT} (a shallow clone or an sdist)")
    with open(RELEASE01_NAMES, encoding="utf-8") as fh:
        recorded = json.load(fh)
    assert sorted(recorded) == sorted(_import_paths.MOVED_MODULES)
    for old in _import_paths.MOVED_MODULES:
        source = subprocess.run(["git", "-C", ROOT, "show", f"{RELEASE01_COMMIT}:{_old_file(old)}"], check=True,
                                capture_output=True, text=True).stdout
        assert recorded[old] == release01_public_names(source), old


def test_release01_public_names_reads_definitions_and_package_imports():
    source = ("import numpy as np\nfrom typing import Any\nfrom .control import SparsityConfig as SC\n"
              "X: int = 1\nY = 2\n_private = 3\ndef f(): pass\nclass C: pass\n")
    assert release01_public_names(source) == ["C", "SC", "X", "Y", "f"]


def test_every_old_module_path_warns_and_reaches_its_old_names():
    with open(RELEASE01_NAMES, encoding="utf-8") as fh:
        names = json.load(fh)
    for old, new in _import_paths.MOVED_MODULES.items():
        full = f"{PACKAGE}.{old}"
        sys.modules.pop(full, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(full)
        assert any(issubclass(w.category, DeprecationWarning) and full in str(w.message) for w in caught), old
        targets = _import_paths.new_module_names(old)
        if len(targets) == 1:
            assert module is importlib.import_module(targets[0]), old  # the same object: patching one patches both
        removed = _import_paths.REMOVED_NAMES.get(old, {})
        missing = [n for n in names[old] if n not in removed and not hasattr(module, n)]
        assert not missing, f"{full} lost {missing}"
        for name, replacement in removed.items():
            assert name in names[old], f"REMOVED_NAMES[{old!r}] names {name}, which the release did not have"
            with pytest.raises(AttributeError, match="was removed: use"):
                getattr(module, name)
        with pytest.raises(AttributeError):
            getattr(module, "no_such_name_in_any_release")


def test_an_alias_of_a_split_module_finds_each_name_where_it_went():
    from hf_creative_sparse.creative import models, processor, wrapper

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        generation = importlib.import_module(f"{PACKAGE}.generation")
    assert generation.CreativeSparseWrapper is wrapper.CreativeSparseWrapper
    assert generation.CreativeSparseLogitsProcessor is processor.CreativeSparseLogitsProcessor
    assert generation.load_model is models.load_model
    assert "control_warpers" in dir(generation)


def test_importing_the_package_warns_nothing_and_loads_no_torch():
    code = ("import sys, warnings\n"
            "warnings.simplefilter('error')\n"
            "import hf_creative_sparse\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'diffusers', 'matplotlib', 'numpy') if m in sys.modules)\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -------------------------------------------------------------------------------- sizes


def long_modules(files: dict[str, str], limit: int = MAX_LINES) -> list[str]:
    """Files (relative name -> text) over ``limit`` lines whose module docstring has no line
    starting with "One file because"."""
    out = []
    for rel, text in files.items():
        if text.count("\n") <= limit:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if not any(line.strip().startswith("One file because") for line in doc.splitlines()):
            out.append(f"{rel} ({text.count(chr(10))} lines)")
    return sorted(out)


def test_no_module_over_500_lines_without_its_reason():
    short, long_text = "x = 1\n", '"""Doc."""\n' + "x = 1\n" * 600
    reasoned = '"""Doc.\n\nOne file because it is one algorithm.\n"""\n' + "x = 1\n" * 600
    assert long_modules({"a.py": short, "b.py": long_text, "c.py": reasoned}) == ["b.py (601 lines)"]
    files = {}
    for name, path in package_modules().items():
        rel = os.path.relpath(path, PACKAGE_DIR).replace(os.sep, "/")
        if rel not in LONG_BY_OWNERSHIP:
            with open(path, encoding="utf-8") as fh:
                files[rel] = fh.read()
    assert long_modules(files) == []


# ------------------------------------------------------------------------------- README


def readme_layout_folders(readme: str) -> set[str]:
    """The package folders that README's "## Layout" block lists (indented ``name/``)."""
    section = readme.split("\n## Layout\n", 1)[1]
    block = section.split("```", 2)[1]
    return {m.group(1) for m in re.finditer(r"^ {2}([\w/]+?)/ ", block, re.M)}


def package_folders() -> set[str]:
    out = set()
    for folder, dirs, _ in os.walk(PACKAGE_DIR):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel = os.path.relpath(folder, PACKAGE_DIR)
        if rel != ".":
            out.add(rel.replace(os.sep, "/"))
    return out


def test_readme_layout_lists_the_package_folders():
    sample = "x\n## Layout\n\n```\npkg/   the package\n  ops/   kernels\n  ops/backends/   b\n```\n"
    assert readme_layout_folders(sample) == {"ops", "ops/backends"}
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        assert readme_layout_folders(fh.read()) == package_folders()


def dotted_paths(text: str) -> set[str]:
    """``hf_creative_sparse.a.b`` paths named in a text (trailing punctuation dropped)."""
    return {m.rstrip(".") for m in re.findall(r"\bhf_creative_sparse(?:\.\w+)+", text)}


def resolves_without_alias(path: str) -> bool:
    """Whether a dotted path names a module, or an attribute of one, without going through a
    deprecated release-0.1 path."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        mod = ".".join(parts[:cut])
        if mod[len(PACKAGE) + 1:] in _import_paths.MOVED_MODULES:
            return False
        try:
            obj = importlib.import_module(mod)
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("doc", ["README.md", "docs/DESIGN.md"])
def test_docs_name_current_module_paths(doc):
    assert not resolves_without_alias("hf_creative_sparse.quality.QualityFunctional")  # an old path is caught
    assert not resolves_without_alias("hf_creative_sparse.evaluation.nothing_here")
    with open(os.path.join(ROOT, doc), encoding="utf-8") as fh:
        text = fh.read()
    stale = sorted(p for p in dotted_paths(text) if not p.startswith(f"{PACKAGE}.patches")
                   and p not in (f"{PACKAGE}.csrc", f"{PACKAGE}._C_cpu", f"{PACKAGE}._C_cuda")
                   and not resolves_without_alias(p))
    assert stale == []
    files = re.findall(r"\bhf_creative_sparse/[\w/]+\.py\b", text)
    assert [f for f in files if not os.path.exists(os.path.join(ROOT, f))] == []
    folders = "|".join(sorted(p for p in package_folders() if "/" not in p))
    inside = re.findall(rf"(?<![\w/])((?:{folders})/[\w/]+\.py)\b", text)
    assert inside and [f for f in inside if not os.path.exists(os.path.join(PACKAGE_DIR, f))] == []
