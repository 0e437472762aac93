"""The end-to-end stage of ``lowbit tune``: every quantized matrix's group scales and mins (the tied embedding / lm_head
included) learn together from the KL divergence between the float model's next-token distribution and the
quantized model's, over whole sequences — the objective that matters, where the block stage fits each block's
outputs (mlx-lm's DWQ distils the logits this way).

Each step draws a batch of calibration sequences, runs the teacher (no gradients) and the student, and takes one
Adam step on ``KL(teacher || student)`` averaged over the tokens. Held-out sequences decide whether the result is
kept, as in the block stage.
"""

from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger(__name__)


class Model:
    """A llama-family model in PyTorch from blocks (convert/tune_model.Block), an embedding (a float tensor or a
    QuantLinear, tied to the lm_head when there is no separate head), the final norm and the head."""

    def __init__(self, torch, blocks: list, embed, norm: np.ndarray, eps: float, head=None):
        self.torch, self.blocks, self.embed, self.head = torch, blocks, embed, head
        self.norm = torch.from_numpy(np.array(norm, dtype=np.float32))
        self.eps = eps

    def _matrix(self, w):
        return w.weight() if hasattr(w, "weight") and callable(w.weight) else w

    def logits(self, tokens):
        from lowbit.convert.tune_model import rms_norm

        emb = self._matrix(self.embed)
        x = emb[tokens]
        for b in self.blocks:
            x = b(x)
        x = rms_norm(x, self.norm, self.eps)
        return x @ (emb if self.head is None else self._matrix(self.head)).T

    def parameters(self) -> list:
        mods = [*self.blocks, *(m for m in (self.embed, self.head) if hasattr(m, "parameters"))]
        return [p for m in mods for p in m.parameters() if p.requires_grad]


def kl_mean(torch, teacher_logits, student_logits):
    """Mean over tokens of KL(teacher || student), in nats."""
    lt = torch.log_softmax(teacher_logits, dim=-1)
    ls = torch.log_softmax(student_logits, dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


def evaluate(torch, teacher: Model, student: Model, tokens: np.ndarray, batch: int) -> float:
    with torch.no_grad():
        total = 0.0
        for j in range(0, len(tokens), batch):
            t = torch.from_numpy(tokens[j : j + batch])
            total += float(kl_mean(torch, teacher.logits(t), student.logits(t))) * len(t)
    return total / max(len(tokens), 1)


def fit(torch, teacher: Model, student: Model, train: np.ndarray, held: np.ndarray, seconds: float, lr: float,
        batch: int, seed: int = 0) -> tuple[int, float, float]:
    """Adam on the student's scales and mins, the held-out evaluations before and after included, within about
    ``seconds``: (steps, held-out KL before, after). The caller restores the stored scales when the held-out KL did
    not go down."""
    params = student.parameters()
    t0 = time.perf_counter()
    before = evaluate(torch, teacher, student, held, batch)
    room = seconds - 2 * (time.perf_counter() - t0)  # the evaluation after takes as long as the one before
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    steps = 0
    while time.perf_counter() - t0 < room:
        idx = rng.choice(len(train), size=min(batch, len(train)), replace=False)
        t = torch.from_numpy(train[idx])
        with torch.no_grad():
            target = teacher.logits(t)
        loss = kl_mean(torch, target, student.logits(t))
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        if steps % 10 == 0:
            log.info("tune e2e: step %d, %.0f s, train KL %.4f", steps, time.perf_counter() - t0, loss.item())
    after = evaluate(torch, teacher, student, held, batch)
    return steps, before, after
