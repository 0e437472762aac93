"""`lowbit export --format compressed-tensors`: a Hugging Face checkpoint whose linear layers keep lowbit's codes.
The oracle is transformers loading it with the compressed-tensors package (its own unpacking and dequantization):
the same weights bit for bit, the same logits, the same tokens."""

from __future__ import annotations

import numpy as np
import pytest
from lbtest import DEV_EVAL, assert_clean_error, rel_err, run_cli

from lowbit.convert.converter import ConvertOptions, convert
from lowbit.convert.hf_export import export_hf, hf_name
from lowbit.formats.reader import Container
from lowbit.kernels.ref import dequantize
from lowbit.runtime.engine import Engine

pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize(("kind", "bits", "group"), [("llama", 4, 32), ("qwen2", 8, 64), ("llama", 4, 0)])
def test_transformers_loads_the_export_with_lowbits_numbers(kind, bits, group, tiny_models, tmp_path):
    import torch
    import transformers as tf

    lb = convert(str(tiny_models[kind]), tmp_path / "m.lowbit", ConvertOptions(bits=bits, group_size=group, asym=False),
                 progress=False)
    done = export_hf(lb, tmp_path / "hf")
    assert done["packed"] == 7 * 2
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = [1, *np.random.default_rng(3).integers(3, 4000, size=30).tolist()]
    want = Engine(lb, ctx=64, kv="32", exact_activations=True).logits_all(ids)
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].numpy()
    assert rel_err(got, want) < 1e-4
    state = {k: v.numpy() for k, v in model.state_dict().items()}  # decompressed by the first forward pass
    c = Container(lb)
    for name in c.tensor_names:
        t = c.tensor(name)
        want = dequantize(t.parts, t.qtype, t.shape)
        np.testing.assert_array_equal(state[hf_name(name, c.meta["architecture"]["family"])], want, err_msg=name)
    text = DEV_EVAL.read_text(encoding="utf-8")[:3000]
    # the exported tokenizer files tokenize as transformers tokenizes the source checkpoint's
    source = tf.AutoTokenizer.from_pretrained(tiny_models[kind])(text)["input_ids"]
    assert tf.AutoTokenizer.from_pretrained(tmp_path / "hf")(text)["input_ids"] == source


def test_what_compressed_tensors_cannot_hold_is_refused(tiny_models, tmp_path):
    asym = convert(str(tiny_models["llama"]), tmp_path / "a.lowbit", ConvertOptions(bits=4), progress=False)
    out = tmp_path / "hf"
    assert_clean_error(run_cli("export", asym, "-o", out, "--format", "compressed-tensors"), "symmetric 4- and 8-bit")
    assert not out.exists()
    sym = convert(str(tiny_models["llama"]), tmp_path / "s.lowbit", ConvertOptions(bits=4, asym=False),
                  progress=False)
    res = run_cli("export", sym, "-o", out, "--format", "compressed-tensors")
    assert res.returncode == 0 and (out / "model.safetensors").is_file(), res.stderr
    assert_clean_error(run_cli("export", sym, "-o", out, "--format", "compressed-tensors"), "exists")
    assert_clean_error(run_cli("export", sym, "-o", tmp_path, "--format", "compressed-tensors", "--force"),
                       "holds the input")
    assert_clean_error(run_cli("export", sym, "-o", out, "--format", "compressed-tensors", "--strict"), "--strict")
    assert_clean_error(run_cli("export", sym, "-o", tmp_path / "no" / "hf", "--format", "compressed-tensors"),
                       "no such folder")
    res = run_cli("export", sym, "-o", out, "--format", "compressed-tensors", "--force")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.lowbit", "hf", "s.lowbit"]
