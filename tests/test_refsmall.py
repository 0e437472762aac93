"""The real trained reference model: perplexity against transformers, 8-bit greedy parity, bits per weight."""

from __future__ import annotations

import numpy as np
import pytest
from lbtest import DEV_EVAL, REFSMALL

from lowbit.formats.reader import Container
from lowbit.formats.summary import summarize
from lowbit.runtime.engine import Engine
from lowbit.runtime.measure.evaluate import perplexity, windows

CTX = 256
N_TOKENS = 16384


@pytest.fixture(scope="module")
def hf_model():
    import torch
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(REFSMALL, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def eval_ids():
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(REFSMALL)
    return tok(DEV_EVAL.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"], tok.bos_token_id


@pytest.fixture(scope="module")
def hf_ppl(hf_model, eval_ids):
    import torch

    ids, bos = eval_ids
    batch = torch.tensor(list(windows(ids, CTX, bos, N_TOKENS)))
    with torch.no_grad():
        logits = torch.cat([hf_model(batch[i : i + 16]).logits for i in range(0, len(batch), 16)])
    lp = torch.log_softmax(logits.double(), -1)[:, :-1]
    nll = -lp.gather(-1, batch[:, 1:, None]).mean()
    return float(torch.exp(nll))


@pytest.fixture(scope="module")
def lowbit_ppl(refsmall_containers, eval_ids):
    ids, bos = eval_ids
    out = {}
    for bits, path in refsmall_containers.items():
        eng = Engine(path, ctx=CTX)
        out[bits] = perplexity(eng.logits_all, ids, CTX, bos, N_TOKENS)
    return out


@pytest.mark.parametrize("bits,tolerance", [(16, 0.001), (8, 0.005), (4, 0.05)])
def test_perplexity_close_to_transformers(bits, tolerance, lowbit_ppl, hf_ppl):
    res = lowbit_ppl[bits]
    assert res.tokens == 64 * 255
    rel = abs(res.ppl - hf_ppl) / hf_ppl
    assert rel <= tolerance, f"{bits}-bit ppl {res.ppl:.4f} vs transformers {hf_ppl:.4f} ({rel:.2%})"


def test_lower_bits_cost_perplexity(lowbit_ppl):
    ppl = {b: r.ppl for b, r in lowbit_ppl.items()}
    # 8-bit may land a hair either side of the float model (its closeness is tested above);
    # every further bit removed must cost perplexity.
    assert max(ppl[16], ppl[8]) < ppl[4] < ppl[3] < ppl[2]


def test_eight_bit_greedy_matches_transformers(refsmall_containers, hf_model):
    import torch

    eng = Engine(refsmall_containers[8], ctx=256)
    ids = eng.tokenizer.encode_chat([{"role": "user", "content": "Explain the asyncio module."}])
    with torch.no_grad():
        want = hf_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, min_new_tokens=16)
    want = want[0, len(ids) :].tolist()
    eng.eos_ids = set()
    got = [ev.token for ev in eng.generate(ids, max_tokens=16)]
    assert got == want


def test_four_bit_bits_per_weight(refsmall_containers):
    s = summarize(Container(refsmall_containers[4]))
    assert s["bpw_matrices"] <= 4.6
    assert s["bpw_all"] < 6.0


def test_unquantized_keeps_source_dtype(refsmall_containers):
    c = Container(refsmall_containers[16])
    assert c.tensor("blk.0.attn_q.weight").qtype.name == "bf16"
    np.testing.assert_equal(c.tensor("output_norm.weight").qtype.name, "f32")
