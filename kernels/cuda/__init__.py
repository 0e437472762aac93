"""numba-cuda kernels (imported only when ``--device cuda`` is asked for; see lowbit.runtime.device).

``quant``: the fused dequantize-matvec / matmul / row-gather family, specialised per quant type by a cached factory.
``ops``: rmsnorm, RoPE, KV-cache writes, GQA attention, activations, residual adds, soft-capping.
Verified in numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``); speed on real GPUs has not been measured."""
