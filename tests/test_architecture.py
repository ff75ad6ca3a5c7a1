"""The house stays as docs/architecture.md draws it: rooms of one job, doors that show.

Read from the sources themselves (their syntax trees, nothing is imported): no import
cycle, no module over the size where it stops having one job, no module reaching into
another's private names or looking forksafe's own modules up at run time, and no
document citing one that is not in the repository.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess

from conftest import ROOT

PACKAGE = ROOT / "src" / "forksafe"
#: The most lines a module may have (docs/architecture.md: one job each).
MAX_LINES = 700
#: Modules whose job is reading *other threads'* frames.
FRAME_READERS = ("_frames.py", "_probes/")


def modules() -> dict[str, pathlib.Path]:
    """Dotted name -> path, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(path: pathlib.Path, name: str, known: set[str]) -> set[str]:
    """The package's modules ``name`` imports, anywhere in it (functions and
    ``TYPE_CHECKING`` blocks included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != name}


def test_the_import_graph_has_no_cycle() -> None:
    """No module imports, directly or not, a module that imports it back."""
    mods = modules()
    graph = {name: imports(path, name, set(mods)) for name, path in mods.items()}
    # The package itself only names its modules lazily (PEP 562): it is the root.
    graph["forksafe"] = set()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target):], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


def test_no_module_is_over_the_size_of_one_job() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_every_module_says_what_its_job_is() -> None:
    missing = [name for name, path in modules().items()
               if not ast.get_docstring(ast.parse(path.read_text()))]
    assert missing == []


def _own_modules(tree: ast.Module) -> set[str]:
    """Local names this module binds to forksafe's own modules (``from forksafe import _x``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("forksafe"):
            names.update(alias.asname or alias.name for alias in node.names
                         if alias.name.startswith("_") and not alias.name.startswith("__"))
        elif isinstance(node, ast.Import):
            names.update(alias.asname for alias in node.names
                         if alias.name.startswith("forksafe.") and alias.asname)
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_reaches_into_another_ones_private_names() -> None:
    """Neither ``_other._name`` nor ``getattr(_other, "_name")`` across forksafe's modules."""
    found = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        own = _own_modules(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in own and _private(node.attr)):
                found.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "getattr" and len(node.args) >= 2
                    and isinstance(node.args[1], ast.Constant)
                    and isinstance(node.args[1].value, str) and _private(node.args[1].value)
                    and isinstance(node.args[0], ast.Name) and node.args[0].id in own):
                found.append(f"{name}:{node.lineno}: getattr({node.args[0].id}, "
                             f"{node.args[1].value!r})")
    assert found == []


def test_no_module_looks_forksafe_up_in_sys_modules() -> None:
    """The seams are imports and the GuardLink, never ``sys.modules["forksafe..."]``."""
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            key = None
            if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "sys.modules":
                key = node.slice
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and ast.unparse(node.func.value) == "sys.modules" and node.args):
                key = node.args[0]
            if key is None:
                continue
            text = ast.unparse(key)
            if "forksafe" in text or "__name__" in text:
                found.append(f"{name}:{node.lineno}: sys.modules[{text}]")
    assert found == []


def test_only_the_frame_readers_read_frame_locals() -> None:
    """``f_locals`` of other threads' frames is the product's job; our own callers' never."""
    found = [f"{path.relative_to(PACKAGE)}:{number}"
             for path in modules().values()
             if not str(path.relative_to(PACKAGE)).startswith(FRAME_READERS)
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if "f_locals" in line]
    assert found == []


def test_no_file_cites_a_document_the_repository_does_not_hold() -> None:
    """The contracts live in the repository: nothing refers to design notes kept elsewhere."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    needles = ("DESIGN" + ".md", "STYLE" + ".md")
    offending = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".toml", ".txt", ".cfg", ".c", ".json", ""):
            continue
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        offending += [name for needle in needles if needle in text]
    assert offending == []
