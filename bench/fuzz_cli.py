"""Hostile containers through the command line: N variants of a small container (header edits with a valid
checksum, tensor-table edits, byte flips, truncations), each run with `lowbit inspect`, `generate` or `eval`; counts
exits and checks that every refusal is exit 2 with one `lowbit: error:` line and no traceback:

    python bench/fuzz_cli.py MODEL.lowbit --runs 100 --text ../shared/data/dev-eval.txt
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import zlib
from collections import Counter
from pathlib import Path

from lowbit.formats.layout import MAGIC, PREAMBLE, data_start

NASTY = [None, True, -1, 0, 2**70, 10**300, 1e308, float("nan"), float("inf"), "x", [], {},
         [1, 2], {"a": None}, 1000000, -2**63]


def split(raw: bytes) -> tuple[dict, bytes]:
    _, _, _, n, _, _ = PREAMBLE.unpack_from(raw, 0)
    return json.loads(raw[PREAMBLE.size : PREAMBLE.size + n]), raw[data_start(n) :]


def assemble(header: dict, data: bytes, text: bytes | None = None) -> bytes:
    text = text if text is not None else json.dumps(header).encode()
    body = PREAMBLE.pack(MAGIC, 1, 0, len(text), zlib.crc32(text), 0) + text
    return body + b"\0" * (data_start(len(text)) - len(body)) + data


def variant(rng: random.Random, header: dict, data: bytes, raw: bytes) -> tuple[str, bytes]:
    kind = rng.choice(["args", "section", "tensor", "deep", "bigint", "flip", "truncate"])
    h = json.loads(json.dumps(header))
    if kind == "args":
        key = rng.choice(sorted(h["architecture"]["args"]))
        h["architecture"]["args"][key] = rng.choice(NASTY)
        return f"args.{key}", assemble(h, data)
    if kind == "section":
        key = rng.choice(["architecture", "tokenizer", "generation", "quantization", "runtime"])
        h[key] = rng.choice(NASTY)
        return f"{key} = nasty", assemble(h, data)
    if kind == "tensor":
        name = rng.choice(sorted(h["tensors"]))
        t = h["tensors"][name]
        field = rng.choice(["shape", "qtype", "nbytes", "offset"])
        if field in ("shape", "qtype"):
            t[field] = rng.choice(NASTY + [[-4, 64], [0, 64], [2**31, 2**31]])
        else:
            part = t["parts"][rng.choice(sorted(t["parts"]))]
            part[field] = rng.choice(NASTY + [part[field] + 0.5, part[field] + 64])
        return f"tensor {name}.{field}", assemble(h, data)
    if kind == "deep":
        text = json.dumps(h).encode()[:-1] + b', "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"
        return "nesting 100000 deep", assemble(h, data, text)
    if kind == "bigint":
        text = json.dumps(h).encode()[:-1] + b', "x": ' + b"9" * 5000 + b"}"
        return "5000-digit integer", assemble(h, data, text)
    if kind == "flip":
        b = bytearray(raw)
        at = rng.randrange(len(b))
        b[at] ^= 1 + rng.randrange(255)
        return f"byte {at} flipped", bytes(b)
    cut = rng.randrange(len(raw))
    return f"truncated at {cut}", raw[:cut]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--text", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    raw = a.model.read_bytes()
    header, data = split(raw)
    rng = random.Random(a.seed)
    outcomes: Counter = Counter()
    bad = []
    with tempfile.TemporaryDirectory(prefix="lowbit-fuzz-cli-") as tmp:
        path = Path(tmp) / "variant.lowbit"
        for i in range(a.runs):
            what, blob = variant(rng, header, data, raw)
            path.write_bytes(blob)
            cmd = [["inspect", path], ["generate", path, "--raw", "-p", "Once upon", "-n", "4"],
                   ["eval", path, "--text", a.text, "--max-tokens", "64", "--eval-ctx", "32"]][i % 3]
            proc = subprocess.run([sys.executable, "-m", "lowbit.runtime.cli", *map(str, cmd)], capture_output=True,
                                  text=True, timeout=300,
                                  env={**os.environ, "LOWBIT_CACHE": str(Path(tmp) / "cache"), "HF_HUB_OFFLINE": "1"})
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            if proc.returncode == 0:
                outcomes["ran"] += 1
            elif proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("lowbit: error:"):
                outcomes["refused in one line"] += 1
            else:
                outcomes["other"] += 1
                bad.append((what, cmd[0], proc.returncode, proc.stderr[-300:]))
    print(f"{a.runs} runs (inspect, generate, eval in turn): {dict(outcomes)}")
    for what, cmd, rc, err in bad:
        print(f"  {cmd} on {what}: exit {rc}: {err}")


if __name__ == "__main__":
    main()
