"""lowbit's `bench` beside llama.cpp's `llama-bench` on the same random weights, interleaved, one table of ratios.

    python bench/vs_llama_bench.py --llama-cpp BUILD/bin --tokenizer smol-hf [--shape smollm2-135m]
        [--pairs 4:Q4_0,8:Q8_0] [--prompt 512] [--gen 128] [--decode-after 4096] [--rounds 2] [--threads 2]

Steps: a random float checkpoint of the shape (bench/random_checkpoint.py); for each pair ``BITS:TYPE`` lowbit's
conversion (``--bits BITS --group-size 64``, data-free) and llama.cpp's (``llama-quantize`` of the same checkpoint
exported unquantized to GGUF by ``lowbit export``); then ``--rounds`` rounds, each running every pair's lowbit bench
and llama-bench one after the other, so both sides see the same machine state. Prefill is ``--prompt`` tokens from
an empty context on both sides (llama-bench ``-p``); decode is ``--gen`` tokens after the prompt (llama-bench ``-n``
with ``-d`` = ``--prompt``, the same work as lowbit's decode after its prefill) and from an empty context
(llama-bench ``-n`` alone; lowbit ``--prompt 1``); ``--decode-after N`` adds decode after an N-token context
(lowbit ``--prompt N``, llama-bench ``-d N``). Each ratio is lowbit's tokens/s over llama.cpp's, the median over
the rounds. Building llama.cpp is up to the caller (``cmake -B build -DGGML_NATIVE=ON && cmake --build build
--target llama-bench llama-quantize``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def lowbit(*args: str, capture: bool = False) -> str:
    out = subprocess.run([sys.executable, "-m", "lowbit.runtime.cli", *args], check=True, text=True,
                         stdout=subprocess.PIPE if capture else subprocess.DEVNULL)  # fmt: skip
    return out.stdout if capture else ""


def lowbit_speed(model: Path, prompt: int, gen: int, threads: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s after the prompt)."""
    rows = json.loads(lowbit("bench", str(model), "--prompt", str(prompt), "--gen", str(gen), "--no-cold",
                             "--threads", str(threads), "--json", capture=True))  # fmt: skip
    return rows[0]["prefill_tps"], rows[0]["decode_tps"]


def llama_speed(bin_dir: Path, gguf: Path, threads: int, prompt: int = 0, gen: int = 0, depth: int = 0) -> float:
    """llama-bench's mean tokens/s of one test (``-p prompt`` or ``-n gen`` after ``-d depth``), 2 repetitions."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(gen),
           "-r", "2", "-o", "json"]  # fmt: skip
    if depth:
        cmd += ["-d", str(depth)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout)[0]["avg_ts"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", required=True, type=Path, help="folder holding llama-bench and llama-quantize")
    ap.add_argument("--tokenizer", required=True, type=Path, help="a tokenizer folder for the random checkpoint")
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--pairs", default="4:Q4_0", help="lowbit bits : llama.cpp type, comma-separated")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--decode-after", default="", help="more context lengths to decode after (e.g. 4096), "
                    "comma-separated: lowbit bench --prompt N, llama-bench -d N")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the models here (default: a temporary folder)")
    a = ap.parse_args()
    for tool in ("llama-bench", "llama-quantize"):
        if not (a.llama_cpp / tool).is_file():
            ap.error(f"--llama-cpp {a.llama_cpp}: no {tool} there")
    pairs = []
    for item in a.pairs.split(","):
        bits, _, kind = item.partition(":")
        if not bits.isdigit() or not kind:
            ap.error(f"--pairs: {item!r} is not BITS:TYPE (e.g. 4:Q4_0)")
        pairs.append((bits, kind))
    depths = [int(d) for d in a.decode_after.split(",") if d.strip()] if a.decode_after else []
    if any(d < 1 for d in depths):
        ap.error("--decode-after: context lengths must be positive")
    with tempfile.TemporaryDirectory(prefix="lowbit-vs-llama-bench-") as tmp:
        work = a.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt = work / f"{a.shape}-random"
        if not ckpt.is_dir():
            subprocess.run([sys.executable, str(HERE / "random_checkpoint.py"), a.shape, str(ckpt), "--tokenizer",
                            str(a.tokenizer)], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        f32 = work / f"{a.shape}-f32.gguf"
        if not f32.is_file():
            full = work / f"{a.shape}-full.lowbit"  # the unquantized container, only on the way to the GGUF
            lowbit("convert", str(ckpt), "-o", str(full), "--bits", "16", "--no-progress", "--force")
            lowbit("export", str(full), "-o", str(f32))
            full.unlink()
        models = []
        for bits, kind in pairs:
            lb, gg = work / f"{a.shape}-b{bits}.lowbit", work / f"{a.shape}-{kind}.gguf"
            if not lb.is_file():
                lowbit("convert", str(ckpt), "-o", str(lb), "--bits", bits, "--group-size", "64", "--no-progress")
            if not gg.is_file():
                subprocess.run([str(a.llama_cpp / "llama-quantize"), str(f32), str(gg), kind, str(a.threads)],
                               check=True, capture_output=True)  # fmt: skip
            models.append((bits, kind, lb, gg))
        results: dict[tuple[str, str], list[tuple[float, ...]]] = {}
        for r in range(a.rounds):
            for bits, kind, lb, gg in models:
                pre, dec = lowbit_speed(lb, a.prompt, a.gen, a.threads)
                _, dec0 = lowbit_speed(lb, 1, a.gen, a.threads)
                l_pre = llama_speed(a.llama_cpp, gg, a.threads, prompt=a.prompt)
                l_dec = llama_speed(a.llama_cpp, gg, a.threads, gen=a.gen, depth=a.prompt)
                l_dec0 = llama_speed(a.llama_cpp, gg, a.threads, gen=a.gen)
                row = [pre, l_pre, dec, l_dec, dec0, l_dec0]
                for d in depths:
                    row += [lowbit_speed(lb, d, a.gen, a.threads)[1],
                            llama_speed(a.llama_cpp, gg, a.threads, gen=a.gen, depth=d)]  # fmt: skip
                results.setdefault((bits, kind), []).append(tuple(row))
                deep = "".join(f", decode after {d} {row[6 + 2 * i]:.1f} / {row[7 + 2 * i]:.1f}"
                               for i, d in enumerate(depths))  # fmt: skip
                print(f"round {r + 1}: {bits}-bit / {kind}: prefill {pre:.1f} / {l_pre:.1f}, decode after "
                      f"{a.prompt} {dec:.1f} / {l_dec:.1f}, decode from empty {dec0:.1f} / {l_dec0:.1f}{deep} t/s",
                      file=sys.stderr)  # fmt: skip
    heads = [f"prefill {a.prompt} (lowbit / llama.cpp t/s)", f"decode after {a.prompt}", "decode from empty"]
    heads += [f"decode after {d}" for d in depths]
    print("| shape | lowbit | llama.cpp | " + " | ".join(heads) + " |")
    print("|---|---|---|" + "---|" * len(heads))
    for (bits, kind), rows in results.items():
        cols = [statistics.median(x) for x in zip(*rows)]
        starts = range(0, len(cols), 2)
        ratios = [statistics.median(row[i] / row[i + 1] for row in rows) for i in starts]
        cells = [f"{cols[i]:.1f} / {cols[i + 1]:.1f} = {q:.2f}×" for i, q in zip(starts, ratios)]
        print(f"| {a.shape} | {bits}-bit g64 | {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
