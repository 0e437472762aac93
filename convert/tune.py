"""``lowbit tune IN.lowbit -o OUT.lowbit --calib FILE``: quantization-aware tuning of an already quantized model.

The codes stay as they are; each quantized matrix of the decoder blocks learns its group scales (and mins) by
distillation from the float model, block by block, as mlx-lm's DWQ and OmniQuant's block reconstruction do:

1. the calibration text runs through the float model (the teacher: the checkpoint the file was converted from) and
   through the quantized model as tuned so far (the student);
2. for each block, Adam fits ``scale = s0 * exp(a)`` and ``min = m0 + b * s0`` per group (``a = b = 0`` at the
   start: the stored file) so that the block, fed the *student's* hidden states, gives the *teacher's* outputs
   (mean squared error) — so each block also makes up for what the blocks before it lost;
3. a quarter of the sequences (every fourth, when there are four or more) is held out: a block whose held-out error
   the fit did not lower keeps its stored scales (the fit only learned the training sequences);
4. the student's hidden states move on through the tuned block.

The result is a .lowbit file of the same types and codes, so the runtime needs nothing new. Gradients come from
PyTorch (``pip install 'lowbit[tune]'``): a block's backward pass by hand in numpy would be much more code for the same
arithmetic. ``time_budget`` seconds bound the whole run: after the first block's timing, each block gets as many
steps as the remaining time allows (at most ``steps``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lowbit.convert.calibration import file_tokens
from lowbit.convert.progress import stage
from lowbit.errors import LowbitError
from lowbit.formats.reader import Container
from lowbit.formats.tokenizer import Tokenizer
from lowbit.formats.writer import ContainerWriter, TensorPlan
from lowbit.kernels.ref import dequantize

log = logging.getLogger(__name__)

FAMILIES = ("llama", "qwen2", "qwen3")
FIRST_STEPS = 3  # steps timed on the first block to size the others to the time budget
WRITE_SECONDS = 5.0  # kept from the end-to-end stage's time for writing the file


@dataclass
class TuneOptions:
    calib: str
    teacher: str | None = None  # the float checkpoint; None: the file's provenance source
    samples: int = 32
    seq_len: int = 256
    batch: int = 8
    steps: int = 64  # most steps per block
    lr: float = 5e-3
    time_budget: float = 600.0  # seconds for the whole run
    threads: int | None = None
    e2e_share: float = 1.0  # share of time_budget for the end-to-end stage (convert/tune_e2e.py) after the blocks
    e2e_samples: int = 512  # its calibration sequences (every eighth held out) ...
    e2e_len: int = 128  # ... of this many tokens
    e2e_batch: int = 4
    e2e_lr: float = 1e-3


@dataclass
class TuneReport:
    seconds: float = 0.0
    steps: list[int] = field(default_factory=list)  # per block
    loss_before: list[float] = field(default_factory=list)  # per block: the mean squared error untuned / tuned
    loss_after: list[float] = field(default_factory=list)
    kept: list[bool] = field(default_factory=list)  # per block: the tuned scales were kept (held-out error lower)
    e2e_steps: int = 0  # the end-to-end stage: Adam steps, held-out KL before and after, whether it was kept
    e2e_kl: tuple[float, float] | None = None
    e2e_kept: bool = False


def _need_torch():
    try:
        import torch
    except ImportError:
        raise LowbitError("lowbit tune needs PyTorch: pip install 'lowbit[tune]'") from None
    return torch


def teacher_weights(source: str, family, args) -> dict[str, np.ndarray]:
    """The float checkpoint's tensors by canonical name, as float32."""
    from lowbit.convert.gguf_source import GGUFSource, is_gguf
    from lowbit.convert.source import Checkpoint, resolve_source, to_f32

    path = Path(source).expanduser()
    if is_gguf(path):
        src = GGUFSource(path)
        names = {c: c for c in src.names()}
    else:
        src = Checkpoint(resolve_source(source))
        names = {c: h for h in src.names() if (c := family.sanitize(h)) is not None}
    try:
        missing = [n for n in family.expected_tensors(args) if n not in names]
        if missing:
            raise LowbitError(f"teacher {source}: missing {missing[0]} (not the model this file was converted from?)")
        return {c: to_f32(*src.raw(h)) for c, h in names.items()}
    finally:
        src.close()


def _block_weights(c: Container, teacher: dict, i: int, quant: bool):
    from lowbit.convert.tune_model import LINEARS, QuantLinear

    out = {}
    prefix = f"blk.{i}."
    for name in c.tensor_names:
        if not name.startswith(prefix) or name.rsplit(".", 1)[-1] not in ("weight", "bias"):
            continue
        short = name[len(prefix) :].removesuffix(".weight")
        t = c.tensor(name)
        if not quant:
            out[short] = teacher[name]
        elif short in LINEARS and not t.qtype.is_float:
            out[short] = QuantLinear(t.parts, t.qtype, t.shape)
        else:
            out[short] = dequantize(t.parts, t.qtype, t.shape)  # float tensors as float32 too
    return out


def tune(src: str | Path, out: str | Path, opts: TuneOptions, progress: bool = True) -> TuneReport:
    torch = _need_torch()
    from lowbit.convert.tune_model import Block, QuantLinear
    from lowbit.models import FAMILIES as MODEL_FAMILIES
    from lowbit.models.common import rope_attention_factor, rope_inv_freq, rope_tables

    t0 = time.perf_counter()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    report = TuneReport()
    with Container(src) as c:
        meta = c.meta
        fam = meta["architecture"]["family"]
        if fam not in FAMILIES:
            raise LowbitError(f"lowbit tune supports the {', '.join(FAMILIES)} families; this model is {fam!r}")
        family = MODEL_FAMILIES[fam]
        args = family.ModelArgs.from_dict(meta["architecture"]["args"])
        if args.sliding_window:
            raise LowbitError("lowbit tune does not handle sliding attention windows yet")
        if any(n.rsplit(".", 1)[-1] in ("had", "lr_a", "lr_b") for n in c.tensor_names):
            raise LowbitError("lowbit tune does not handle Hadamard-rotated or low-rank-corrected files yet")
        from lowbit.convert.tune_model import LINEARS

        if not any(n.startswith("blk.") and n.split(".")[2] in LINEARS and not c.tensor(n).qtype.is_float
                   for n in c.tensor_names):  # fmt: skip
            raise LowbitError("nothing to tune: the file's block matrices are not quantized")
        teacher_src = opts.teacher or meta.get("provenance", {}).get("source")
        if not teacher_src:
            raise LowbitError("no teacher: pass --teacher, the float checkpoint this file was converted from")
        teacher = teacher_weights(teacher_src, family, args)
        for name in c.tensor_names:
            if name in teacher and tuple(teacher[name].shape) != tuple(c.tensor_shape(name)):
                raise LowbitError(f"teacher {teacher_src}: {name} is {teacher[name].shape}, the file's "
                                  f"{c.tensor_shape(name)} (not the model this file was converted from?)")
        tok = Tokenizer(meta["tokenizer"], c.blobs())
        tokens = np.stack(file_tokens(opts.calib, tok, opts.samples, opts.seq_len))
        order = np.arange(len(tokens))
        held = order[3::4] if len(tokens) >= 4 else order[:0]  # every fourth sequence: the held-out check
        train = np.setdiff1d(order, held)
        inv = rope_inv_freq(args.rotary_dim or args.head_dim, args.rope_theta, args.rope_scaling, opts.seq_len)
        cos, sin = rope_tables(inv, opts.seq_len, rope_attention_factor(args.rope_scaling))  # what the runtime uses
        emb = c.tensor("token_embd.weight")
        x_s = torch.from_numpy(dequantize(emb.parts, emb.qtype, emb.shape)[tokens])
        x_t = torch.from_numpy(teacher["token_embd.weight"][tokens])
        tuned: dict[str, dict[str, np.ndarray]] = {}
        n_layers = args.num_hidden_layers
        e2e_seconds = opts.time_budget * opts.e2e_share
        clock = Budget(opts, n_layers, t0, len(tokens), opts.time_budget - e2e_seconds)
        students = []
        blocks = range(n_layers) if opts.e2e_share < 1 else range(0)
        bar = stage("tune", n_layers, "block", progress, blocks)
        for i in bar:
            start = time.perf_counter()
            with torch.no_grad():
                y_t = Block(args, _block_weights(c, teacher, i, quant=False), cos, sin)(x_t)
            student = Block(args, _block_weights(c, teacher, i, quant=True), cos, sin)
            report.loss_before.append(_mse(torch, student, x_s[train], y_t[train], opts.batch))
            held_before = _mse(torch, student, x_s[held], y_t[held], opts.batch) if len(held) else 0.0
            done, step_seconds = _fit(torch, student, x_s[train], y_t[train], clock.steps(i), opts, i, clock)
            report.steps.append(done)
            keep = not len(held) or _mse(torch, student, x_s[held], y_t[held], opts.batch) < held_before
            if not keep:  # back to the stored scales: every parameter starts at zero
                with torch.no_grad():
                    for prm in student.parameters():
                        prm.zero_()
            report.kept.append(bool(keep and done))
            report.loss_after.append(_mse(torch, student, x_s[train], y_t[train], opts.batch))
            bar.set_postfix_str(f"mse {report.loss_before[-1]:.3g} -> {report.loss_after[-1]:.3g}", refresh=False)
            for short, mod in student.quant.items():
                if isinstance(mod, QuantLinear) and report.kept[-1]:
                    tuned[f"blk.{i}.{short}.weight"] = mod.stored()
            with torch.no_grad():
                x_s = torch.cat([student(x_s[j : j + opts.batch]) for j in range(0, len(x_s), opts.batch)])
            x_t = y_t
            students.append(student)
            clock.observe(done, step_seconds, time.perf_counter() - start)
        if e2e_seconds > 0:
            left = opts.time_budget - (time.perf_counter() - t0)
            tuned.update(_end_to_end(torch, c, teacher, args, tok, students, opts, max(left, 0.0), report))
        report.seconds = time.perf_counter() - t0
        _write(c, out, tuned, opts, report)
    return report


class Budget:
    """Steps per block that keep the run within ``opts.time_budget``, from the step and per-block times measured as
    the run goes (the first block is sized after its first :data:`FIRST_STEPS` steps)."""

    def __init__(self, opts: TuneOptions, n_layers: int, t0: float, n_seqs: int, seconds: float):
        self.opts, self.n, self.t0, self.seconds = opts, n_layers, t0, seconds
        self.per_step: float | None = None
        self.overhead: float | None = None  # seconds per block outside the steps (forward passes over every sequence)
        self.passes = -(-n_seqs // opts.batch)

    def steps(self, i: int) -> int:
        if self.per_step is None:
            return self.opts.steps
        left = self.seconds - (time.perf_counter() - self.t0)
        per_block = left / max(self.n - i, 1) - (self.overhead or 0.0)
        return max(0, min(self.opts.steps, int(per_block / self.per_step)))

    def first_steps(self, per_step: float) -> int:
        """Steps for the first block once its first steps are timed."""
        self.per_step = per_step
        self.overhead = 1.5 * self.passes * per_step  # four forward passes over every batch, ~1/3 step each
        steps = max(FIRST_STEPS, self.steps(0))
        log.info("tune: %.2f s per step; about %d steps per block for the %.0f s budget", per_step, steps,
                 self.seconds)
        return steps

    def observe(self, done: int, step_seconds: float, block_seconds: float) -> None:
        if done:
            self.per_step = step_seconds / done  # as the machine is now (it may be shared)
        self.overhead = block_seconds - step_seconds


def _end_to_end(torch, c: Container, teacher: dict, args, tok, students: list, opts: TuneOptions, seconds: float,
                report: TuneReport) -> dict[str, dict[str, np.ndarray]]:
    """convert/tune_e2e.py's stage on the blocks as the block stage left them (the stored ones where it did not run):
    the tuned tensors' stored parts, or {} where the held-out KL did not go down (then the block stage's stand)."""
    from lowbit.convert import tune_e2e
    from lowbit.convert.tune_model import Block, QuantLinear
    from lowbit.models.common import rope_attention_factor, rope_inv_freq, rope_tables

    start = time.perf_counter()
    inv = rope_inv_freq(args.rotary_dim or args.head_dim, args.rope_theta, args.rope_scaling, opts.e2e_len)
    cos, sin = rope_tables(inv, opts.e2e_len, rope_attention_factor(args.rope_scaling))
    n = args.num_hidden_layers
    sblocks = [Block(args, _block_weights(c, teacher, i, quant=True), cos, sin) for i in range(n)]
    with torch.no_grad():
        for sb, tuned_block in zip(sblocks, students):  # the block stage's scales and mins
            for p, q in zip(sb.parameters(), tuned_block.parameters(), strict=True):
                p.copy_(q)
    tblocks = [Block(args, _block_weights(c, teacher, i, quant=False), cos, sin) for i in range(n)]

    def matrix(name: str):
        t = c.tensor(name)
        return (torch.from_numpy(dequantize(t.parts, t.qtype, t.shape)) if t.qtype.is_float
                else QuantLinear(t.parts, t.qtype, t.shape))

    norm = c.tensor("output_norm.weight")
    untied = "output.weight" in c.tensor_names
    fnorm = dequantize(norm.parts, norm.qtype, norm.shape)
    student = tune_e2e.Model(torch, sblocks, matrix("token_embd.weight"), fnorm, args.rms_norm_eps,
                             matrix("output.weight") if untied else None)
    t_head = torch.from_numpy(teacher["output.weight"]) if untied else None
    teacher_m = tune_e2e.Model(torch, tblocks, torch.from_numpy(teacher["token_embd.weight"]),
                               teacher["output_norm.weight"], args.rms_norm_eps, t_head)
    tokens = np.stack(file_tokens(opts.calib, tok, opts.e2e_samples, opts.e2e_len))
    held = np.arange(len(tokens)) % 8 == 7 if len(tokens) >= 8 else np.zeros(len(tokens), bool)
    saved = [p.detach().clone() for p in student.parameters()]
    seconds -= time.perf_counter() - start + WRITE_SECONDS  # what building the models took, and the write after
    steps, before, after = tune_e2e.fit(torch, teacher_m, student, tokens[~held], tokens[held], seconds,
                                        opts.e2e_lr, opts.e2e_batch)
    report.e2e_steps, report.e2e_kl = steps, (before, after)
    report.e2e_kept = bool(steps and after < before)
    log.info("tune e2e: %d steps; held-out KL %.4f -> %.4f%s", steps, before, after,
             "" if report.e2e_kept else " (not lower: the block stage's scales stay)")
    if not report.e2e_kept:
        with torch.no_grad():
            for p, v in zip(student.parameters(), saved):
                p.copy_(v)
        return {}
    out = {}
    for i, b in enumerate(sblocks):
        for short, mod in b.quant.items():
            out[f"blk.{i}.{short}.weight"] = mod.stored()
    for name, mod in (("token_embd.weight", student.embed), ("output.weight", student.head)):
        if isinstance(mod, QuantLinear):
            out[name] = mod.stored()
    return out


def _fit(torch, student, x_s, y_t, steps: int, opts: TuneOptions, seed: int, clock: Budget) -> tuple[int, float]:
    """Adam on the block's scales and mins: (steps done, seconds they took)."""
    params = [p for p in student.parameters() if p.requires_grad]
    if not params or not steps:
        return 0, 0.0
    opt = torch.optim.Adam(params, lr=opts.lr)
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    done = 0
    while done < steps:
        idx = torch.from_numpy(rng.choice(len(x_s), size=min(opts.batch, len(x_s)), replace=False))
        loss = torch.nn.functional.mse_loss(student(x_s[idx]), y_t[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        done += 1
        if clock.per_step is None and done == FIRST_STEPS:
            steps = clock.first_steps((time.perf_counter() - t) / FIRST_STEPS)
    return done, time.perf_counter() - t


def _mse(torch, block, x, y, batch: int) -> float:
    with torch.no_grad():
        total = sum(float(((block(x[j : j + batch]) - y[j : j + batch]) ** 2).sum()) for j in range(0, len(x), batch))
    return total / y.numel()


def _write(c: Container, out, tuned: dict, opts: TuneOptions, report: TuneReport) -> None:
    meta = {k: v for k, v in c.meta.items() if k not in ("format", "tensors", "blobs")}
    meta["quantization"] = {**meta.get("quantization", {}), "tuned": {
        "method": "block-wise distillation of group scales and mins (codes kept)",
        "calib": Path(opts.calib).name, "samples": opts.samples, "length": opts.seq_len,
        "steps_per_block": report.steps, "blocks_kept": report.kept,
        "end_to_end": {"steps": report.e2e_steps, "kept": report.e2e_kept,
                       "heldout_kl": [round(v, 5) for v in report.e2e_kl] if report.e2e_kl else None},
        "seconds": round(report.seconds, 1)}}  # fmt: skip
    plans = [TensorPlan(n, c.tensor(n).qtype, c.tensor_shape(n)) for n in c.tensor_names]
    with ContainerWriter(out, meta, plans, c.blobs()) as w:
        for p in plans:
            parts = dict(c.tensor(p.name).parts)
            parts.update(tuned.get(p.name, {}))
            w.write_tensor(p.name, parts)
