"""The package's layout: sub-packages by concern whose imports only go down, and no import cycle.

Every `import`/`from ... import` of a vlmcache module counts, at module level or inside a function
(a lazy import is still a dependency); `if TYPE_CHECKING:` blocks count too, so a cycle cannot hide there.
"""

from __future__ import annotations

import ast
from pathlib import Path

import vlmcache

PACKAGE = Path(vlmcache.__file__).parent
# Lowest first: a module may import from its own layer (without a cycle) or from a layer listed before it.
LAYERS = ("errors", "files", "options", "progress", "distributed", "cache", "data", "encode", "metrics", "run", "align",
          "eval", "caption", "app")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The vlmcache modules a file imports (`from vlmcache.x import y` names module vlmcache.x.y if it is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("vlmcache"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlmcache") and not node.level:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module)
    return {name for name in found if name != "vlmcache"}  # the root holds only __version__ and the lazy API


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py") if path.name != "__main__.py"}
    known = set(files)
    return {name: imported_modules(path, known) & known for name, path in files.items() if name != "vlmcache"}


def test_every_module_sits_in_a_known_layer():
    assert all(module.split(".")[1] in LAYERS for module in graph())


def test_imports_only_go_down():
    upward = [f"{module} imports {target}" for module, targets in graph().items() for target in targets
              if layer(target) > layer(module)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1 while on the current path, 2 when done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                return [*path[path.index(target):], target] if target in path else [*path, target]
            if target not in state and (cycle := visit(target, [*path, target])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state:
            cycle = visit(module, [module])
            assert cycle is None, " -> ".join(cycle)


def test_a_planted_upward_import_and_cycle_are_caught(tmp_path, monkeypatch):
    """The checks above can fail: a fake tree with an upward import and a cycle trips both."""
    fake = tmp_path / "vlmcache"
    (fake / "cache").mkdir(parents=True)
    (fake / "app").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "cache" / "__init__.py").write_text("")
    (fake / "app" / "__init__.py").write_text("")
    (fake / "cache" / "store.py").write_text("from vlmcache.app.cli import main\n")
    (fake / "app" / "cli.py").write_text("def main():\n    from vlmcache.cache import store\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert "vlmcache.app.cli" in graph()["vlmcache.cache.store"]
    assert "vlmcache.cache.store" in graph()["vlmcache.app.cli"]
    assert layer("vlmcache.app.cli") > layer("vlmcache.cache.store")
