"""`lowbit compare` output: the markdown table, results.csv/.json/.md and the Pareto plot (bits per weight against KL
divergence and perplexity), all written atomically. The plot needs matplotlib (the ``plot`` extra); without it the
other files are still written."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lowbit.convert.converter import ConvertOptions
from lowbit.runtime.measure.evaluate import EvalResult

if TYPE_CHECKING:
    from lowbit.runtime.measure.compare import Row

log = logging.getLogger(__name__)

CSV_COLUMNS = ("label", "method", "bits", "group", "status", "bpw", "bpw_matrices", "file_bytes", "ppl",
               "delta_ppl_pct", "kl_mean", "kl_p99", "kl_max", "top1", "tokens", "windows", "convert_seconds",
               "eval_seconds", "decode_tps", "error")
FILES = {"json": "results.json", "csv": "results.csv", "md": "results.md", "png": "pareto.png"}


# ------------------------------------------------------------------------------------------------ text formats
def document(source: str, text: str, eval_ctx: int, max_tokens: int | None, decode_tokens: int, rows: list[Row],
             ref: EvalResult) -> dict:
    return {
        "source": source,
        "text": text,
        "eval_ctx": eval_ctx,
        "max_tokens": max_tokens,
        "decode_tokens": decode_tokens,
        "reference": {"ppl": ref.ppl, "nll": ref.nll, "tokens": ref.tokens, "windows": ref.windows},
        "results": [r.to_dict() for r in rows],
    }


def json_dumps(doc: dict) -> str:
    return json.dumps(_finite(doc), indent=1, allow_nan=False)


def _finite(v):
    """NaN/inf (e.g. the matrices' bpw of an unquantized model) become null, numpy scalars plain numbers."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    if isinstance(v, float | np.floating):
        return float(v) if np.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def csv_text(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    opt_keys = [f.name for f in dataclasses.fields(ConvertOptions)]
    w.writerow([*CSV_COLUMNS, *(f"opt_{k}" for k in opt_keys)])
    for r in rows:
        d = _finite(r.to_dict())
        w.writerow([_cell(d.get(k)) for k in CSV_COLUMNS] + [_cell(d["options"][k]) for k in opt_keys])
    return buf.getvalue()


def _cell(v) -> str:
    if v is None:
        return ""
    return repr(v) if isinstance(v, float) else str(v)


def markdown_table(rows: list[Row], ref: EvalResult, source: str, eval_ctx: int) -> str:
    head = ["method", "bits", "group", "bpw", "size", "ppl", "Δppl %", "KL mean", "top-1 %", "convert s",
            "decode tok/s"]
    any_failed = any(not r.ok for r in rows)
    if any_failed:
        head.append("error")
    lines = [
        f"reference: {source} unquantized, perplexity {ref.ppl:.4f} over {ref.tokens} tokens "
        f"({ref.windows} windows of {eval_ctx})",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if i < 3 or i == 11 else "---:" for i in range(len(head))) + "|",
    ]
    for r in rows:
        c, res = r.config, r.result
        cells = [
            c.shown_method, c.bits, c.group or "—", _fmt(r.bpw, ".3f"),
            _fmt(r.file_bytes / 1e6 if r.file_bytes else None, ".2f", " MB"),
            _fmt(res and res.ppl, ".4f"), _fmt(res and res.delta_ppl_pct, "+.2f"), _fmt_kl(res and res.kl_mean),
            _fmt(res and res.top1 * 100, ".2f"), _fmt(r.convert_seconds, ".1f"), _fmt(r.decode_tps, ".1f"),
        ]
        if any_failed:
            cells.append((r.error or "").replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v, spec: str, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "—"
    return f"{v:{spec}}{unit}"


def _fmt_kl(v) -> str:
    if v is None:
        return "—"
    return f"{v:.5f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


# ------------------------------------------------------------------------------------------------ the plot
def render_pareto(results: list[dict], ref_ppl: float, title: str = "") -> bytes | None:
    """PNG bytes: bits per weight against mean KL (log scale) and against perplexity, one marker and colour per
    method, the Pareto front of all methods dashed, the reference perplexity as a line. None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'lowbit[plot]'): no pareto.png")
        return None
    ok = [r for r in results if r["status"] == "ok" and r.get("bpw") is not None and r.get("ppl") is not None]
    fig = Figure(figsize=(12, 5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_kl, ax_ppl = fig.subplots(1, 2)
    markers = "osD^v<>pP*Xh"
    methods = list(dict.fromkeys(r["method"] for r in ok))
    cmap = [f"C{i % 10}" for i in range(len(methods))]
    skipped = []
    for k, method in enumerate(methods):
        pts = sorted((r for r in ok if r["method"] == method), key=lambda r: r["bpw"])
        style = dict(marker=markers[k % len(markers)], color=cmap[k], label=method, linewidth=1, alpha=0.85)
        kl_pts = [r for r in pts if (r.get("kl_mean") or 0) > 0]
        skipped += [r["label"] for r in pts if r not in kl_pts]
        if kl_pts:
            ax_kl.plot([r["bpw"] for r in kl_pts], [r["kl_mean"] for r in kl_pts], **style)
        ax_ppl.plot([r["bpw"] for r in pts], [r["ppl"] for r in pts], **style)
        for r in pts:
            tag = f"{r['bits']}{':' + r['group'] if r['group'] else ''}"
            if r in kl_pts:
                ax_kl.annotate(tag, (r["bpw"], r["kl_mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax_ppl.annotate(tag, (r["bpw"], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for ax, key in ((ax_kl, "kl_mean"), (ax_ppl, "ppl")):
        front = pareto_front([(r["bpw"], r[key]) for r in ok if key != "kl_mean" or (r.get("kl_mean") or 0) > 0])
        if len(front) > 1:
            ax.step(*zip(*front), where="post", color="grey", linestyle="--", linewidth=1, label="Pareto front")
        ax.set_xlabel("bits per weight (all tensors)")
        ax.grid(True, alpha=0.3)
    ax_kl.set_yscale("log")
    ax_kl.set_ylabel("mean KL(reference ‖ model), nats")
    ax_ppl.axhline(ref_ppl, color="black", linewidth=1, linestyle=":", label=f"unquantized ({ref_ppl:.3f})")
    ax_ppl.set_ylabel("perplexity")
    if ok and max(r["ppl"] for r in ok) > 3 * ref_ppl:
        ax_ppl.set_yscale("log")
    if skipped:
        ax_kl.text(0.99, 0.01, f"KL 0, not shown: {', '.join(skipped)}", transform=ax_kl.transAxes, ha="right",
                   va="bottom", fontsize=7, color="grey")
    for ax in (ax_kl, ax_ppl):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (fewer bits and lower y), by increasing x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            if front and front[-1][0] == x:
                front[-1] = (x, y)
            else:
                front.append((x, y))
    return front


# ------------------------------------------------------------------------------------------------ writing
def check_outputs(out_dir: Path, model_files: list[str], source: str, force: bool) -> None:
    """compare writes these containers and the results files into ``out_dir`` (and deletes the containers again
    unless --keep-models): refuse one that exists already unless ``force``, and an input of the run always."""
    from lowbit.runtime.outputs import check_output, source_files

    sources = source_files(source)
    for name in [*model_files, *FILES.values()]:
        check_output(out_dir / name, sources, force, "--out-dir:")


def write_results(out_dir: Path, doc: dict, rows: list[Row], ref: EvalResult) -> dict[str, Path]:
    """results.json/.csv/.md and pareto.png (when matplotlib is there), each written to a temporary file first and
    renamed only once all are complete, so a crash never leaves a half-written result. Returns kind -> path."""
    payloads: dict[str, bytes] = {
        "json": json_dumps(doc).encode(),
        "csv": csv_text(rows).encode(),
        "md": (markdown_table(rows, ref, doc["source"], doc["eval_ctx"]) + "\n").encode(),
    }
    title = f"{Path(doc['source'].rstrip('/')).name}: {ref.tokens} tokens, context {doc['eval_ctx']}"
    png = render_pareto(doc["results"], ref.ppl, title)
    if png is not None:
        payloads["png"] = png
    tmps: dict[str, Path] = {}
    try:
        for kind, data in payloads.items():
            tmp = out_dir / f".{FILES[kind]}.tmp"
            tmps[kind] = tmp
            with open(tmp, "wb") as f:
                f.write(data)
        for kind, tmp in tmps.items():
            tmp.replace(out_dir / FILES[kind])
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    return {kind: out_dir / FILES[kind] for kind in payloads}
