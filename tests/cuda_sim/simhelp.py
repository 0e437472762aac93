"""Random quantized tensors and an in-memory container for the simulator tests."""

import numpy as np

from lowbit.formats import scale_codes
from lowbit.formats.qtypes import QType, pack_codes
from lowbit.formats.reader import StoredTensor


def random_parts(qt: QType, rows: int, cols: int, rng, scale: float = 0.05) -> dict[str, np.ndarray]:
    """Parts of a random tensor of type ``qt`` (float types: data of that type)."""
    if qt.is_float:
        x = (rng.standard_normal((rows, cols)) * scale * 4).astype(np.float32)
        if qt.name == "bf16":
            return {"data": (x.view(np.uint32) >> 16).astype(np.uint16)}
        return {"data": x.astype(np.float16 if qt.name == "f16" else np.float32)}
    if qt.coded_scales:  # the float16 twin's random scales, coded on their grid
        parts = random_parts(qt.f16_twin, rows, cols, rng, scale)
        if qt.asym:
            parts["mins"] = np.abs(parts["mins"])  # a coded zero point lies in [0, max_code]
        return scale_codes.code_parts(parts, qt)
    sshape = qt.part_shapes((rows, cols))["scales"][0]  # [rows, groups], or [1, 1] for a per-tensor type
    u = rng.integers(0, qt.max_code + 1, size=(rows, cols))
    parts = {"codes": pack_codes(u, qt), "scales": (rng.standard_normal(sshape) * scale).astype(np.float16)}
    if qt.asym:
        parts["mins"] = (rng.standard_normal(sshape) * scale * 2).astype(np.float16)
    return parts


def stored(name: str, qt: QType, shape: tuple[int, ...], rng, scale: float = 0.05) -> StoredTensor:
    if len(shape) == 1:
        return StoredTensor(name, qt, shape, {"data": (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)})
    return StoredTensor(name, qt, shape, random_parts(qt, *shape, rng, scale))


class MemoryContainer:
    """The part of formats.reader.Container a Model reads: tensor(), ``in``, tensor_names."""

    def __init__(self, tensors: dict[str, StoredTensor]):
        self.tensors = tensors

    def tensor(self, name: str) -> StoredTensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    @property
    def tensor_names(self) -> list[str]:
        return list(self.tensors)
