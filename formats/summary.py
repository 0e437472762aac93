"""What a container holds, in numbers: parameters, bytes and bits per weight (on disk and once loaded)."""

from __future__ import annotations

import numpy as np

from lowbit.formats.layout import EXTRA_SUFFIXES


def summarize(c) -> dict:
    """Parameter counts, bytes and bits per weight of a container (every byte of tensor data counts, including a
    method's extra tensors; parameters are the model's own)."""
    params = 0
    qparams = 0
    qbytes = 0
    expand = 0  # bytes coded scales gain at load (decoded to float16 for the kernels)
    for name in c.tensor_names:
        if name.rsplit(".", 1)[-1] in EXTRA_SUFFIXES:
            continue  # a method's extra tensors (low-rank factors, rotation signs): bytes, not parameters
        t = c.tensor(name)
        n = int(np.prod(t.shape))
        if t.qtype.coded_scales:
            expand += t.qtype.f16_twin.nbytes(t.shape) - t.nbytes
        params += n
        if not t.qtype.is_float and name not in ("token_embd.weight", "output.weight"):
            qparams += n
            qbytes += t.nbytes
    data = c.data_bytes
    return {
        "params": params,
        "data_bytes": data,
        "bpw_all": data * 8 / max(params, 1),
        "bpw_matrices": qbytes * 8 / max(qparams, 1) if qparams else float("nan"),
        "bpw_loaded": (data + expand) * 8 / max(params, 1),  # in memory: 8-bit scale codes run as float16 scales
    }
