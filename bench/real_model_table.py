"""lowbit's quality per bit on a real model: data-free and calibrated rows from ~2.5 to ~5.5 bits per weight (every
tensor counted), each with its KL and top-1 agreement against the float reference, size and conversion time.

    python bench/gguf_float_copy.py ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf smol-hf
    python bench/real_model_table.py smol-hf --text ../shared/data/dev-eval.txt --calib ../shared/data/calib.txt

This is `lowbit compare` with the rows of README's real-model table (:data:`CONFIGS`), windows of 512 tokens (BOS
in front) over the first 8,192 tokens of the text, and no decode timing; the calibrated rows use --calib. The
containers and results go to --out-dir (default ./real-model-table; existing files need --force). Other compare
options pass through, e.g. --exact-activations, --json, --threads.
"""

from __future__ import annotations

import argparse
import sys

from lowbit.runtime.cli import main as lowbit_main

# data-free: the search at 2/3/4 bits in groups of 64, and the default (4 bits in groups of 32, 6-bit embeddings);
# calibrated: GPTQ at 3 bits, and mixed precision (the default calibrated method) at three budgets
CONFIGS = ("search:2:g64,search:3:g64,search:4:g64,search:4:g32,gptq:3:g64,"
           "mixed:2.75bpw,mixed:3.5bpw,mixed:4.5bpw")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="the float checkpoint (an HF folder)")
    ap.add_argument("--text", required=True, help="evaluation text")
    ap.add_argument("--calib", required=True, help="calibration text for the calibrated rows")
    ap.add_argument("--configs", default=CONFIGS, help=f"compare's configs (default {CONFIGS})")
    ap.add_argument("--out-dir", default="real-model-table")
    args, rest = ap.parse_known_args(argv)
    return lowbit_main(["compare", args.source, "--configs", args.configs, "--text", args.text, "--calib", args.calib,
                        "--eval-ctx", "512", "--max-tokens", "8192", "--decode-tokens", "0", "--out-dir",
                        args.out_dir, *rest])


if __name__ == "__main__":
    sys.exit(main())
