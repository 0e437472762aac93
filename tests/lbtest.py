"""Paths and helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFSMALL = SHARED / "models" / "refsmall"
DEV_EVAL = SHARED / "data" / "dev-eval.txt"
CALIB = SHARED / "data" / "calib.txt"
# a small calibration run for the tests of calibrated methods
CAL = dict(calib=str(CALIB), calib_samples=6, calib_len=64)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja")


def run_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    """`lowbit ARGS...` in a child process (offline), output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "lowbit.runtime.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def assert_clean_error(res, needle: str) -> None:
    """Exit code 2 and exactly one stderr line, `lowbit: error: ...` containing ``needle``, no traceback."""
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("lowbit: error:") and needle in lines[0], lines[0]


# tiny random transformers models share refsmall's tokenizer (vocab 4096)
TINY = dict(
    vocab_size=4096,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.08,
    bos_token_id=1,
    eos_token_id=2,
)


def hf_logits(folder, ids):
    """transformers' float32 logits [T, vocab] for token ids (the numerics oracle)."""
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def rel_err(got, want) -> float:
    """Largest absolute difference relative to the largest reference value."""
    import numpy as np

    return float(np.abs(got - want).max() / np.abs(want).max())


# the 22M toy (refsmall converted to 4-bit g64 by lowbit), for tests that need a fast model whose outputs they know;
# the bundled default is the real SmolLM2-135M-Instruct
TOY_MODEL = Path(__file__).resolve().parent / "data" / "refsmall-q4.lowbit"


def tiny_config(kind: str):
    import transformers as tf

    if kind == "llama":
        return tf.LlamaConfig(**TINY, rope_theta=10000.0)
    if kind == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        return tf.LlamaConfig(**TINY, rope_parameters=rope)
    if kind == "mistral":
        return tf.MistralConfig(**TINY, sliding_window=None)
    if kind == "qwen2":
        return tf.Qwen2Config(**TINY, tie_word_embeddings=True)
    raise ValueError(kind)


KEY = "sk-lowbit-test"


class LiveServer:
    """uvicorn serving ``app`` in a background thread on a free 127.0.0.1 port."""

    def __init__(self, app):
        import threading

        from lowbit.runtime.server import bind_socket, make_server

        self.app = app
        self.sock = bind_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = make_server(app, self.sock)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def client(self, api_key: str = KEY, **kw):
        import openai

        kw.setdefault("timeout", 120)
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=api_key, max_retries=0, **kw)

    def anthropic(self, api_key: str = KEY, **kw):
        import anthropic

        return anthropic.Anthropic(base_url=self.base, api_key=api_key, max_retries=0, timeout=120, **kw)

    def http(self, auth: bool = True):
        import httpx

        headers = {"Authorization": f"Bearer {KEY}"} if auth else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=120)


def integer_gemm_everywhere(model) -> bool:
    """Whether every integer-kernel weight of ``model`` runs on the byte dot product (int8/split activations: VNNI,
    or AVX2 for codes below 8 bits). Then passes of every length compute each row and token with integer sums, so a
    prompt cut into passes gives a whole pass's numbers bit for bit; int16 weights take BLAS on float tiles for long
    passes and their own kernels for short ones, which agree only closely."""
    from lowbit.kernels import act_quant

    return all(w.act_mode != "int16" for w in act_quant.linear_weights(model) if w.int_kernels is not None)


def byte_dot_case(bits: int, *values, id: str | None = None):
    """pytest.param(*values), skipped where the byte dot product cannot multiply ``bits``-bit codes exactly (no VNNI
    or AVX2 at all, or 8-bit codes on AVX2, whose byte pairs would saturate)."""
    from lowbit.kernels import cpu_quant

    why = f"the byte kernels of {bits}-bit codes need VNNI (or AVX2 below 8)"
    return pytest.param(*values, id=id, marks=pytest.mark.skipif(not cpu_quant.byte_dot_serves(bits), reason=why))
