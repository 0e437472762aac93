"""Tensor names: HF checkpoint names -> lowbit's canonical ones (llama.cpp-like: ``blk.3.attn_v.weight``), and the
tensors a family expects."""

from __future__ import annotations

from lowbit.errors import SourceError

TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def make_sanitize(layer_names: dict[str, str], top_names: dict[str, str] = TOP_NAMES, prefixes: tuple = ()):
    """A sanitize(hf_name) for these name maps; ``prefixes`` are (prefix, replacement) pairs applied first (a None
    replacement drops the tensor, e.g. a vision tower)."""

    def sanitize(hf_name: str) -> str | None:
        """Canonical tensor name for an HF tensor name, or None for tensors the runtime does not need."""
        for pre, repl in prefixes:
            if hf_name.startswith(pre):
                if repl is None:
                    return None
                hf_name = repl + hf_name[len(pre) :]
                break
        if hf_name.endswith(IGNORED_SUFFIXES):
            return None
        base, _, kind = hf_name.rpartition(".")
        if base in top_names:
            return f"{top_names[base]}.{kind}"
        parts = base.split(".")
        if len(parts) >= 4 and parts[0] == "model" and parts[1] == "layers":
            sub = ".".join(parts[3:])
            if sub in layer_names:
                return f"blk.{int(parts[2])}.{layer_names[sub]}.{kind}"
        raise SourceError(f"unexpected tensor {hf_name!r} in checkpoint")

    return sanitize



def make_expected(layer_names: dict[str, str]):
    def expected_tensors(args) -> list[str]:
        """Canonical names that must be present for ``args`` (a family's ModelArgs; biases are optional)."""
        names = ["token_embd.weight", "output_norm.weight"]
        if not args.tie_word_embeddings:
            names.append("output.weight")
        for i in range(args.num_hidden_layers):
            names += [f"blk.{i}.{n}.weight" for n in layer_names.values()]
        return names

    return expected_tensors
