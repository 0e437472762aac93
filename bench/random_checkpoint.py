"""A random-weight Hugging Face checkpoint of a real model shape, for timing conversions (GPTQ, AWQ, mixed
precision) at real size: speed does not depend on the values.

    python bench/random_checkpoint.py llama3.2-1b OUT_DIR --tokenizer smol-hf
    /usr/bin/time lowbit convert OUT_DIR -o m.lowbit --method gptq --bits 4 --calib ../shared/data/calib.txt

Weights are bfloat16 normal(0, 0.02) (norms 1), written tensor by tensor; the tokenizer files come from
``--tokenizer`` (any folder whose vocabulary fits the shape's, e.g. the float copy of SmolLM2), so that calibration
text can be tokenized.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from lowbit.convert.hf_export import hf_name
from lowbit.runtime.measure.bench_model import SHAPES, tensor_shapes


def main() -> None:
    from lowbit.models import family_for

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer", required=True, type=Path, help="a folder with tokenizer.json (and its config)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = dict(SHAPES[args.shape])
    _, family = family_for(cfg["model_type"])
    margs = family.args_from_hf(cfg)
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=False)
    shapes = tensor_shapes(margs)
    # safetensors.numpy has no bfloat16: the file is written here, header first, then each tensor as it is made
    header, offset = {}, 0
    for canon, shape in shapes.items():
        n = 2 * int(np.prod(shape, dtype=np.int64))
        header[hf_name(canon, "llama")] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(args.out / "model.safetensors", "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for shape in shapes.values():
            arr = np.ones(shape, np.float32) if len(shape) == 1 else rng.standard_normal(shape, np.float32) * 0.02
            f.write(((arr.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)).tobytes())  # bf16 bits
    (args.out / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"],
                                                      "torch_dtype": "bfloat16"}, indent=2))  # fmt: skip
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        if (args.tokenizer / f).is_file():
            shutil.copy(args.tokenizer / f, args.out / f)
    print(f"wrote {args.out}: {sum(int(np.prod(s)) for s in shapes.values()):,} parameters")


if __name__ == "__main__":
    main()
