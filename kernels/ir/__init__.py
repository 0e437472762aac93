"""The LLVM-IR building blocks the numba CPU kernels are made of, each with a numpy twin in kernels/ref_intrinsics.py
and a direct test (tests/test_intrinsics.py): simd.py (portable vectors: fp16/bf16 decoding, the int16 group dot
product, prefetch, host CPU features), vnni.py (the byte dot product ``vpdpbusd``: a decode row's groups),
gemm_vnni.py (the prompt GEMM's interleaved tile), amx.py (Intel AMX tiles)."""
