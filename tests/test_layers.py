"""The layers of the house, read from the imports themselves: formats -> kernels -> models -> convert -> runtime.

No module imports from a layer above its own (lazy imports inside functions included), so there is no circle between
the folders. Inside runtime/ the engine side (the files at its top: engine, cache use, sampling, scheduler, the model
store) is below its wings — the measuring wing (measure/) and the server (server/), which do not import each other —
and the command line (cli/) stands on all of them. The engine, sampling, REPL and server never import the converter
(only the measuring wing — eval, compare, bench — the CLI's convert command, and the model store that converts what
is not a container)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("formats", "kernels", "models", "convert", "runtime")
MAY_USE_CONVERTER = {"store.py", "commands.py"}  # and the measuring wing, runtime/measure/


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "lowbit" and parts[1] in LAYERS else None


def test_no_import_runs_up_a_layer():
    upward = []
    for rank, layer in enumerate(LAYERS):
        files = sorted((ROOT / layer).rglob("*.py"))
        assert files, layer
        for f in files:
            for m in _imports(f):
                target = _layer(m)
                if target is not None and LAYERS.index(target) > rank:
                    upward.append(f"{f.relative_to(ROOT)} imports {m}")
    assert upward == []


RUNTIME_RANK = {"engine": 0, "measure": 1, "server": 1, "cli": 2}


def _runtime_part(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] != ["lowbit", "runtime"]:
        return None
    return parts[2] if len(parts) > 2 and parts[2] in RUNTIME_RANK else "engine"


def test_runtime_wings_stand_on_the_engine_side():
    offenders = []
    for f in sorted((ROOT / "runtime").rglob("*.py")):
        rel = f.relative_to(ROOT / "runtime")
        own = rel.parts[0] if len(rel.parts) > 1 else "engine"
        assert own in RUNTIME_RANK, f"{rel}: a runtime folder the layering does not know"
        for m in _imports(f):
            target = _runtime_part(m)
            if target is not None and target != own and RUNTIME_RANK[target] >= RUNTIME_RANK[own]:
                offenders.append(f"runtime/{rel} imports {m}")
    assert offenders == []


def test_the_engine_side_of_runtime_never_imports_the_converter():
    offenders = [
        f"{f.relative_to(ROOT)} imports {m}"
        for f in sorted((ROOT / "runtime").rglob("*.py"))
        if f.name not in MAY_USE_CONVERTER and f.parent.name != "measure"
        for m in _imports(f)
        if _layer(m) == "convert"
    ]
    assert offenders == []


def test_the_check_sees_imports():
    """The reader finds a known downward import (so an empty result above means something)."""
    assert "lowbit.formats.tokenizer" in _imports(ROOT / "runtime" / "engine.py")


# what models/ may take from kernels/: the ops objects, cache formats, and reading a float tensor (no kernel)
MODEL_KERNEL_IMPORTS = {
    ("lowbit.kernels.ops", "CpuOps"),
    ("lowbit.kernels.cuda.backend", "CudaOps"),
    ("lowbit.kernels", "kv_formats"),
    ("lowbit.kernels.kv_cache", "KVCache"),
    ("lowbit.kernels.kv_formats", "KVSpec"),
    ("lowbit.kernels.dispatch", "float_tensor"),
}


def test_models_choose_no_kernel_and_check_no_identity():
    """A model computes through its ops object: models/ imports no kernel module, has no identity checks on methods
    (``__func__``, ``type(self).x is ...``) and builds no classes at run time (``type(name, bases, ...)``)."""
    found = []
    for f in sorted((ROOT / "models").glob("*.py")):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lowbit.kernels"):
                found += [f"{f.name}: {node.module}.{a.name}" for a in node.names
                          if (node.module, a.name) not in MODEL_KERNEL_IMPORTS]
            elif isinstance(node, ast.Import):
                found += [f"{f.name}: {a.name}" for a in node.names if a.name.startswith("lowbit.kernels")]
            elif isinstance(node, ast.Attribute) and node.attr == "__func__":
                found.append(f"{f.name}: __func__")
            elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
                sides = [node.left, *node.comparators]
                if any(isinstance(s, ast.Attribute) and isinstance(s.value, ast.Call)
                       and getattr(s.value.func, "id", "") == "type" for s in sides):
                    found.append(f"{f.name}:{node.lineno}: type(...).method is ...")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "type" and len(
                    node.args) == 3:
                found.append(f"{f.name}:{node.lineno}: type(...)")
    assert found == []
