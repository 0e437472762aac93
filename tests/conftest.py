"""Shared fixtures: tiny random transformers checkpoints built locally, and the shared reference model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from lbtest import REFSMALL, TOKENIZER_FILES, tiny_config


def build_tiny(path: Path, kind: str, seed: int = 0) -> Path:
    """Save a tiny random model of ``kind`` with refsmall's tokenizer files into ``path``."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(kind)).eval()
    model.save_pretrained(path)
    for f in TOKENIZER_FILES:
        shutil.copy(REFSMALL / f, path / f)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {k: build_tiny(root / k, k, seed=i) for i, k in enumerate(("llama", "llama3", "mistral", "qwen2"))}


@pytest.fixture(scope="session")
def refsmall_containers(tmp_path_factory) -> dict[str, Path]:
    """refsmall converted at 16 (unquantized), 8, 4, 3 and 2 bits (default method, group 64, 8-bit embeddings: one
    layout at every width, so that each bit removed shows)."""
    from lowbit.convert.converter import ConvertOptions, convert

    root = tmp_path_factory.mktemp("refsmall")
    out = {}
    for bits in (16, 8, 4, 3, 2):
        opts = ConvertOptions(bits=bits, group_size=64, embed_bits=None if bits == 16 else 8)
        out[bits] = convert(str(REFSMALL), root / f"refsmall-{bits}.lowbit", opts, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def llama_prompt() -> list[int]:
    """BOS and 40 random token ids of the tiny models' vocabulary."""
    import numpy as np

    rng = np.random.default_rng(5)
    return [1, *rng.integers(3, 4000, size=40).tolist()]
