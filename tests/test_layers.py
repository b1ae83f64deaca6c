"""The house rules, checked on the source: imports flow one way through the layers (DESIGN.md), with no
cycle; project modules are imported at module level (function-level imports only for optional or heavy
dependencies); no module uses another module's private names."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("refusal", "attacks", "analysis")
# lowest first; a module may import its own layer or lower ones, never a higher one
LAYERS = [
    {"refusal.errors", "refusal.config"},
    {"refusal.artifacts", "refusal.chat", "refusal.data", "refusal.suffix"},
    {"refusal.models"},
    {"refusal.engine", "refusal.decode"},  # the forward engine
    {"refusal.hooks", "refusal.activations"},
    {"refusal.metrics", "refusal.directions", "refusal.judges", "refusal.capability", "refusal.organism",
     "refusal.evaluation", "refusal.registry"},
    {"attacks.*", "analysis.*"},
    {"refusal.pipeline", "refusal.sweep"},
    {"refusal.cli"},
]
# what a function may import lazily: optional or heavy third-party packages
LAZY_OK = ("transformers", "nanogcg", "matplotlib", "seaborn", "scipy", "ray")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] != "__init__":
                out[".".join(parts)] = path
    return out


def rank(mod: str) -> int:
    for i, layer in enumerate(LAYERS):
        if mod in layer or f"{mod.split('.')[0]}.*" in layer:
            return i
    raise AssertionError(f"{mod} is in no layer of tests/test_layers.py: place it")


def imports(mod: str, path: Path) -> list[tuple[str, bool, list[str], int]]:
    """(imported module, at function level?, names, line) for every import in the module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")[: -node.level]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = [a.name for a in node.names]
            # `from refusal import artifacts` imports the module refusal.artifacts
            if target in PACKAGES:
                out += [(f"{target}.{n}", id(node) not in top, [], node.lineno) for n in names]
                continue
            out.append((target, id(node) not in top, names, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) not in top, [], node.lineno) for a in node.names]
    return out


def project_edges():
    mods = modules()
    edges = {}
    for mod, path in mods.items():
        edges[mod] = {t for t, _, _, _ in imports(mod, path) if t in mods}
    return mods, edges


def test_every_import_goes_down_the_layers():
    mods, edges = project_edges()
    bad = [f"{a} (layer {rank(a)}) imports {b} (layer {rank(b)})" for a in mods for b in edges[a] if rank(b) > rank(a)]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    mods, edges = project_edges()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m)


def test_function_level_imports_are_only_optional_or_heavy_packages():
    mods = modules()
    bad = []
    for mod, path in mods.items():
        for target, lazy, _, line in imports(mod, path):
            if lazy and target.split(".")[0] not in LAZY_OK:
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {target} inside a function")
    assert not bad, "\n".join(bad)


def test_no_library_module_imports_the_cli():
    mods, edges = project_edges()
    assert [m for m in mods if "refusal.cli" in edges[m]] == []


def _private_definitions(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_private_name_crosses_modules():
    mods = modules()
    trees = {m: ast.parse(p.read_text(encoding="utf-8")) for m, p in mods.items()}
    defined = {m: _private_definitions(t) for m, t in trees.items()}
    bad = []
    for mod, tree in trees.items():
        for target, _, names, line in imports(mod, mods[mod]):
            bad += [f"{mod}:{line}: imports {target}.{n}" for n in names if n.startswith("_") and target in mods]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                    and node.attr not in defined[mod]):
                owners = [m for m, names in defined.items() if m != mod and node.attr in names]
                if owners:
                    bad.append(f"{mod}:{node.lineno}: uses {node.attr}, private to {', '.join(owners)}")
    assert not bad, "\n".join(bad)


def test_only_the_hooks_module_registers_hooks():
    """Every hook goes through refusal.hooks.hooked (interventions are lists of Hook): no other module
    registers one on a model itself."""
    mods = modules()
    bad = [f"{m}" for m, p in mods.items() if m != "refusal.hooks"
           and ("register_forward_pre_hook" in p.read_text() or "register_forward_hook" in p.read_text())]
    assert bad == []
