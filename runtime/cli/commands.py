"""Implementations of the CLI sub-commands (argument parsing lives in entry.py)."""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError
from lowbit.formats.summary import summarize
from lowbit.runtime.outputs import check_output, source_files, write_json_atomic

log = logging.getLogger(__name__)


def _model_path(value: str | None) -> Path:
    """The bundled model, a .lowbit file, or a GGUF / HF folder / hub id through the model store."""
    from lowbit.runtime.store import resolve_model

    return resolve_model(value)


def cmd_list(args) -> int:
    from lowbit.runtime.store import list_models, store_dir

    rows = list_models()
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print(f"no models in the store {store_dir()} (lowbit run SOURCE converts one into it)")
        return 0
    print(f"{'name':<36} {'size':>10} {'type':<9} source")
    for r in rows:
        print(f"{r['name']:<36} {r['bytes'] / 1e6:>7.1f} MB {r['type']:<9} {r['source']}")
    return 0


def cmd_rm(args) -> int:
    from lowbit.runtime.store import remove_model

    print(f"removed {remove_model(args.name)}")
    return 0


def cmd_convert(args) -> int:
    from lowbit.convert.converter import ConvertOptions, convert

    given = [args.bits, args.group_size, args.asym, args.embed_bits, args.target_bpw, args.max_size, args.recipe,
             args.gguf_compatible or None, args.scale_bits, args.float_type]
    opts = ConvertOptions(
        bits=4 if args.bits is None else args.bits,
        group_size=args.group_size,
        requantize=any(v is not None for v in given) or args.method != "auto",
        kernel_activations="exact" if args.exact_activations else None,
        asym=args.asym,
        scale_bits=args.scale_bits,
        embed_bits=args.embed_bits,
        method=args.method,
        calib=args.calib,
        calib_samples=args.calib_samples,
        calib_len=args.calib_len,
        seed=args.seed,
        lowrank_bpw=args.lowrank_bpw,
        tune_seconds=args.tune_seconds,
        target_bpw=args.target_bpw,
        max_size=args.max_size,
        recipe=args.recipe,
        gguf_compatible=args.gguf_compatible,
        float_type=args.float_type,
    )
    check_output(Path(args.output), sources=source_files(args.source), force=args.force, what="-o")
    out = convert(args.source, args.output, opts, progress=not args.no_progress)
    from lowbit.formats.reader import Container

    c = Container(out)
    s = summarize(c)
    quantized = "" if np.isnan(s["bpw_matrices"]) else f", {s['bpw_matrices']:.3f} in the quantized matrices"
    loaded = (f"; {s['bpw_loaded']:.3f} once loaded (8-bit scales run as float16)"
              if s["bpw_loaded"] > s["bpw_all"] + 1e-9 else "")
    print(f"wrote {out}: {c.size / 1e6:.2f} MB, {s['bpw_all']:.3f} bits/weight overall{quantized}{loaded}")
    q = c.meta.get("quantization", {})
    cal = q.get("calibration")
    if cal:
        where = f"{cal['source']} (seed {cal['seed']})" if "seed" in cal else f"from {cal['source']}"
        print(f"method {q.get('method')}; calibration: {cal['samples']} sequences of {cal['length']} tokens {where}")
    mixed = q.get("mixed")
    if mixed and "max_size" in mixed:
        print(f"mixed precision: {mixed['bpw']:.3f} bits/weight; the file is {c.size / 1e6:.2f} MB of the "
              f"{mixed['max_size'] / 1e6:.2f} MB --max-size (tensors {mixed['bytes'] / 1e6:.2f} MB)")
    elif mixed:
        asked = f" for --target-bpw {mixed['target_bpw']}" if "target_bpw" in mixed else ""
        print(f"mixed precision: {mixed['bpw']:.3f} bits/weight{asked}: {mixed['bytes'] / 1e6:.2f} MB of tensors "
              f"(budget {mixed['budget_bytes'] / 1e6:.2f} MB), and {(c.size - mixed['bytes']) / 1e6:.2f} MB of "
              "header and tokenizer")
    return 0


def cmd_generate(args) -> int:
    from lowbit.runtime.compile_notice import CompileNotice
    from lowbit.runtime.constraint import grammar_from_files
    from lowbit.runtime.engine import Engine
    from lowbit.runtime.sampling import SamplingParams

    grammar = grammar_from_files(args.json_schema, args.grammar)  # before the model loads: bad files fail fast
    engine = Engine(_model_path(args.model), ctx=args.ctx, threads=args.threads, device=args.device,
                    act_quant=args.act_quant,
                    exact_activations=args.exact_activations, mmap=args.mmap, kv=args.kv_bits, verify=args.verify,
                    context_shift=args.context_shift)
    out = sys.stdout
    notice = engine.compile_notice = CompileNotice.for_engine(engine)
    params = SamplingParams.from_args(args)
    tok = engine.tokenizer
    plain = args.raw or not tok.has_chat_template
    messages = []
    if plain:
        if not args.raw:
            log.warning("this model has no chat template; continuing the prompt as plain text")
        ids = tok.encode(args.prompt, add_special_tokens=True)
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        ids = tok.encode_chat([*messages, {"role": "user", "content": args.prompt}], literal_content=True)
    constraint = engine.grammars.compile(grammar) if grammar is not None else None
    for ev in engine.generate(ids, params, max_tokens=args.max_tokens, stop=args.stop, continuation=plain,
                              constraint=constraint, keep=engine.keep_tokens(ids, messages)):  # fmt: skip
        out.write(ev.text)
        out.flush()
        notice.saw(ev.text)
    out.write("\n")
    st = engine.stats
    print(
        f"prefill: {st.prefilled_tokens} tokens, {st.prefill_tps:.1f} tok/s | "
        f"decode: {st.generated_tokens} tokens, {st.decode_tps:.1f} tok/s | finish: {st.finish_reason}"
        + (f" | context shifted: {st.shifted_tokens} tokens dropped" if st.shifted_tokens else ""),
        file=sys.stderr,
    )
    return 0


def cmd_run(args) -> int:
    from lowbit.runtime.cli.repl import run_command

    return run_command(args)


def cmd_serve(args) -> int:
    from lowbit.runtime.server import serve_command

    return serve_command(args)


def cmd_bench(args) -> int:
    from lowbit.runtime.measure.bench import cmd_bench

    return cmd_bench(args)


def kv_cache_line(a: dict) -> str:
    """Cache bytes per position in each --kv-bits format, and the default cache at the model's full context."""
    from lowbit.kernels.kv_formats import DEFAULT, KVSpec

    try:
        dims = int(a["num_hidden_layers"]), int(a["num_key_value_heads"]), int(a["head_dim"])
        full = int(a.get("max_position_embeddings") or 0)
    except (KeyError, TypeError, ValueError):
        return ""
    per = {b: KVSpec.parse(b).bytes_per_token(*dims) for b in ("16", "32", "8", "4")}
    line = (f"{per['16']:,} bytes per position ({DEFAULT.label}, the default; f32 {per['32']:,}, q8 {per['8']:,}, "
            f"q4 {per['4']:,})")
    return line + (f"; {per['16'] * full / 2**20:,.0f} MiB at the model's {full:,} positions" if full else "")


def cmd_inspect(args) -> int:
    from lowbit.formats.layout import EXTRA_SUFFIXES
    from lowbit.formats.reader import Container
    from lowbit.models.validate import check_meta

    c = Container(_model_path(args.model))
    check_meta(c.meta, c.path)  # the sections printed below have the types they should (their values are shown)
    if args.save_recipe:  # before any output: a refusal is the only thing printed
        check_output(Path(args.save_recipe), sources=[c.path], force=args.force, what="--save-recipe")
    meta = c.meta
    arch = meta.get("architecture", {})
    tok = meta.get("tokenizer", {})
    q = meta.get("quantization", {})
    s = summarize(c)
    print(f"file:          {c.path} ({c.size / 1e6:.2f} MB, format {c.version[0]}.{c.version[1]})")
    print(f"architecture:  {arch.get('model_type')} (family {arch.get('family')})")
    for k, v in arch.get("args", {}).items():
        print(f"  {k}: {v}")
    kinds = [b for b in ("tokenizer.json", "tokenizer.model") if c.has_blob(b)]
    print(f"tokenizer:     {', '.join(kinds)}; bos={tok.get('bos_token')!r} eos={tok.get('eos_token')!r}; "
          f"chat template: {'yes' if tok.get('chat_template') else 'no'}")
    print(f"generation:    {json.dumps(meta.get('generation', {}))}")
    if q.get("bits") is None and q.get("method") == "gguf-import":
        print("quantization:  method=gguf-import (every tensor keeps its GGUF type where lowbit has it; see below)")
    else:
        print(f"quantization:  method={q.get('method')} bits={q.get('bits')} group={q.get('group_size')} "
              f"asym={q.get('asym')} embed_bits={q.get('embed_bits')}")
    imported = q.get("import") if isinstance(q.get("import"), dict) else {}
    if imported:
        counts = Counter(str(v) for v in imported.values())
        print("gguf import:   " + ", ".join(f"{n} {what}" for what, n in counts.most_common()))
    print(f"runtime:       {json.dumps(meta.get('runtime', {}))}")
    print(f"provenance:    {json.dumps(meta.get('provenance', {}))}")
    if meta.get("quality"):
        print(f"quality:       {json.dumps(meta['quality'])}")
    print(f"parameters:    {s['params']:,}")
    print(f"bits/weight:   {s['bpw_all']:.3f} overall (all tensor data / parameters), "
          f"{s['bpw_matrices']:.3f} in the quantized matrices")
    if s["bpw_loaded"] > s["bpw_all"] + 1e-9:
        print(f"in memory:     {s['bpw_loaded']:.3f} bits/weight (8-bit scale codes run as float16 scales)")
    kv = kv_cache_line(arch.get("args", {}))
    if kv:
        print(f"KV cache:      {kv}")
    rows = []
    groups: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for name in c.tensor_names:
        t = c.tensor(name)
        n = int(np.prod(t.shape))
        rows.append((name, t.qtype.name, "x".join(map(str, t.shape)), t.nbytes, t.nbytes * 8 / n))
        kind = name.split(".", 2)[-1] if name.startswith("blk.") else name
        acc = groups[(kind, t.qtype.name)]
        acc[0] += 1
        acc[1] += n
        acc[2] += t.nbytes
    print()
    if args.tensors:
        print(f"{'tensor':<32} {'type':<9} {'shape':<12} {'bytes':>10} {'bpw':>7}" + ("  import" if imported else ""))
        for name, qt, shape, nbytes, bpw in rows:
            note = f"  {imported.get(name, '')}" if imported else ""
            print(f"{name:<32} {qt:<9} {shape:<12} {nbytes:>10,} {bpw:>7.3f}{note}")
    else:
        print(f"{'tensor kind':<24} {'type':<9} {'count':>5} {'params':>12} {'bytes':>12} {'bpw':>7}")
        for (kind, qt), (cnt, n, nbytes) in groups.items():
            print(f"{kind:<24} {qt:<9} {cnt:>5} {n:>12,} {nbytes:>12,} {nbytes * 8 / n:>7.3f}")
    if args.save_recipe:
        recipe = {n: c.tensor(n).qtype.name for n in c.tensor_names if n.rsplit(".", 1)[-1] not in EXTRA_SUFFIXES}
        write_json_atomic(Path(args.save_recipe), recipe)
        print(f"wrote the recipe of {len(recipe)} tensors to {args.save_recipe}")
    if args.verify:
        bad = c.verify()
        if bad:
            raise LowbitError(f"CRC mismatch in {len(bad)} parts: {', '.join(bad[:5])}")
        print("\nverify: all CRC32 checksums match")
    return 0


def cmd_tune(args) -> int:
    from lowbit.convert.tune import TuneOptions, tune

    src, out = Path(args.model), Path(args.output)
    if not src.is_file():
        raise LowbitError(f"{src}: no such .lowbit file")
    check_output(out, sources=[src], force=args.force, what="-o")
    if args.samples < 1 or args.seq_len < 8 or args.steps < 0 or args.lr <= 0 or args.time_budget <= 0:
        raise LowbitError("--samples >= 1, --seq-len >= 8, --steps >= 0, --lr > 0 and --time-budget > 0, please")
    if not 0.0 <= args.e2e_share <= 1.0:
        raise LowbitError(f"--e2e-share {args.e2e_share}: expected a share of the time budget in [0, 1]")
    opts = TuneOptions(calib=args.calib, teacher=args.teacher, samples=args.samples, seq_len=args.seq_len,
                       steps=args.steps, lr=args.lr, time_budget=args.time_budget, threads=args.threads,
                       e2e_share=args.e2e_share)
    report = tune(src, out, opts, progress=not args.no_progress)
    parts = []
    if report.steps:
        before, after = float(np.mean(report.loss_before)), float(np.mean(report.loss_after))
        parts.append(f"{sum(report.steps)} steps over {len(report.steps)} blocks, block output error (mean over "
                     f"blocks) {before:.4g} -> {after:.4g}, tuned scales kept in {sum(report.kept)} of "
                     f"{len(report.kept)} blocks (the others did worse on held-out sequences)")
    if report.e2e_kl:
        kl0, kl1 = report.e2e_kl
        parts.append(f"end to end {report.e2e_steps} steps, held-out KL {kl0:.4f} -> {kl1:.4f}"
                     + ("" if report.e2e_kept else " (not lower: not kept)"))
    print(f"wrote {out} in {report.seconds:.0f} s: " + "; ".join(parts))
    return 0


def cmd_export(args) -> int:
    from lowbit.convert.gguf_export import export_gguf

    src, out = Path(args.model), Path(args.output)
    if args.format not in ("gguf", "compressed-tensors"):
        raise LowbitError(f"unknown --format {args.format!r}; choose gguf or compressed-tensors")
    if not src.is_file():
        raise LowbitError(f"{src}: no such .lowbit file")
    if args.format == "compressed-tensors":
        return _export_hf(src, out, args)
    if out.suffix.lower() != ".gguf":
        raise LowbitError(f"-o {out}: a GGUF file's name ends in .gguf")
    check_output(out, sources=[src], force=args.force, what="-o")
    report = export_gguf(src, out, strict=args.strict)
    exact = len(report.tensors) - len(report.inexact)
    print(f"wrote {out}: {report.bytes / 1e6:.2f} MB of tensors; {exact} of {len(report.tensors)} tensors exact")
    for line in report.lines():
        print(line)
    for name in report.inexact:
        lowbit_type, gguf_type, _ = report.tensors[name]
        print(f"re-quantized: {name} ({lowbit_type} -> {gguf_type})")
    return 0


def _export_hf(src: Path, out: Path, args) -> int:
    from lowbit.convert.hf_export import export_hf

    if args.strict:
        raise LowbitError("--strict is for --format gguf (a compressed-tensors export is always exact or refused)")
    if out.exists():
        if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
            raise LowbitError(f"-o {out}: holds the input {src}; refusing to replace it")
        if not args.force:
            raise LowbitError(f"-o {out}: exists; pass --force to replace it")
    done = export_hf(src, out, force=args.force)
    print(f"wrote {out}: {done['bytes'] / 1e6:.2f} MB; {done['packed']} linear layers packed exactly "
          f"(compressed-tensors pack-quantized), {done['dense']} tensors dense float32")
    return 0


def cmd_eval(args) -> int:
    from contextlib import ExitStack

    from tqdm import tqdm

    from lowbit.formats.reader import Container
    from lowbit.runtime.engine import Engine
    from lowbit.runtime.measure.evaluate import (
        check_same_tokens,
        count_windows,
        evaluate,
        reference_engine,
        too_short_message,
    )

    path = Path(args.text)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LowbitError(f"{path}: cannot read text ({e})") from None
    ctx = max(args.eval_ctx, args.ctx or 0)
    engine = Engine(_model_path(args.model), ctx=ctx, threads=args.threads, device=args.device,
                    act_quant=args.act_quant,
                    exact_activations=args.exact_activations, mmap=args.mmap, kv=args.kv_bits, verify=args.verify)
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    bos = engine.tokenizer.bos_id
    if bos is None:
        raise LowbitError("this model has no BOS token; perplexity by the project convention needs one")
    n_win = count_windows(len(ids), args.eval_ctx, args.max_tokens, args.stride)
    if n_win == 0:  # before converting a reference for nothing
        raise LowbitError(f"{path}: {too_short_message(len(ids), args.eval_ctx, args.max_tokens)}")
    with ExitStack() as stack:
        ref = None
        if args.reference:
            ref = stack.enter_context(reference_engine(args.reference, ctx, args.threads))
            check_same_tokens(engine, ref, text, ids)
        bar = stack.enter_context(tqdm(total=n_win, desc="eval", unit="window", disable=args.json))
        res = evaluate(engine.logits_all, ids, args.eval_ctx, bos, args.max_tokens,
                       ref_logits_fn=ref.logits_all if ref else None, on_window=lambda _: bar.update(),
                       stride=args.stride)
    s = summarize(Container(engine.path))
    kv_per_token = getattr(engine.cache, "full_nbytes", engine.cache.nbytes) // engine.ctx  # the whole context's
    out = {
        "model": str(engine.path),
        "ctx": args.eval_ctx,
        **({"stride": args.stride} if args.stride else {}),
        "bpw": s["bpw_all"],
        "bpw_loaded": s["bpw_loaded"],
        "file_bytes": engine.container.size,
        "act_quant": args.act_quant,
        "kv_cache": engine.kv.label,
        "kv_cache_bytes_per_token": kv_per_token,
        **({"reference": args.reference} if args.reference else {}),
        **res.to_dict(),
    }
    if args.json:
        print(json.dumps(out))
        return 0
    act = f"; int8 activations ({args.act_quant})" if args.act_quant != "none" else ""
    print(f"perplexity {res.ppl:.4f} over {res.tokens} tokens ({res.windows} windows of {args.eval_ctx}); "
          f"{s['bpw_all']:.3f} bits/weight; {engine.container.size / 1e6:.2f} MB{act}; KV cache {engine.kv.label} "
          f"({kv_per_token} bytes/token)")
    if ref is not None:
        print(f"reference perplexity {res.ref_ppl:.4f} (model {res.delta_ppl_pct:+.2f}%); "
              f"KL(reference || model) mean {res.kl_mean:.5f} p99 {res.kl_p99:.5f} nats; "
              f"top-1 agreement {res.top1 * 100:.2f}%")
    return 0


def cmd_compare(args) -> int:
    from lowbit.runtime.measure.compare import run

    return run(args)
