"""lowbit: a local LLM inference runtime with its own quantized container format."""

import os

__version__ = "0.1.0"

# numba's OpenMP workers spin after each parallel region. With libgomp's default spin count they keep both cores
# busy long enough to starve the BLAS threads of the next prefill GEMM (measured: 4.5x slower prefill); 10000
# spins still bridge the gaps between a decode step's back-to-back kernels. A value the user set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
