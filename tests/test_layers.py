"""The layers of the house, read from the imports themselves: formats -> kernels -> models -> convert -> runtime.

No module imports from a layer above its own (lazy imports inside functions included), so there is no circle between
the folders; and the engine, sampling, REPL and server never import the converter (only runtime's measuring wing —
eval, compare, bench — the CLI's convert command, and the model store that converts what is not a container)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("formats", "kernels", "models", "convert", "runtime")
MAY_USE_CONVERTER = {"store.py", "evaluate.py", "compare.py", "compare_report.py", "bench.py", "bench_model.py",
                     "commands.py"}


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


def test_the_engine_side_of_runtime_never_imports_the_converter():
    offenders = [
        f"{f.relative_to(ROOT)} imports {m}"
        for f in sorted((ROOT / "runtime").rglob("*.py"))
        if f.name not in MAY_USE_CONVERTER
        for m in _imports(f)
        if _layer(m) == "convert"
    ]
    assert offenders == []


def test_the_check_sees_imports():
    """The reader finds a known downward import (so an empty result above means something)."""
    assert "lowbit.formats.tokenizer" in _imports(ROOT / "runtime" / "engine.py")
