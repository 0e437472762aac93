"""Perplexity / bits-per-weight / size table for a checkpoint converted at several bit-widths (DESIGN §9).

    python bench/quality_table.py ../shared/models/refsmall --text ../shared/data/dev-eval.txt

Converts SRC with the default method at each --bits (group 64), evaluates each container with the same code as
`lowbit eval --reference` (windows of --ctx tokens, BOS in front, first --max-tokens tokens) against the unquantized
(--bits 16) container, which is always built: perplexity, KL(16-bit ‖ row) mean and p99, top-1 agreement, with
the default kernel activations (int8 below 8 bits) and with --exact-activations. Unless
--no-reference, also computes the same perplexity with transformers (PyTorch, float32) for the reference row.
Prints a markdown table.
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
from lowbit.formats.summary import summarize
from lowbit.runtime.engine import Engine
from lowbit.runtime.measure.evaluate import evaluate_many, perplexity


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
    ap.add_argument("--embed-bits", type=int, default=8, help="embeddings and lm_head (default 8: README's table)")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    text = Path(args.text).read_text(encoding="utf-8")
    rows = []
    conv_s: dict[int, float] = {}
    ref = None if args.no_reference else transformers_ppl(args.source, text, args.ctx, args.max_tokens)
    bits_list = [int(b) for b in args.bits.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for bits in sorted({16, *bits_list}, reverse=True):  # the 16-bit container first: it is the KL reference
            paths[bits] = Path(tmp) / f"m{bits}.lowbit"
            t0 = time.perf_counter()
            embed = None if bits == 16 else args.embed_bits
            opts = ConvertOptions(bits=bits, group_size=args.group_size, embed_bits=embed)
            convert(args.source, paths[bits], opts, progress=False)
            conv_s[bits] = time.perf_counter() - t0
        ref_eng = Engine(paths[16], ctx=args.ctx)
        # each container with the default kernel activations and with --exact-activations (identical numbers at 8
        # and 16 bits, where the default already is exact)
        engines = [Engine(paths[bits], ctx=args.ctx, exact_activations=exact)
                   for bits in bits_list for exact in (False, True)]
        ids = ref_eng.tokenizer.encode(text, add_special_tokens=False)
        results = evaluate_many([e.logits_all for e in engines], ids, args.ctx, ref_eng.tokenizer.bos_id,
                                args.max_tokens, ref_logits_fn=ref_eng.logits_all)
        for i, bits in enumerate(bits_list):
            res, exact = results[2 * i], results[2 * i + 1]
            s = summarize(Container(paths[bits]))
            rows.append(
                dict(bits=bits, ppl=res.ppl, tokens=res.tokens, bpw_all=s["bpw_all"], bpw_matrices=s["bpw_matrices"],
                     size_bytes=paths[bits].stat().st_size, convert_seconds=conv_s[bits], kl_mean=res.kl_mean,
                     kl_p99=res.kl_p99, top1=res.top1, ppl_exact=exact.ppl, kl_mean_exact=exact.kl_mean,
                     top1_exact=exact.top1)
            )
    print(f"perplexity, first {args.max_tokens} tokens of {args.text}, context {args.ctx}, group {args.group_size}")
    print()
    print("KL(16-bit ‖ row) in nats over every scored position; top-1 = argmax agreement with the 16-bit container")
    print()
    print("| bits | ppl | Δ vs transformers | bits/weight (matrices) | bits/weight (all) | file size "
          "| KL mean | KL p99 | top-1 | exact activations: ppl | KL mean | top-1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    if ref is not None:
        print(f"| transformers fp32 | {ref:.3f} | — | — | — | — | — | — | — | — | — | — |")
    for r in rows:
        delta = f"{(r['ppl'] / ref - 1) * 100:+.2f}%" if ref is not None else "—"
        label = "16 (unquantized)" if r["bits"] == 16 else str(r["bits"])
        mat = r["bpw_all"] if math.isnan(r["bpw_matrices"]) else r["bpw_matrices"]  # nothing quantized at 16
        print(f"| {label} | {r['ppl']:.3f} | {delta} | {mat:.3f} | {r['bpw_all']:.3f} "
              f"| {r['size_bytes'] / 1e6:.2f} MB | {r['kl_mean']:.5f} | {r['kl_p99']:.5f} | {r['top1'] * 100:.2f}% "
              f"| {r['ppl_exact']:.3f} | {r['kl_mean_exact']:.5f} | {r['top1_exact'] * 100:.2f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps({"reference_ppl": ref, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
