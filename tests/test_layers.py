"""The import layers of the tree (docs: reference/architecture.md): every arrow the architecture forbids fails here.

Imports are read with ``ast`` from every module of hsc_fast/, kernels/ and launch/, including the
lazy ones inside functions, so a deferred import cannot hide an arrow. Each module belongs to one
layer; ``ALLOWED`` lists the layers it may import. Module-level cycles are forbidden everywhere.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

LEAVES = {"hsc_fast", "hsc_fast.errors", "hsc_fast.config", "hsc_fast.distributed", "hsc_fast.checkpoint",
          "hsc_fast.precision", "hsc_fast.io", "hsc_fast.registry", "hsc_fast.classes"}
# Old `python -m hsc_fast.<x>` paths, kept one release; they may only forward to cli/.
ALIASES = {"hsc_fast.shard", "hsc_fast.synth", "hsc_fast.evaluate", "hsc_fast.doctor", "hsc_fast.report"}
PACKAGES = ("data", "models", "ops", "crf", "losses", "eval", "engine", "cli")

BELOW_ENGINE = {"leaf", "data", "models", "losses", "ops", "crf", "eval"}
ALLOWED = {
    "leaf": {"leaf"},
    "kernels": {"kernels"},                      # and hsc_fast.errors: kernels know nothing else of hsc_fast
    "data": {"leaf", "data"},
    "models": {"leaf", "models"},
    "ops": {"leaf", "ops", "kernels"},
    "crf": {"leaf", "crf", "ops", "kernels"},
    "losses": {"leaf", "losses", "ops", "crf"},
    "eval": {"leaf", "eval", "data", "models", "crf"},
    "engine": BELOW_ENGINE | {"engine"},
    "cli": BELOW_ENGINE | {"engine", "cli", "kernels"},
    "alias": {"cli"},
    "launch": {"cli"},
}
LAZY_ONLY = {("ops", "kernels"), ("crf", "kernels")}  # kernels load when a kernel runs, never on import


def layer_of(module: str) -> str:
    """The layer a dotted module name belongs to."""
    if module in LEAVES:
        return "leaf"
    if module in ALIASES:
        return "alias"
    head = module.split(".")
    if head[0] in ("kernels", "launch"):
        return head[0]
    if head[0] == "hsc_fast" and len(head) > 1 and head[1] in PACKAGES:
        return head[1]
    raise AssertionError(f"{module}: not in any layer (add it to a package or to LEAVES)")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, module: str, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, lazy) for every import of ours in ``path``; ``from pkg import mod`` resolved."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] in ("hsc_fast", "kernels", "launch"):
                found.append((t, node.lineno, id(node) not in top_level))
    return found


def collect(root: Path) -> dict[str, tuple[Path, list]]:
    files = [p for d in ("hsc_fast", "kernels", "launch") for p in sorted((root / d).rglob("*.py"))]
    known = {module_name(p, root) for p in files}
    return {module_name(p, root): (p, imports_of(p, module_name(p, root), known)) for p in files}


def violations(root: Path) -> list[str]:
    """Every forbidden arrow, as 'file:line: a (layer) -> b (layer)'."""
    graph = collect(root)
    bad = []
    for mod, (path, imps) in graph.items():
        src = layer_of(mod)
        for target, line, lazy in imps:
            dst = layer_of(target)
            where = f"{path.relative_to(root)}:{line}: {mod} ({src}) -> {target} ({dst})"
            ok = target == "hsc_fast.errors" if src == "kernels" and dst != "kernels" else dst in ALLOWED[src]
            if not ok:
                bad.append(where)
            elif (src, dst) in LAZY_ONLY and not lazy:
                bad.append(where + " (must be a lazy import inside a function)")
    return bad


def cycles(root: Path) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), lazy imports included."""
    graph = {m: sorted({t for t, _, _ in imps if t in collect_cache(root) and t != m})
             for m, (_, imps) in collect_cache(root).items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


_CACHE: dict = {}


def collect_cache(root: Path):
    if root not in _CACHE:
        _CACHE[root] = collect(root)
    return _CACHE[root]


def test_every_module_sits_in_a_layer():
    for mod in collect_cache(REPO):
        layer_of(mod)  # raises, naming the module, when it is in none


def test_no_forbidden_arrow():
    assert violations(REPO) == []


def test_no_import_cycle():
    assert cycles(REPO) == []


def test_argparse_only_in_cli():
    offenders = []
    for mod, (path, _) in collect_cache(REPO).items():
        if mod.startswith("hsc_fast.") and layer_of(mod) not in ("cli", "alias"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) else []
                if "argparse" in names:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_each_kernel_pairs_with_an_op_module():
    """kernels/<op>.py (a Triton op) has hsc_fast/ops/<op>.py: spec, torch reference, dispatch."""
    ops = {p.stem for p in (REPO / "hsc_fast" / "ops").glob("*.py")}
    def defines_a_triton_kernel(path: Path) -> bool:
        return any(isinstance(n, ast.FunctionDef) and any(ast.unparse(d).startswith("triton.jit") for d in n.decorator_list)
                   for n in ast.parse(path.read_text()).body)

    kernel_files = [k for k in (REPO / "kernels").glob("*.py") if defines_a_triton_kernel(k)]
    assert {k.stem for k in kernel_files} == {"roi_pool", "topk_proto", "psc"}
    for k in kernel_files:
        assert k.stem in ops, f"kernels/{k.name} has no hsc_fast/ops/{k.name}"


@pytest.mark.parametrize("planted, expected", [
    ("from hsc_fast.engine import loop\n", "hsc_fast.data.bad (data) -> hsc_fast.engine"),
    ("def f():\n    from hsc_fast.cli import common\n", "hsc_fast.data.bad (data) -> hsc_fast.cli"),
])
def test_checker_catches_planted_arrows(tmp_path, planted, expected):
    """The checker itself: a forbidden arrow planted in a copy of the layout is reported, lazy or not."""
    for d in ("hsc_fast/data", "hsc_fast/engine", "hsc_fast/cli", "kernels", "launch"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "__init__.py").write_text("")
    (tmp_path / "hsc_fast/__init__.py").write_text("")
    (tmp_path / "hsc_fast/engine/loop.py").write_text("from hsc_fast.data import bad\n")
    (tmp_path / "hsc_fast/cli/common.py").write_text("")
    (tmp_path / "hsc_fast/data/bad.py").write_text(planted)
    found = violations(tmp_path)
    assert len(found) == 1 and expected in found[0]
    if "engine" in expected:
        assert cycles(tmp_path) == [["hsc_fast.data.bad", "hsc_fast.engine.loop"]]


def test_kernel_imported_eagerly_by_ops_is_reported(tmp_path):
    for d in ("hsc_fast/ops", "kernels", "launch"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "__init__.py").write_text("")
    (tmp_path / "hsc_fast/__init__.py").write_text("")
    (tmp_path / "kernels/psc.py").write_text("from hsc_fast.errors import HscError\n")
    (tmp_path / "hsc_fast/errors.py").write_text("")
    (tmp_path / "hsc_fast/ops/psc.py").write_text("from kernels import psc\n")
    assert [v.endswith("(must be a lazy import inside a function)") for v in violations(tmp_path)] == [True]
