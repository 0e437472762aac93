"""`lowbit compare`: convert one checkpoint several ways and measure every result against the unquantized model.

Each configuration is converted into ``--out-dir`` (timed), then all of them are evaluated by the project's
convention (DESIGN §9) over the same windows in lockstep, so the unquantized reference runs once per window however
many configurations there are (its logits are never stored: a 32k-token text is half a gigabyte of them for a
4096-token vocabulary). Then each model's decode speed is measured, and one table (stdout), ``results.csv``,
``results.json``, ``results.md`` and ``pareto.png`` (with matplotlib) are written, every file atomically.

The configuration grammar is in runtime/measure/configs.py, named sets of configurations in presets.py.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowbit.convert.converter import ConvertOptions
from lowbit.errors import LowbitError
from lowbit.runtime.measure.configs import GRAMMAR, Config, parse_configs
from lowbit.runtime.measure.evaluate import Accumulator, EvalResult, count_windows, too_short_message, windows

log = logging.getLogger(__name__)
__all__ = ["Config", "Row", "parse_configs", "run"]


# ------------------------------------------------------------------------------------------------ results
@dataclass
class Row:
    config: Config
    path: Path | None = None
    error: str | None = None  # why this configuration has no (complete) measurement
    convert_seconds: float | None = None
    file_bytes: int | None = None
    bpw: float | None = None  # all tensor data / parameters, as `lowbit inspect` reports it
    bpw_matrices: float | None = None
    eval_seconds: float = 0.0  # this model's share of the evaluation: its forward passes and scoring
    result: EvalResult | None = None
    decode_tps: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def fail(self, stage: str, exc: BaseException) -> None:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        kind = "" if isinstance(exc, LowbitError) else f"{type(exc).__name__}: "
        self.error = f"{stage} failed: {kind}{msg}".rstrip(": ")
        log.warning("%s: %s", self.config.label, self.error, exc_info=not isinstance(exc, LowbitError))

    def to_dict(self) -> dict:
        c = self.config
        d = {
            "label": c.label, "method": c.method, "bits": c.bits, "group": c.group,
            "status": "ok" if self.ok else "failed", "error": self.error,
            "bpw": self.bpw, "bpw_matrices": self.bpw_matrices, "file_bytes": self.file_bytes,
            "convert_seconds": self.convert_seconds, "eval_seconds": round(self.eval_seconds, 3),
            "decode_tps": self.decode_tps, "act_quant": c.act, "kv_cache": c.kv,
        }
        res = self.result.to_dict() if self.result is not None else {}
        for k in ("ppl", "delta_ppl_pct", "kl_mean", "kl_p99", "kl_max", "top1", "nll", "tokens", "windows"):
            d[k] = res.get(k)
        d["options"] = dataclasses.asdict(c.opts)
        return d


# ------------------------------------------------------------------------------------------------ measuring
def evaluate_lockstep(
    logits_fns: Sequence[Callable[[list[int]], np.ndarray]],
    ids: list[int],
    ctx: int,
    bos: int,
    max_tokens: int | None,
    ref_logits_fn: Callable[[list[int]], np.ndarray],
    on_window: Callable[[int], None] | None = None,
) -> tuple[list[EvalResult | BaseException], EvalResult, list[float]]:
    """Like evaluate_many, but a candidate that raises drops out (its exception is its result) while the others go
    on. Returns (per candidate: EvalResult or exception, the reference's own EvalResult, seconds per candidate)."""
    if count_windows(len(ids), ctx, max_tokens) == 0:
        raise LowbitError(too_short_message(len(ids), ctx, max_tokens))
    accs: list[Accumulator | None] = [Accumulator(reference=True) for _ in logits_fns]
    errors: list[BaseException | None] = [None] * len(logits_fns)
    seconds = [0.0] * len(logits_fns)
    ref_acc = Accumulator()
    for w, win in enumerate(windows(ids, ctx, bos, max_tokens), 1):
        ref = ref_logits_fn(win)
        ref_acc.add(win, ref)
        for i, fn in enumerate(logits_fns):
            if errors[i] is not None:
                continue
            t0 = time.perf_counter()
            try:
                accs[i].add(win, fn(win), ref)
            except Exception as e:  # noqa: BLE001 - one broken candidate must not end the whole comparison
                errors[i], accs[i] = e, None
            seconds[i] += time.perf_counter() - t0
        if on_window:
            on_window(w)
    results = [e if e is not None else a.result() for e, a in zip(errors, accs)]
    return results, ref_acc.result(), seconds


def decode_speed(engine, prompt: list[int], n: int, warmup: int = 4, repeats: int = 3) -> float:
    """Greedy decode tokens/s of ``n`` single-token steps after ``prompt``: the fastest of ``repeats`` runs after a
    short warm-up run (on a shared machine the fastest run is the least disturbed one)."""
    best = 0.0
    for k, steps in enumerate((warmup, *[n] * repeats)):
        engine.reset()
        tok = int(np.argmax(engine.prefill(prompt)))
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = int(np.argmax(engine.step(tok)))
        dt = time.perf_counter() - t0
        if k and dt > 0:
            best = max(best, n / dt)
    return best or float("nan")


# ------------------------------------------------------------------------------------------------ the command
PROMPT_TOKENS = 16  # decode speed is measured after a prompt of BOS + this many tokens of the text


def run(args) -> int:
    """`lowbit compare`: returns 0, or 1 when some configuration failed (its row says why)."""
    from contextlib import ExitStack

    from tqdm import tqdm

    from lowbit.runtime.engine import Engine, set_threads
    from lowbit.runtime.measure import compare_report as report
    from lowbit.runtime.measure.evaluate import reference_engine

    _check_args(args)
    shared = ConvertOptions(calib=args.calib, calib_samples=args.calib_samples, calib_len=args.calib_len,
                            seed=args.seed, tune_seconds=getattr(args, "tune_seconds", 600.0))
    configs = _configs(args, shared)
    text = _read_text(args.text)
    out_dir = Path(args.out_dir) if args.out_dir else Path(f"compare-{_source_name(args.source)}")
    if out_dir.exists() and not out_dir.is_dir():
        raise LowbitError(f"{out_dir}: exists and is not a directory (--out-dir)")
    report.check_outputs(out_dir, [f"{c.slug}.lowbit" for c in configs], args.source, getattr(args, "force", False))
    set_threads(args.threads)
    rows = [Row(c) for c in configs]
    quiet = args.json
    with ExitStack() as stack:
        ref = stack.enter_context(reference_engine(args.source, args.eval_ctx, args.threads))
        ids = ref.tokenizer.encode(text, add_special_tokens=False)
        bos = ref.tokenizer.bos_id
        if bos is None:
            raise LowbitError("this model has no BOS token; perplexity by the project convention needs one")
        n_win = count_windows(len(ids), args.eval_ctx, args.max_tokens)
        if n_win == 0:
            raise LowbitError(f"{args.text}: {too_short_message(len(ids), args.eval_ctx, args.max_tokens)}")
        out_dir.mkdir(parents=True, exist_ok=True)
        if not args.keep_models:
            stack.callback(_remove_models, rows)
        _convert_all(rows, args.source, out_dir, quiet)

        prompt = [bos, *ids[:PROMPT_TOKENS]]
        ctx = max(args.eval_ctx, len(prompt) + max(args.decode_tokens, 4) + 1)
        engines: dict[int, Engine] = {}
        for i, row in enumerate(rows):
            if row.ok:
                try:
                    engines[i] = Engine(row.path, ctx=ctx, threads=args.threads, act_quant=row.config.act,
                                        exact_activations=getattr(args, "exact_activations", None), kv=row.config.kv)
                except Exception as e:  # noqa: BLE001 - a container the runtime cannot load is a failed row
                    row.fail("loading", e)
        log.info("evaluating %d models against the reference over %d windows", len(engines), n_win)
        with tqdm(total=n_win, desc=f"eval {len(engines)} models", unit="window", disable=quiet) as bar:
            results, ref_result, seconds = evaluate_lockstep(
                [e.logits_all for e in engines.values()], ids, args.eval_ctx, bos, args.max_tokens,
                ref.logits_all, on_window=lambda _: bar.update())
        for i, res, sec in zip(engines, results, seconds):
            rows[i].eval_seconds = sec
            if isinstance(res, EvalResult):
                rows[i].result = res
            else:
                rows[i].fail("evaluation", res)
        if args.decode_tokens > 0:
            for i in tqdm(list(engines), desc="decode speed", unit="model", disable=quiet):
                if rows[i].ok:
                    try:
                        rows[i].decode_tps = decode_speed(engines[i], prompt, args.decode_tokens)
                    except Exception as e:  # noqa: BLE001
                        rows[i].fail("decode", e)
        engines.clear()

    doc = report.document(args.source, str(args.text), args.eval_ctx, args.max_tokens, args.decode_tokens, rows,
                          ref_result)
    files = report.write_results(out_dir, doc, rows, ref_result)
    if args.json:
        print(report.json_dumps({**doc, "files": {k: str(v) for k, v in files.items()}}))
    else:
        print(report.markdown_table(rows, ref_result, args.source, args.eval_ctx))
        print(f"wrote {', '.join(str(p) for p in files.values())}", file=sys.stderr)
    failed = [r for r in rows if not r.ok]
    if failed:
        log.warning("%d of %d configurations failed: %s", len(failed), len(rows), ", ".join(r.config.label
                                                                                            for r in failed))
    return 1 if failed else 0


def _configs(args, shared: ConvertOptions) -> list[Config]:
    """--configs, then --preset's rows (runtime/measure/presets.py); LowbitError if neither or if labels repeat."""
    from lowbit.runtime.measure.presets import parse_bits, preset_configs

    preset = getattr(args, "preset", None)
    if not args.configs and not preset:
        raise LowbitError(f"give --configs ({GRAMMAR}) or --preset NAME")
    configs = parse_configs(args.configs, shared) if args.configs else []
    if preset:
        configs += preset_configs(preset, parse_bits(getattr(args, "preset_bits", "8,4,3,2")), shared)
    seen = set()
    for c in configs:
        if c.label in seen:
            raise LowbitError(f"config {c.label} is in --configs and in --preset {preset}; give it once")
        seen.add(c.label)
    return configs


def _check_args(args) -> None:
    src = Path(args.source).expanduser()
    if src.is_file():
        raise LowbitError(f"{args.source}: compare converts from a Hugging Face checkpoint (folder or hub id), "
                          "not a file")
    for name, value, low in (("--eval-ctx", args.eval_ctx, 2), ("--calib-samples", args.calib_samples, 1),
                             ("--calib-len", args.calib_len, 2), ("--decode-tokens", args.decode_tokens, 0)):
        if value < low:
            raise LowbitError(f"{name} must be at least {low}, got {value}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise LowbitError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.calib is not None and not Path(args.calib).is_file():
        raise LowbitError(f"{args.calib}: no such calibration text file (--calib)")


def _read_text(name: str) -> str:
    try:
        return Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LowbitError(f"{name}: cannot read text ({e})") from None


def _source_name(src: str) -> str:
    name = Path(src.rstrip("/")).name or "model"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _convert_all(rows: list[Row], src: str, out_dir: Path, quiet: bool) -> None:
    from tqdm import tqdm

    from lowbit.convert.converter import convert
    from lowbit.formats.reader import Container
    from lowbit.formats.summary import summarize

    bar = tqdm(rows, desc="convert", unit="config", disable=quiet, dynamic_ncols=True)
    done: dict[ConvertOptions, Row] = {}  # rows that differ only in runtime options (act, kv) share a conversion
    for row in bar:
        bar.set_postfix_str(row.config.label)
        same = done.setdefault(row.config.opts, row)
        if same is not row:
            for k in ("path", "convert_seconds", "file_bytes", "bpw", "bpw_matrices", "error"):
                setattr(row, k, getattr(same, k))
            continue
        log.info("converting %s", row.config.label)
        target = out_dir / f"{row.config.slug}.lowbit"
        t0 = time.perf_counter()
        try:
            row.path = convert(src, target, row.config.opts, progress=False)
        except Exception as e:  # noqa: BLE001 - a method that fails (or is not there yet) is one failed row
            row.fail("conversion", e)
            continue
        row.convert_seconds = round(time.perf_counter() - t0, 2)
        with Container(row.path) as c:
            s = summarize(c)
            row.file_bytes = c.size
        row.bpw, row.bpw_matrices = s["bpw_all"], s["bpw_matrices"]
        target_bpw = row.config.opts.target_bpw
        if target_bpw is not None and min(row.bpw, row.bpw_matrices) > target_bpw * 1.05:
            log.warning("%s: the container has %.3f bits per weight (%.3f in the matrices), above its target",
                        row.config.label, row.bpw, row.bpw_matrices)


def _remove_models(rows: list[Row]) -> None:
    for row in rows:
        if row.path is not None:
            row.path.unlink(missing_ok=True)
            row.path = None
