"""The package's structure: no import cycles, a docstring on every module, the library apart from the programs."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import vsl

PACKAGE = Path(vsl.__file__).parent
#: The library: what a program builds on. None of it may import a program.
LIBRARY = ("vsl.config", "vsl.errors", "vsl.fileio", "vsl.logs", "vsl.precision", "vsl.device", "vsl.checkpoint",
           "vsl.losses", "vsl.metrics", "vsl.data", "vsl.models", "vsl.runtime", "vsl.rerank", "vsl.vision")
PROGRAMS = ("vsl.train", "vsl.evaluation", "vsl.distributed", "vsl.demo", "vsl.ablate", "vsl.retrieval", "vsl.serve",
            "vsl.extract", "vsl.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> Dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The package modules that ``name`` imports anywhere in its body (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one.
            targets = [f"{root}.{alias.name}" if f"{root}.{alias.name}" in known else root for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def import_graph() -> Dict[str, Set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert "vsl.data.vocab" in graph and "vsl.models.similarity" in graph
    assert cycles(graph) == []


def test_the_library_imports_no_program():
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith(LIBRARY):
            bad = sorted(t for t in targets if t.startswith(PROGRAMS))
            assert not bad, f"library module {name} imports programs {bad}"


def test_every_module_starts_with_a_paragraph_saying_what_it_owns():
    for name, path in modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc.split()) >= 5, f"{path} has no module docstring"


def program_of(name: str) -> str:
    """The program a module belongs to (``vsl.retrieval.index`` -> ``vsl.retrieval``), "" for the library."""
    for program in PROGRAMS:
        if name == program or name.startswith(program + "."):
            return program
    return ""


def public_names(package: str) -> Set[str]:
    """The names in a package's ``__all__`` (its ``__init__``), read without importing it."""
    tree = ast.parse(modules()[package].read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def cross_program_imports(name: str, path: Path, known: Set[str]):
    """``(target module, imported name or None)`` of each import of another program by ``name``."""
    own = program_of(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            pairs = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            root = ".".join(base[:len(base) - (node.level - 1)] + ([node.module] if node.module else [])) \
                if node.level else node.module or ""
            pairs = [(f"{root}.{a.name}", None) if f"{root}.{a.name}" in known else (root, a.name) for a in node.names]
        else:
            continue
        for target, imported in pairs:
            if target in known and program_of(target) and program_of(target) != own:
                yield target, imported


def test_a_program_uses_another_program_only_through_its_package_public_names():
    """A program may import another program only as ``from vsl.PROGRAM import NAME`` with NAME in that
    package's ``__all__``; its modules are its own. The one exception is the command table of
    ``vsl.cli``, which loads each command's module by name (``vsl.cli.COMMANDS``)."""
    mods = modules()
    known = set(mods)
    bad = []
    for name, path in mods.items():
        if not program_of(name) or name == "vsl.cli":
            continue
        for target, imported in cross_program_imports(name, path, known):
            if target not in PROGRAMS or (imported is not None and imported not in public_names(target)):
                bad.append(f"{name} imports {target}{'.' + imported if imported else ''}")
    assert not bad, bad
    from vsl.cli import COMMANDS

    for command, module, _ in COMMANDS:
        assert module in known and program_of(module), (command, module)
        text = mods[module].read_text()
        assert "def add_arguments(" in text and "def run(" in text, module


def test_the_checker_sees_a_back_door(tmp_path):
    known = {"vsl.retrieval", "vsl.retrieval.index", "vsl.serve", "vsl.serve.app"}
    fake = tmp_path / "app.py"
    fake.write_text("from ..retrieval.index import Index\nfrom ..retrieval import Index\nfrom . import app\n")
    assert list(cross_program_imports("vsl.serve.app", fake, known)) == [("vsl.retrieval.index", "Index"),
                                                                         ("vsl.retrieval", "Index")]


def test_no_source_file_is_over_600_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long


def test_public_api_is_importable_as_documented():
    import vsl.losses
    import vsl.metrics

    assert callable(vsl.load_checkpoint) and callable(vsl.build_model) and callable(vsl.preset)
    assert callable(vsl.losses.triplet_loss) and callable(vsl.losses.visual_semantic_loss)
    assert callable(vsl.metrics.i2t) and callable(vsl.metrics.t2i)
