"""The package reads as the pipeline: commands on top, stage packages below, and rules the code keeps.

Read from the source (no import of the package): the import graph at any depth (module level and
inside functions), which must have no cycle and no command importing another command; function-local
imports only with a `# lazy:` reason; no re-export shims; renames into place only through files.py.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "zhtrain"
STAGES = {"tokenizer", "data", "model", "training", "distributed", "weights"}
SUPPORT = {"__init__", "__main__", "cli", "errors", "files"}
# The demo is a script over the commands, run as a user runs them: it may import them (lazily).
DRIVERS = {"zhtrain.demo"}
# Renames that are not "write aside, then replace": each names why (see files.write_aside).
OTHER_RENAMES = {
    "data/text.py": "a token cache file is named by its content digest, known only once written",
    "weights/hf_folder.py": "shards renamed model-0000i-of-0000N once N is known, inside a write-aside folder",
    "distributed/sharded.py": "a full model's files moved one by one into an output folder that also holds checkpoints",
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """module -> package modules it imports (any depth); and the function-local imports (module, line, text)."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    local: list[tuple[str, int, str]] = []
    for name, path in modules.items():
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        inside_functions = {
            id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found = set()
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    found.add(target)
            if not found:
                continue
            edges[name] |= found
            if id(node) in inside_functions:
                local.append((name, node.lineno, " ".join(source.splitlines()[node.lineno - 1 : node.end_lineno])))
    return edges, local


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def command_modules() -> set[str]:
    """The modules `zhtrain <command>` dispatches to, read from cli.COMMANDS."""
    tree = ast.parse((SRC / "cli.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "COMMANDS":
            return {value.elts[0].value for value in node.value.values}
    raise AssertionError("cli.py has no COMMANDS table")


def command_edges(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    commands = command_modules()
    return sorted((a, b) for a in commands - DRIVERS for b in edges.get(a, ()) if b in commands)


def test_no_import_cycle_at_any_depth():
    edges, _ = import_graph(SRC)
    assert cycles(edges) == []


def test_commands_never_import_commands():
    edges, _ = import_graph(SRC)
    assert command_edges(edges) == []


def test_the_checks_see_a_planted_cycle_and_a_command_importing_a_command(tmp_path):
    """The two checks above can fail: on a copy of the package with one function-local import added
    to each, they report exactly those."""
    copy = tmp_path / "zhtrain"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(
        copy / "errors.py", "a", encoding="utf-8"
    ) as handle:  # errors <- files already; files -> errors is planted
        handle.write("\n\ndef planted():\n    from zhtrain.files import write_aside  # lazy: planted\n")
    with open(copy / "merge.py", "a", encoding="utf-8") as handle:
        handle.write("\n\ndef planted():\n    from zhtrain.generate import generate  # lazy: planted\n")
    edges, _ = import_graph(copy)
    assert ["zhtrain.errors", "zhtrain.files"] in cycles(edges)
    assert ("zhtrain.merge", "zhtrain.generate") in command_edges(edges)


def test_function_local_imports_say_why():
    _, local = import_graph(SRC)
    unexplained = [f"{m}:{line}: {text.strip()}" for m, line, text in local if "# lazy:" not in text]
    assert unexplained == []


def test_top_level_holds_the_commands_and_the_stage_packages():
    commands = {m.split(".")[1] for m in command_modules()}
    files = {p.stem for p in SRC.glob("*.py")}
    folders = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert files - commands - SUPPORT == set()
    assert folders - STAGES - commands == set()
    assert STAGES <= folders


def test_no_reexport_shims():
    shims = [
        f"{p.relative_to(SRC)}:{i}"
        for p in SRC.rglob("*.py")
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if "noqa: F401" in line
    ]
    assert shims == []


def test_renames_into_place_go_through_files_py():
    """One write-aside-then-rename implementation (files.write_aside); the few other renames say why."""
    renaming = {
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if p.name != "files.py"
        and any(call in p.read_text(encoding="utf-8") for call in ("os.replace(", "os.rename(", ".rename("))
    }
    assert renaming == set(OTHER_RENAMES)


@pytest.mark.parametrize("prefix", ["check_"])
def test_check_functions_assign_nothing_they_are_given(prefix):
    """A function named check_* changes nothing: no assignment to an attribute or item of a parameter."""
    offenders = []
    for path in SRC.rglob("*.py"):
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(fn, ast.FunctionDef) or not fn.name.startswith(prefix):
                continue
            params = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
            for node in ast.walk(fn):
                targets = (
                    node.targets
                    if isinstance(node, ast.Assign)
                    else [node.target]
                    if isinstance(node, (ast.AugAssign, ast.AnnAssign))
                    else []
                )
                for target in targets:
                    root = target
                    while isinstance(root, (ast.Attribute, ast.Subscript)):
                        root = root.value
                    if root is not target and isinstance(root, ast.Name) and root.id in params:
                        offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {fn.name}")
    assert offenders == []
