"""The package's import graph: no circles, and no import from a lower layer up to a higher one.

Every module of ``python/fusedcomm`` is parsed (nothing is imported or run) and each of its
``import`` statements, at module level or inside a function, becomes an arrow to the module it
names. The layers, low to high:

0. common: ``_checks``, ``_logging``, ``_version``, ``envs``, ``enums``, ``mapping``,
   ``dlpack_utils`` and ``reference/`` (pure-torch definitions of every op, which depend on
   ``enums`` only);
1. ``jit/``: specs, builds and module loading;
2. ``runtime/``: workspaces, handles, peer memory, failure records;
3. ``ops/``: argument checks, registered torch ops and kernel calls;
4. frontends: the package itself and the sub-module paths engines import from;
5. ``testing/``, ``bench/``, ``cli``.

An arrow may stay inside a layer or point down. A new top-level module must be given a layer
here (the test fails until it is). Run ``python tests/test_layers.py`` to print the graph's
arrows that point up and its circles.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "python"
PACKAGE = "fusedcomm"

# folder (sub-package) -> layer
FOLDERS = {"reference": 0, "jit": 1, "runtime": 2, "ops": 3, "testing": 5, "bench": 5}
# top-level module -> layer
MODULES = {
    "_checks": 0,
    "_logging": 0,
    "_version": 0,
    "envs": 0,
    "enums": 0,
    "mapping": 0,
    "dlpack_utils": 0,
    "": 4,  # the package's __init__
    "warmup": 4,
    "trtllm_ar": 4,
    "trtllm_moe_alltoall": 4,
    "mnnvl": 4,
    "dcp_alltoall": 4,
    "trtllm_mnnvl_ar": 4,
    "mixed_comm": 4,
    "cli": 5,
    "__main__": 5,
}
LAYER_NAMES = ("common", "jit", "runtime", "ops", "frontends", "testing/bench/cli")


def modules() -> dict[str, tuple[pathlib.Path, bool]]:
    """Dotted name -> (file, is a package's __init__) for every module of the package."""
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join(parts)] = (path, is_package)
    return found


def _targets(name: str, is_package: bool, node: ast.AST, known: dict) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = name.split(".")[: None if is_package else -1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    # ``from pkg import mod`` names the module; ``from mod import name`` the module itself
    return [
        f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
        for alias in node.names
    ]


def edges() -> set[tuple[str, str, int]]:
    """(importer, imported module, line) for every import of one package module by another."""
    known = modules()
    found = set()
    for name, (path, is_package) in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(name, is_package, node, known):
                while target not in known and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in known and target != name:
                    found.add((name, target, node.lineno))
    return found


def layer(name: str) -> int | None:
    parts = name.split(".")[1:]
    if len(parts) >= 1 and parts[0] in FOLDERS:
        return FOLDERS[parts[0]]
    return MODULES.get(".".join(parts))


def upward() -> list[str]:
    """Each import from a lower layer to a higher one, as ``a (layer) -> b (layer), line``."""
    out = []
    for src, dst, line in sorted(edges()):
        if layer(src) < layer(dst):
            out.append(
                f"{src} ({LAYER_NAMES[layer(src)]}) -> {dst} ({LAYER_NAMES[layer(dst)]}), "
                f"line {line}"
            )
    return out


def circles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {}
    for src, dst, _ in edges():
        graph.setdefault(src, set()).add(dst)
        graph.setdefault(dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    missing = sorted(name for name in modules() if layer(name) is None)
    assert not missing, f"give these modules a layer in tests/test_layers.py: {missing}"


def test_no_import_points_up():
    found = upward()
    assert not found, "imports from a lower layer to a higher one:\n" + "\n".join(found)


def test_no_import_circles():
    found = circles()
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_graph_is_seen():
    # the parse finds arrows that exist (guards the checks above against an empty graph)
    seen = {(src, dst) for src, dst, _ in edges()}
    assert ("fusedcomm.jit.loader", "fusedcomm.envs") in seen
    assert ("fusedcomm.ops.allreduce_fusion", "fusedcomm.ops._fusion_launch") in seen
    assert ("fusedcomm", "fusedcomm.ops.moe_a2a") in seen


if __name__ == "__main__":
    print("\n".join(upward()) or "no import points up")
    print("\n".join(" <-> ".join(c) for c in circles()) or "no import circles")
