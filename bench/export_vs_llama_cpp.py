"""llama.cpp runs lowbit's exported files beside its own quantizations of the same float model, one run, one table.

    python bench/export_vs_llama_cpp.py --llama-cpp BUILD/bin --float smol-hf --text ../shared/data/dev-eval.txt \\
        --lowbit m46.lowbit [--lowbit more.lowbit ...] [--types Q4_0,Q3_K_M,Q5_0,Q4_K_M] [--chunks 16]

Steps: the float checkpoint converted unquantized (``lowbit convert --bits 16``) and exported to an F32 GGUF; its
logits saved by ``llama-perplexity --kl-divergence-base``; each lowbit file exported to GGUF and each llama.cpp
type made by ``llama-quantize`` from the F32 GGUF, all scored by ``llama-perplexity --kl-divergence`` against those
logits (llama.cpp's windows: 512-token chunks, second halves scored). Building llama.cpp is up to the caller.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def lowbit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lowbit.runtime.cli", *args], check=True, stdout=subprocess.DEVNULL)


def kl(bin_dir: Path, gguf: Path, text: str, base: Path, chunks: int) -> tuple[float, float]:
    out = subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", text, "-c", "512", "--chunks",
                          str(chunks), "-t", "2", "--kl-divergence-base", str(base), "--kl-divergence"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    log = out.stdout + out.stderr
    mean = float(re.search(r"Mean\s+KLD:\s+([0-9.]+)", log).group(1))
    top = float(re.search(r"Same top p:\s+([0-9.]+)", log).group(1))
    return mean, top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", required=True, type=Path, help="folder holding llama-perplexity, llama-quantize")
    ap.add_argument("--float", required=True, help="the float checkpoint (HF folder) every file is compared with")
    ap.add_argument("--text", required=True)
    ap.add_argument("--lowbit", action="append", default=[], help="a .lowbit file to export and score (repeatable)")
    ap.add_argument("--types", default="Q4_0,Q3_K_M,Q5_0,Q4_K_M", help="llama.cpp types to make and score")
    ap.add_argument("--chunks", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lowbit-vs-llama-") as tmp:
        tmp = Path(tmp)
        lowbit("convert", args.float, "-o", str(tmp / "f.lowbit"), "--bits", "16", "--no-progress")
        lowbit("export", str(tmp / "f.lowbit"), "-o", str(tmp / "f32.gguf"), "--strict")
        base = tmp / "base.kld"
        subprocess.run([str(args.llama_cpp / "llama-perplexity"), "-m", str(tmp / "f32.gguf"), "-f", args.text, "-c",
                        "512", "--chunks", str(args.chunks), "-t", "2", "--kl-divergence-base", str(base)],
                       capture_output=True, check=True)  # fmt: skip
        from gguf import GGUFReader

        params = sum(int(t.n_elements) for t in GGUFReader(tmp / "f32.gguf").tensors)
        rows = []
        for i, path in enumerate(args.lowbit):
            gg = tmp / f"lowbit{i}.gguf"
            lowbit("export", path, "-o", str(gg))
            rows.append((f"lowbit {Path(path).name}", gg))
        for kind in filter(None, args.types.split(",")):
            gg = tmp / f"{kind}.gguf"
            subprocess.run([str(args.llama_cpp / "llama-quantize"), str(tmp / "f32.gguf"), str(gg), kind, "2"],
                           capture_output=True, check=True)  # fmt: skip
            rows.append((f"llama.cpp {kind}", gg))
        print("| GGUF run by llama.cpp | file bytes | bits/weight (file) | KL mean | same top-1 |")
        print("|---|---:|---:|---:|---:|")
        for label, gg in rows:
            mean, top = kl(args.llama_cpp, gg, args.text, base, args.chunks)
            size = gg.stat().st_size
            print(f"| {label} | {size:,} | {size * 8 / params:.3f} | {mean:.4f} | {top:.2f}% |")


if __name__ == "__main__":
    main()
