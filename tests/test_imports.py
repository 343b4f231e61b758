"""The package's import graph (function-local imports included, read with ast): no cycle, and the
layering DESIGN.md §5 and §8 promise.

    .venv/bin/pytest -q tests/test_imports.py
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rlhf_cli"
# third-party packages that cost start-up time (torch alone is seconds): a function-local import of a
# project module is there for start-up speed only if it brings one of these that its importer lacks
HEAVY = {"torch", "transformers", "peft", "hydra", "omegaconf", "safetensors", "datasets", "matplotlib", "tokenizers"}


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


@functools.cache  # heavy_at_start follows every module's imports from every module: parse each file once
def imports_of(module: str) -> tuple[tuple[str, bool, int, str], ...]:
    """-> (imported name, inside a function?, line, names imported from it) for every import in the module."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in local, node.lineno, "") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:  # `from pkg import module` imports the module; `from module import name` the module
                target = f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                found.append((target, id(node) in local, node.lineno, a.name))
    return tuple(found)


def project_edges(include_local: bool = True) -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for m in MODULES:
        for target, is_local, _, _ in imports_of(m):
            if target in MODULES and target != m and (include_local or not is_local):
                if not (MODULES[m].name == "__init__.py" and target.startswith(m + ".")):
                    graph[m].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_counting_function_local_imports():
    cycle = find_cycle(project_edges(include_local=True))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_algorithms_import_nothing_else_from_the_project():
    for m in MODULES:
        if m.startswith("rlhf_cli.algorithms"):
            bad = {t for t, *_ in imports_of(m) if t.startswith("rlhf_cli") and not t.startswith("rlhf_cli.algorithms")}
            assert not bad, f"{m} imports {bad}: algorithms/ is pure tensor math"


@pytest.mark.parametrize("tool", ["rlhf_cli.commands.evaluate", "rlhf_cli.commands.validate", "rlhf_cli.commands.plot", "rlhf_cli.commands.generate",
                                  "rlhf_cli.commands.label", "rlhf_cli.commands.label_page"])
def test_tools_never_import_a_stage_the_cli_or_private_names(tool):
    for target, _, line, name in imports_of(tool):
        assert not target.startswith("rlhf_cli.stages"), f"{tool}:{line} imports the stage {target}"
        assert target != "rlhf_cli.cli", f"{tool}:{line} imports the dispatcher"
        if target.startswith("rlhf_cli"):
            assert not name.startswith("_"), f"{tool}:{line} imports the private {target}.{name}"


def heavy_at_start(module: str, seen=None) -> set[str]:
    """The HEAVY packages importing `module` loads (its top-level imports, followed through the project)."""
    seen = set() if seen is None else seen
    if module in seen:
        return set()
    seen.add(module)
    out = set()
    for target, is_local, _, _ in imports_of(module):
        if is_local:
            continue
        if target in MODULES:
            out |= heavy_at_start(target, seen)
        elif target.split(".")[0] in HEAVY:
            out.add(target.split(".")[0])
    if module.count(".") > 1:  # importing rlhf_cli.stages.rl first imports rlhf_cli.stages
        out |= heavy_at_start(module.rpartition(".")[0], seen)
    return out


def test_function_local_imports_of_the_project_are_for_start_up_speed_only():
    """A local import of a project module must defer something heavy its importer does not load at start-up;
    otherwise it belongs at the top of the file (a local import is never there to hide a cycle)."""
    needless = []
    for m in MODULES:
        mine = heavy_at_start(m)
        for target, is_local, line, _ in imports_of(m):
            if is_local and target in MODULES and not (heavy_at_start(target) - mine):
                needless.append(f"{MODULES[m].relative_to(PACKAGE.parent)}:{line} {target}")
    assert not needless, "function-local imports that defer nothing heavy:\n" + "\n".join(needless)


def test_the_config_names_every_rollout_engine():
    """config.ENGINE_NAMES (checked while composing, no model code imported) = rollout.ENGINES' keys."""
    from rlhf_cli.config import ENGINE_NAMES
    from rlhf_cli.engines.rollout import ENGINES

    assert tuple(ENGINES) == ENGINE_NAMES


def code_map_paths(readme: str) -> set[str]:
    """The README code map's paths (no .py): a row's first path names its folder (its directory, or itself when it
    ends in /); the bare names after it, in either column, sit in that folder. A folder itself ends in /."""
    import re

    section = readme[readme.index("## Code map"):readme.index("## Docs")]
    listed = set()
    for cell in re.findall(r"^\| (.+) \|$", section, re.M):
        folder = None
        for name in re.findall(r"`([^`]+)`", cell):
            if name.startswith("rlhf_cli/"):
                folder = name if name.endswith("/") else name.rpartition("/")[0] + "/"
                path = name
            elif folder is not None and re.fullmatch(r"[\w/]+(\.py|/)", name):
                path = folder + name
            else:
                continue
            listed.add(path.removesuffix(".py"))
    return listed


def test_the_readme_code_map_names_every_module_and_no_other():
    """Every module of rlhf_cli/ and its subpackages is in the README's code map (a subpackage whose folder alone
    is listed, none of its modules, counts as listed whole: algorithms/, tasks/), and every path there exists."""
    listed = code_map_paths((PACKAGE.parent / "README.md").read_text())
    root = PACKAGE.parent
    packages = {p.parent for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE}
    modules = {str(p.relative_to(root).with_suffix("")) for p in PACKAGE.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py") or p.name == "__init__.py" and defines(p)}
    whole = {f"{p.relative_to(root)}/" for p in packages} & listed
    whole = {w for w in whole if not any(m.startswith(w) for m in listed if not m.endswith("/"))}
    missing = {m for m in modules if m not in listed and not any(m.startswith(w) for w in whole)}
    missing |= {f"{p.relative_to(root)}/" for p in packages if p.parent == PACKAGE} - {
        m if m.endswith("/") else m.rpartition("/")[0] + "/" for m in listed}
    assert not missing, f"not in the README's code map: {sorted(missing)}"
    stale = {m for m in listed if not ((root / m).is_dir() if m.endswith("/") else (root / f"{m}.py").is_file())}
    assert not stale, f"in the code map but not in the package: {sorted(stale)}"


def defines(path: Path) -> bool:
    """A module that defines a function or class (a package's __init__ that is a module of its own)."""
    return any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in ast.parse(path.read_text()).body)


def test_the_code_map_reader_sees_a_missing_module():
    readme = "## Code map\n| `rlhf_cli/rl/` | `actors.py`: x; `rollout_side.py`: y |\n| `rlhf_cli/cli.py`, `errors.py` | z |\n## Docs"
    assert code_map_paths(readme) == {"rlhf_cli/rl/", "rlhf_cli/rl/actors", "rlhf_cli/rl/rollout_side",
                                      "rlhf_cli/cli", "rlhf_cli/errors"}
