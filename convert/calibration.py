"""Calibration for the data-driven methods: the text, the unquantized model held in memory, and what each linear
layer sees.

- Text: ``--calib FILE`` (plain text) is tokenized without special tokens and cut into ``calib_samples`` sequences of
  ``calib_len`` tokens, each starting with BOS, taken evenly spaced over the file. Without a file, the unquantized
  model writes its own calibration text: ``calib_samples`` sequences sampled at temperature 1 from BOS with a seeded
  generator (so two conversions with the same seed see the same text).
- :class:`FloatStore` stands in for a container: every tensor of the checkpoint as float32, so the families'
  ``Model`` classes run the unquantized forward pass, and the pipeline can swap quantized weights in layer by layer.
- :class:`LayerRecorder` observes the input of every matrix product of one layer (``Model.linear``): it accumulates
  ``XᵀX`` per distinct input (q/k/v share one) and keeps a seeded random subset of input rows for AWQ's search.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lowbit.convert.hessian import HessianAccumulator
from lowbit.errors import LowbitError
from lowbit.formats.qtypes import get_qtype
from lowbit.formats.reader import StoredTensor
from lowbit.formats.tokenizer import Tokenizer
from lowbit.kernels.ops import ObservingOps

log = logging.getLogger(__name__)

SAMPLE_ROWS = 4096  # input rows kept per distinct layer input for the AWQ search


class FloatStore:
    """Tensors by canonical name as float32, with the container interface the models load from."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.f32 = get_qtype("f32")

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def tensor(self, name: str) -> StoredTensor:
        arr = self.arrays[name]
        return StoredTensor(name, self.f32, tuple(arr.shape), {"data": arr})


def file_tokens(path: str | Path, tok: Tokenizer, samples: int, length: int) -> list[np.ndarray]:
    """``samples`` sequences of ``length`` tokens (BOS + text) spread evenly over the file's tokens."""
    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"--calib {p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LowbitError(f"--calib {p}: not UTF-8 text") from None
    ids = tok.encode(text, add_special_tokens=False)
    body = length - 1 if tok.bos_id is not None else length
    n_avail = len(ids) // body
    if n_avail < 1:
        raise LowbitError(f"--calib {p}: {len(ids)} tokens, fewer than one sequence of {length}")
    if n_avail < samples:
        log.warning("--calib %s holds %d sequences of %d tokens; using those, not %d", p, n_avail, length, samples)
        samples = n_avail
    starts = np.linspace(0, (n_avail - 1) * body, samples).astype(np.int64)
    head = [tok.bos_id] if tok.bos_id is not None else []
    return [np.array(head + ids[s : s + body], dtype=np.int64) for s in starts]


def sampled_tokens(model, tok: Tokenizer, samples: int, length: int, seed: int) -> list[np.ndarray]:
    """Calibration text written by the unquantized model: temperature-1 samples from BOS, seeded."""
    rng = np.random.default_rng(seed)
    start = tok.bos_id if tok.bos_id is not None else 0
    out = []
    for _ in range(samples):
        cache = model.new_cache()
        seq = [start]
        logits = model.forward(np.array(seq), 0, cache)[0]
        while len(seq) < length:
            z = logits.astype(np.float64)
            p = np.exp(z - z.max())
            seq.append(int(rng.choice(len(p), p=p / p.sum())))
            logits = model.forward(np.array(seq[-1:]), len(seq) - 1, cache)[0]
        out.append(np.array(seq, dtype=np.int64))
    return out


class SquareSums:
    """The diagonal of XᵀX/n only: mean squared input per column (float64)."""

    def __init__(self, cols: int):
        self.sq = np.zeros(cols, np.float64)
        self.n = 0

    def add(self, x: np.ndarray) -> None:
        self.sq += np.einsum("ij,ij->j", x, x, dtype=np.float64)
        self.n += len(x)

    def diag(self) -> np.ndarray:
        return self.sq / max(self.n, 1)

    def hessian(self) -> np.ndarray:
        raise LowbitError("internal: this recorder keeps only the diagonal of XᵀX")


class LayerRecorder:
    """Collects, for one layer at a time, XᵀX and a row sample of each distinct linear input."""

    def __init__(self, seed: int, calls: int, sample_rows: int = SAMPLE_ROWS, full: bool = True):
        """``calls``: forward calls per layer (calibration sequences); each keeps its share of ``sample_rows``.
        ``full``: accumulate XᵀX (GPTQ, rotations); otherwise only its diagonal (importance), which is much cheaper."""
        self.full = full
        self.rng = np.random.default_rng(seed)
        self.per_call = max(1, -(-sample_rows // max(calls, 1)))
        self.reset()

    def reset(self) -> None:
        self.hessians: dict[str, HessianAccumulator] = {}
        self.alias: dict[str, str] = {}  # tensor name -> the first tensor name that saw the same input
        self._rows: dict[str, list[np.ndarray]] = {}
        self._seen: dict[int, str] = {}
        self._alive = []

    def begin_call(self) -> None:
        """Call before each forward of the observed block (inputs are matched by identity within one call)."""
        self._seen = {}
        self._alive: list[np.ndarray] = []  # inputs seen in this call, kept alive so their ids stay unique

    def observe(self, name: str, x: np.ndarray) -> None:
        first = self._seen.get(id(x))
        if first is not None:
            self.alias[name] = first
            return
        self._seen[id(x)] = name
        self._alive.append(x)
        x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
        acc = self.hessians.get(name)
        if acc is None:
            acc = self.hessians[name] = (HessianAccumulator if self.full else SquareSums)(x2.shape[1])
        acc.add(x2)
        keep = x2 if len(x2) <= self.per_call else x2[np.sort(self.rng.choice(len(x2), self.per_call, replace=False))]
        self._rows.setdefault(name, []).append(keep)

    def key(self, name: str) -> str:
        return self.alias.get(name, name)

    def rows(self, name: str) -> np.ndarray:
        """About ``sample_rows`` rows of ``name``'s input (a seeded choice from every call)."""
        return np.concatenate(self._rows[self.key(name)])

    def hessian(self, name: str) -> np.ndarray:
        return self.hessians[self.key(name)].hessian()

    def importance(self, name: str) -> np.ndarray:
        return self.hessians[self.key(name)].diag()


def observe(model, recorder: LayerRecorder):
    """Make ``model``'s matrix products report their inputs to ``recorder``: its ops object is wrapped in an
    observing one (kernels/ops.py); returns a function that undoes it."""
    inner = model.ops
    model.ops = ObservingOps(inner, recorder)

    def undo() -> None:
        model.ops = inner

    return undo


def record(model, rec: LayerRecorder, hidden: list[np.ndarray], fn, keep: bool = False) -> list[np.ndarray]:
    """Run ``fn`` on every hidden state while ``rec`` (reset first) records the matrix inputs; ``fn``'s outputs when
    ``keep`` (else an empty list: e.g. a head's logits need not be held)."""
    rec.reset()
    undo = observe(model, rec)
    out = []
    try:
        for h in hidden:
            rec.begin_call()
            y = fn(h)
            if keep:
                out.append(y)
    finally:
        undo()
    return out
