"""Thread control of the BLAS library numpy loaded (float weights' products and low-rank terms run on it).

While a quantized model computes, BLAS runs on one thread: OpenBLAS's worker threads keep spinning after a call
and take the cores from the numba kernels that follow (in one profile, the prompt GEMMs of the MLP went from
2.58 s to 1.88 s with BLAS held to one thread).
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _blas_pools():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def one_thread():
    """Context manager: the BLAS libraries numpy loaded run on one thread inside it (threadpoolctl)."""
    return _blas_pools().limit(limits=1)
