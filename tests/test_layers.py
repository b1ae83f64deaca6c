"""The house rules, checked on the source: imports flow one way through the layers (DESIGN.md), with no
cycle; project modules are imported at module level (function-level imports only for optional or heavy
dependencies); no module uses another module's private names."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("refusal", "attacks", "analysis")
# lowest first; a module may import its own layer or lower ones, never a higher one. The core library
# (refusal.*), then attacks.* and analysis.* (which do not import each other), then the application
# (refusal.app.*), its CLI last. refusal/__init__.py, the package's public face, is no module here: it
# registers the application's named models with the core's load_model.
LAYERS = [
    {"refusal.errors", "refusal.config"},
    {"refusal.artifacts", "refusal.chat", "refusal.data",
     "refusal.judges.base", "refusal.judges.substring", "refusal.judges.lexicon", "refusal.judges.degenerate"},
    {"refusal.models"},
    {"refusal.hardware", "refusal.engine", "refusal.decode", "refusal.recipe", "refusal.judges.embedder", "refusal.judges.hf"},
    {"refusal.hooks", "refusal.activations", "refusal.suffix", "refusal.jailbreaks",
     "refusal.judges.strict", "refusal.judges.load", "refusal.judges.files"},
    {"refusal.metrics", "refusal.rdo", "refusal.directions", "refusal.capture", "refusal.registry"},
    {"refusal.capability", "refusal.organism", "refusal.heads", "refusal.ablation", "refusal.harmfulness",
     "refusal.subspace"},
    {"refusal.success", "refusal.methods"},
    {"attacks.*", "analysis.*"},
    {"refusal.app.models", "refusal.app.plots", "refusal.app.evaluation", "refusal.app.attack", "refusal.app.bench",
     "refusal.app.bench_figures",
     "refusal.app.analyze", "refusal.app.reproduce"},
    {"refusal.app.pipeline"},
    {"refusal.app.sweep.config", "refusal.app.sweep.grid", "refusal.app.sweep.tasks", "refusal.app.sweep.runners",
     "refusal.app.sweep.run", "refusal.app.sweep.gather"},
    {"refusal.app.abliterate"},
    {"refusal.app.options", "refusal.app.cli", "refusal.app.configs"},
]
# what a function may import lazily: optional or heavy third-party packages, and the organism's training
# code, which only building the organism needs (loading a model never imports it)
LAZY_OK = ("transformers", "nanogcg", "matplotlib", "seaborn", "scipy", "ray", "peft", "optuna", "refusal.organism")


@functools.cache
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
        if mod in layer or (f"{mod.split('.')[0]}.*" in layer and not mod.startswith("refusal.")):
            return i
    raise AssertionError(f"{mod} is in no layer of tests/test_layers.py: place it")


def subpackages() -> dict[str, dict[str, str]]:
    """{package below the top level (refusal.judges): {name it exports: the module that defines it}}, read off
    its __init__.py's `from .module import names`."""
    out = {}
    for init in sorted(ROOT.glob("*/*/__init__.py")):
        pkg = ".".join(init.parent.relative_to(ROOT).parts)
        if pkg.split(".")[0] not in PACKAGES:
            continue
        names = {}
        for node in ast.parse(init.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                names.update({a.asname or a.name: f"{pkg}.{node.module}" for a in node.names})
        out[pkg] = names
    return out


SUBPACKAGES = subpackages()


def imports(mod: str, path: Path) -> list[tuple[str, bool, list[str], int]]:
    """(imported module, at function level?, names, line) for every import in the module; a name imported
    from a subpackage (refusal.judges) counts as an import of the module there that defines it."""
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
            if target in PACKAGES or target in SUBPACKAGES and all(f"{target}.{n}" in modules() for n in names):
                out += [(f"{target}.{n}", id(node) not in top, [], node.lineno) for n in names]
                continue
            if target in SUBPACKAGES:
                defined = SUBPACKAGES[target]
                for n in names:
                    out.append((defined.get(n, target), id(node) not in top, [n], node.lineno))
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
            if lazy and target.split(".")[0] not in LAZY_OK and target not in LAZY_OK:
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {target} inside a function")
    assert not bad, "\n".join(bad)


def test_attacks_and_analysis_do_not_import_each_other():
    mods, edges = project_edges()
    bad = [f"{a} imports {b}" for a in mods for b in edges[a]
           if {a.split(".")[0], b.split(".")[0]} == {"attacks", "analysis"}]
    assert not bad, "\n".join(bad)


def test_loading_a_model_never_imports_the_organisms_training_code(tiny_dirs, tmp_path):
    """`refusal.load_model("organism")` finds a cached build of the code's recipe without the training code
    (refusal.organism), which only building needs."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from dataclasses import asdict

    from refusal.recipe import OrganismConfig

    folder = tmp_path / "organism" / "seed-0"
    shutil.copytree(tiny_dirs["llama"], folder)
    (folder / "organism.json").write_text(json.dumps({"config": asdict(OrganismConfig())}))
    code = ("import sys, refusal; cm = refusal.load_model('organism'); "
            "print(cm.n_layers, 'refusal.organism' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "REFUSAL_LAB_CACHE": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "False"


def test_no_library_module_imports_the_cli():
    mods, edges = project_edges()
    assert [m for m in mods if "refusal.app.cli" in edges[m]] == []


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
