"""Write transformers' float copy of a GGUF as a Hugging Face folder, to measure a lowbit import against it:

    python bench/gguf_float_copy.py ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf ref-hf
    lowbit convert ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf -o s.lowbit
    lowbit eval s.lowbit --reference ref-hf --text ../shared/data/dev-eval.txt --exact-activations

``--bf16`` writes the weights as bfloat16 instead (rounded to nearest even): a bfloat16 checkpoint of the model, to
measure what bfloat16 weights and their bfloat16 activations cost (``lowbit convert ref-bf16 --bits 16``).

transformers dequantizes every GGUF tensor to float32 when it loads one (`from_pretrained(dir, gguf_file=...)`, needs
the `gguf` and `accelerate` packages), but its `save_pretrained` refuses a GGUF-loaded model; this writes the state
dict with safetensors, the config, and the tokenizer (llama.cpp's tokenization, as lowbit imports it).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--bf16", action="store_true", help="write bfloat16 weights (default: float32)")
    a = ap.parse_args()
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    model = tf.AutoModelForCausalLM.from_pretrained(a.gguf.parent, gguf_file=a.gguf.name, dtype=torch.float32)
    tok = tf.AutoTokenizer.from_pretrained(a.gguf.parent, gguf_file=a.gguf.name)
    a.out.mkdir(parents=True, exist_ok=False)
    dtype = torch.bfloat16 if a.bf16 else torch.float32
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(a.out / "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(str(a.out / "config.json"))
    model.generation_config.to_json_file(str(a.out / "generation_config.json"))
    tok.save_pretrained(a.out)
    # transformers' GGUF tokenizer ignores tokenizer.ggml.pre (SmolLM2's "smollm" splits every digit); keep its
    # config and template, with llama.cpp's tokenization as lowbit imports it
    from lowbit.convert.gguf_source import GGUFSource
    from lowbit.convert.gguf_tokenizer import gguf_tokenizer

    src = GGUFSource(a.gguf)
    _, blobs = gguf_tokenizer(src.fields, str(a.gguf))
    if "tokenizer.json" in blobs:
        (a.out / "tokenizer.json").write_bytes(blobs["tokenizer.json"])
    src.close()
    print(f"wrote {a.out}: {sum(v.numel() for v in state.values()):,} {'bfloat16' if a.bf16 else 'float32'} parameters")


if __name__ == "__main__":
    main()
