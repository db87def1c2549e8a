"""The package's layers import only downward, and no modules import each other in a cycle."""

from __future__ import annotations

from hatchling.stages import PACKAGE, module_imports

# Lowest first; a unit may import itself and the units of lower layers only (peers in one layer may not
# import each other). The README's Layout section describes each.
LAYERS: list[set[str]] = [
    {"errors", "malloc"},
    {"io"},
    {"sandbox", "tracking", "context", "stats"},
    {"model"},
    {"data"},
    {"tasks"},
    {"checkpoint"},
    {"inference"},
    {"train", "eval", "registry"},
    {"export", "research"},
    {"config"},
    {"stages"},
    {"doctor"},
    {"cli"},
    {"__main__"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None         # None: the package's own __init__ (version only)


def test_every_unit_has_a_layer():
    assert {_unit(m) for m in _modules()} - {None} == set(RANK)


def test_layers_import_only_downward():
    upward = []
    for module in _modules():
        for imported in module_imports(module):
            a, b = _unit(module), _unit(imported)
            if a is not None and b is not None and a != b and RANK[b] >= RANK[a]:
                upward.append(f"{module} -> {imported}")
    assert not upward, "imports that do not go down a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = {m: sorted(module_imports(m)) for m in _modules()}
    state: dict[str, int] = {}           # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in graph.get(module, []):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)
