"""A family's model on a CUDA device: the family's own ``Model`` given the CUDA ops object
(kernels/cuda/backend.py). The families compute only through ``Model.ops``, so nothing here overrides them."""

from __future__ import annotations

from lowbit.errors import LowbitError
from lowbit.kernels.cuda.backend import CudaOps
from lowbit.models import llama


def cuda_model(family_name: str, family, args, container, ctx: int):
    """``family.Model`` on the device. LowbitError naming the family when its model is not built on the llama blocks
    (so has no ops-driven forward), or naming the tensor when a weight carries extras."""
    cls = getattr(family, "Model", None)
    if not (isinstance(cls, type) and issubclass(cls, llama.Model)):
        raise LowbitError(
            f"the {family_name} model family has no device forward (its model is not built on the llama blocks); "
            "use --device cpu"
        )
    return cls(args, container, ctx, ops=CudaOps())
