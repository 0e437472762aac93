"""What constrained generation costs per token: grammar-mask time as a share of decode time.

    python bench/grammar_cost.py            # SmolLM2-135M (the bundled model) and the Llama-3.2-1B shape
    python bench/grammar_cost.py --no-1b    # SmolLM2 only

SmolLM2: each grammar (JSON schemas, json_object, a lazy tool-call grammar, a required tool call) constrains a greedy
reply of the bundled model; the mask time per token (llguidance) is set against the decode time per token of the
same reply. The 1B shape: decode time per token of a random-weight 4-bit container of Llama-3.2-1B's shape; the mask
time of the same grammars and replies under a 128,256-token byte-level BPE (Llama 3's vocabulary size), trained here
on the Python standard library's sources (~30 s) because no Llama tokenizer ships with the repository.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

OBJ = {"type": "object", "additionalProperties": False}
PERSON = {**OBJ, "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
          "required": ["name", "age", "hobbies"]}  # fmt: skip
CITY = {**OBJ, "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                              "sky": {"type": "string", "enum": ["sunny", "cloudy", "rain"]}},
        "required": ["city", "country", "sky"]}  # fmt: skip
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
        "parameters": {**OBJ, "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip


def cases():
    """(label, prompt, grammar) for the bundled model."""
    from lowbit.runtime.constraint import json_object_grammar, json_schema_grammar
    from lowbit.runtime.server.tools import ToolSpec, grammar_for, parse_tool

    tool = parse_tool(TOOL, "tools[0]")
    return [
        ("json_schema person", f"A person as JSON following {json.dumps(PERSON)}", json_schema_grammar(PERSON)),
        ("json_schema city", f"Describe Paris as JSON following {json.dumps(CITY)}", json_schema_grammar(CITY)),
        ("json_object", "Who are you? Answer in JSON.", json_object_grammar()),
        ("tools auto (lazy)", "Tell me about the weather in general.", grammar_for(ToolSpec([tool]), "hermes")),
        ("tools required", "What is the weather in Rome?", grammar_for(ToolSpec([tool], "required"), "hermes")),
    ]


def smollm2(max_tokens: int) -> list[dict]:
    from lowbit.runtime.engine import Engine

    engine = Engine()
    rows = []
    for label, prompt, grammar in cases():
        ids = engine.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        engine.reset()
        list(engine.generate(ids, max_tokens=max_tokens))  # free text: the decode time without a grammar
        free = engine.stats.decode_seconds / max(engine.stats.generated_tokens - 1, 1)
        engine.reset()
        constraint = engine.grammars.compile(grammar)
        text = "".join(ev.text for ev in engine.generate(ids, max_tokens=max_tokens, constraint=constraint))
        st = engine.stats
        decode = st.decode_seconds / max(st.generated_tokens - 1, 1)
        mask = constraint.mask_seconds / max(constraint.steps, 1)
        rows.append(dict(model="SmolLM2-135M", case=label, tokens=st.generated_tokens, mask_ms=mask * 1e3,
                         decode_ms=decode * 1e3, free_decode_ms=free * 1e3, share=mask / free, text=text))  # fmt: skip
    return rows


def train_128k() -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts():
        for f in sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/**/*.py", recursive=True)):
            try:
                yield Path(f).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|begin_of_text|>", "<|eot_id|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=128256, special_tokens=special, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts(), trainer)
    return tok


def mask_ms_128k(tok, grammar: str, text: str) -> float:
    """Mean mask time per token of ``text`` (tokenized by ``tok``) under ``grammar``, end-of-sequence included."""
    import llguidance

    ll = llguidance.LLTokenizer(tok.to_str(), n_vocab=tok.get_vocab_size(), eos_token=[1])
    matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
    n = tok.get_vocab_size()
    bits = np.zeros((n + 31) // 32, dtype=np.int32)
    logits = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    times = []
    for t in [*tok.encode(text).ids, 1]:
        t0 = time.perf_counter()  # the same steps as Constraint.apply: mask, unpack, masked copy of the logits
        matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        allowed = np.unpackbits(bits.view(np.uint8), bitorder="little")[:n].view(bool)
        out = logits.copy()
        out[~allowed] = -np.inf
        times.append(time.perf_counter() - t0)
        if matcher.is_stopped() or not matcher.consume_token(t):
            break
    return statistics.mean(times) * 1e3


def decode_ms_1b(steps: int) -> float:
    from lowbit.convert.converter import ConvertOptions
    from lowbit.formats.reader import Container
    from lowbit.models import family_for
    from lowbit.runtime.engine import set_threads
    from lowbit.runtime.measure.bench_model import build_random_container

    set_threads(None)
    with tempfile.TemporaryDirectory() as d:
        opts = ConvertOptions(bits=4, group_size=64, embed_bits=8)  # the layout `lowbit bench` builds
        path = build_random_container("llama3.2-1b", opts, Path(d) / "1b.lowbit")
        c = Container(path)
        c.load_into_memory(1)
        _, family = family_for(c.meta["architecture"]["model_type"])
        model = family.Model(family.ModelArgs.from_dict(c.meta["architecture"]["args"]), c, 512)
        cache = model.new_cache()
        model.forward(np.arange(64) % 1000, 0, cache)
        model.forward(np.array([5]), 64, cache)  # compile
        t0 = time.perf_counter()
        for i in range(steps):
            model.forward(np.array([7]), 65 + i, cache)
        return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--no-1b", action="store_true", help="skip the Llama-3.2-1B shape")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rows = smollm2(a.max_tokens)
    if not a.no_1b:
        tok = train_128k()
        decode = decode_ms_1b(16)
        for label, _, grammar in cases():
            text = next(r["text"] for r in rows if r["case"] == label)
            mask = mask_ms_128k(tok, grammar, text)
            rows.append(dict(model="Llama-3.2-1B shape (128k vocab)", case=label, tokens=None, mask_ms=mask,
                             decode_ms=decode, free_decode_ms=decode, share=mask / decode, text=text))  # fmt: skip
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    print("| model | grammar | reply tokens | mask ms/token | decode ms/token | mask / decode |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        tokens = "" if r["tokens"] is None else r["tokens"]
        print(f"| {r['model']} | {r['case']} | {tokens} | {r['mask_ms']:.3f} | {r['free_decode_ms']:.2f} | "
              f"{100 * r['share']:.1f}% |")  # fmt: skip


if __name__ == "__main__":
    main()
