"""Perplexity / bits-per-weight / size table for a checkpoint converted at several bit-widths (DESIGN §9).

    python bench/quality_table.py ../shared/models/refsmall --text ../shared/data/dev-eval.txt

Converts SRC with the default method at each --bits (group 64), evaluates each container with the same code as
`lowbit eval` (windows of --ctx tokens, BOS in front, first --max-tokens tokens), and, unless --no-reference,
computes the same perplexity with transformers (PyTorch, float32) for the reference row. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from lowbit.convert.converter import ConvertOptions, convert
from lowbit.formats.reader import Container
from lowbit.runtime.commands import summarize
from lowbit.runtime.engine import Engine
from lowbit.runtime.evaluate import perplexity


def transformers_ppl(src: str, text: str, ctx: int, max_tokens: int) -> float:
    import torch
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(src)
    model = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = tok(text, add_special_tokens=False)["input_ids"]

    def logits(window: list[int]):
        with torch.no_grad():
            return model(torch.tensor([window])).logits[0].numpy()

    return perplexity(logits, ids, ctx, tok.bos_token_id, max_tokens).ppl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source")
    ap.add_argument("--text", required=True)
    ap.add_argument("--bits", default="16,8,4,3,2")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    text = Path(args.text).read_text(encoding="utf-8")
    rows = []
    ref = None if args.no_reference else transformers_ppl(args.source, text, args.ctx, args.max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (int(b) for b in args.bits.split(",")):
            out = Path(tmp) / f"m{bits}.lowbit"
            t0 = time.perf_counter()
            convert(args.source, out, ConvertOptions(bits=bits, group_size=args.group_size), progress=False)
            conv_s = time.perf_counter() - t0
            eng = Engine(out, ctx=args.ctx)
            ids = eng.tokenizer.encode(text, add_special_tokens=False)
            res = perplexity(eng.logits_all, ids, args.ctx, eng.tokenizer.bos_id, args.max_tokens)
            s = summarize(Container(out))
            rows.append(
                dict(bits=bits, ppl=res.ppl, tokens=res.tokens, bpw_all=s["bpw_all"], bpw_matrices=s["bpw_matrices"],
                     size_bytes=out.stat().st_size, convert_seconds=conv_s)
            )
    print(f"perplexity, first {args.max_tokens} tokens of {args.text}, context {args.ctx}, group {args.group_size}")
    print()
    print("| bits | ppl | Δ vs transformers | bits/weight (matrices) | bits/weight (all) | file size |")
    print("|---|---|---|---|---|---|")
    if ref is not None:
        print(f"| transformers fp32 | {ref:.3f} | — | — | — | — |")
    for r in rows:
        delta = f"{(r['ppl'] / ref - 1) * 100:+.2f}%" if ref is not None else "—"
        label = "16 (unquantized)" if r["bits"] == 16 else str(r["bits"])
        mat = r["bpw_all"] if math.isnan(r["bpw_matrices"]) else r["bpw_matrices"]  # nothing quantized at 16
        print(f"| {label} | {r['ppl']:.3f} | {delta} | {mat:.3f} | {r['bpw_all']:.3f} "
              f"| {r['size_bytes'] / 1e6:.2f} MB |")
    if args.json:
        Path(args.json).write_text(json.dumps({"reference_ppl": ref, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
