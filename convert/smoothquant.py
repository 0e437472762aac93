"""SmoothQuant (Xiao et al., 2023) and static activation scales, for int8 activations (``--act-quant``).

Per-token int8 activations lose most where a few input channels carry outliers many times larger than the rest.
SmoothQuant moves that range into the weights with the same exact rescaling AWQ uses (``y = (x / s) (W diag(s))ᵀ``,
the division folded into the norm or linear that produces ``x``; :mod:`lowbit.convert.awq` has the folding), with

    s_j = max|X_j|^α / max|W_j|^(1−α)          (α = 0.5; both maxima floored at 1e-5)

where ``max|X_j|`` is the largest magnitude of input channel ``j`` over every calibration token and ``max|W_j|`` the
largest magnitude in column ``j`` over all the linears that share the input (q/k/v, gate/up). The ``v → o`` pair
uses AWQ's GQA tie (the geometric mean over the query heads sharing a kv head), ``up → down`` divides up's rows.
Groups whose consumers stay float (mixed precision) and a tied lm_head are not migrated. In float the migration is
exact: only the rounding of weights and activations sees it.

Static scales: for every linear the converter stores ``<name>.act_scale = max|x| / 127`` over all calibration
inputs after migration (computed exactly from the per-channel maxima: ``max_j max|X_j| / s_j``). The maximum, not a
percentile: it needs no row store, never clips the rare large values (LLM activations have a few, often on the
first token, that the model depends on), and SmoothQuant has already flattened the channels that made the range wide.
Measured on refsmall (README, "Int8 activations"): static KL 0.0062 with migration, 0.028 without.
"""

from __future__ import annotations

import logging

import numpy as np

from lowbit.convert import awq
from lowbit.convert.calibration import LayerRecorder

log = logging.getLogger(__name__)

ALPHA = 0.5  # migration strength: 0 keeps activations as they are, 1 moves all their range into the weights
FLOOR = 1e-5  # maxima below this are raised to it (dead channels, zero columns)
QMAX = 127.0


class ChannelMaxRecorder(LayerRecorder):
    """A :class:`LayerRecorder` that also keeps the per-channel ``max|x|`` of every distinct input over all rows."""

    def reset(self) -> None:
        super().reset()
        self.absmax: dict[str, np.ndarray] = {}

    def observe(self, name: str, x: np.ndarray) -> None:
        super().observe(name, x)
        if self.key(name) != name:  # the same input as an earlier linear of this call (q/k/v, gate/up)
            return
        m = np.abs(np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])).max(axis=0)
        prev = self.absmax.get(name)
        self.absmax[name] = m if prev is None else np.maximum(prev, m)

    def channel_max(self, name: str) -> np.ndarray:
        return self.absmax[self.key(name)]


def smoothing_scales(x_max: np.ndarray, weights: list[np.ndarray], alpha: float = ALPHA) -> np.ndarray:
    """``s_j = max|X_j|^alpha / max_i max|W_i[:, j]|^(1 - alpha)`` (float32 ``[cols]``)."""
    w_max = np.max([np.abs(w).max(axis=0) for w in weights], axis=0).astype(np.float64)
    x = np.maximum(np.asarray(x_max, dtype=np.float64), FLOOR)
    s = x**alpha / np.maximum(w_max, FLOOR) ** (1.0 - alpha)
    return s.astype(np.float32)


def static_scale(x_max: np.ndarray, s: np.ndarray | None = None) -> float:
    """The per-tensor int8 scale ``max|x / s| / 127`` from per-channel maxima (never zero)."""
    m = np.asarray(x_max, dtype=np.float64)
    if s is not None:
        m = m / s.astype(np.float64)
    return float(max(m.max(initial=0.0) / QMAX, float(np.finfo(np.float32).tiny)))


def migrate_layer(pipe, prefix: str, names: list[str], rec: ChannelMaxRecorder, norm_groups) -> dict[str, np.ndarray]:
    """Migrate every input group of one layer (folding into ``pipe.store``), record each linear's static activation
    scale in ``pipe.act_scales``; returns linear -> s (its input became x / s), like the pipeline's AWQ step."""
    found: dict[str, np.ndarray] = {}
    groups = [(src, [c for c in cons if c in names]) for src, cons in norm_groups]
    groups = [(src, cons) for src, cons in groups if cons and all(c in names for c in cons)]
    if "ffn_up" in names and "ffn_down" in names:
        groups.append(("ffn_up", ["ffn_down"]))
    if "attn_v" in names and "attn_output" in names:
        groups.append(("attn_v", ["attn_output"]))
    arrays = pipe.store.arrays
    a = pipe.args
    heads = dict(n_heads=a.num_attention_heads, n_kv_heads=a.num_key_value_heads, head_dim=a.head_dim)
    for src, cons in groups:
        cnames = [f"{prefix}{c}.weight" for c in cons]
        if any(pipe.qtypes[n].is_float for n in cnames):
            continue  # a float consumer's scaled columns would not be written back
        s = smoothing_scales(rec.channel_max(cnames[0]), [arrays[n] for n in cnames])
        src_name = f"{prefix}{src}.weight"
        if src == "attn_v":
            s = awq.tie_gqa(s, **heads)
            bias_name = f"{prefix}attn_v.bias"
            fold = awq.fold_v_into_o(arrays[src_name], s, v_bias=arrays.get(bias_name), **heads)
            arrays[src_name] = fold.v_weight.astype(np.float32)
            if fold.v_bias is not None:
                pipe.floats[bias_name] = arrays[bias_name] = fold.v_bias.astype(np.float32)
            s = fold.o_scale
        elif src.endswith("norm"):
            new = awq.fold_into_norm(arrays[src_name], s, offset=pipe.model.NORM_OFFSET)
            pipe.floats[src_name] = arrays[src_name] = new.astype(np.float32)
        else:
            bias_name = f"{prefix}{src}.bias"
            w, b = awq.fold_into_rows(arrays[src_name], s, arrays.get(bias_name))
            arrays[src_name] = w.astype(np.float32)
            if b is not None:
                pipe.floats[bias_name] = arrays[bias_name] = b.astype(np.float32)
        for c, n in zip(cons, cnames):
            arrays[n] = awq.scale_columns(arrays[n], s).astype(np.float32)
            found[c] = s
    for c in names:
        name = f"{prefix}{c}.weight"
        pipe.act_scales[name] = static_scale(rec.channel_max(name), found.get(c))
    log.debug("smoothquant %s: %d groups migrated", prefix, len({id(s) for s in found.values()}))
    return found


def migrate_head(pipe, name: str, rec: ChannelMaxRecorder) -> np.ndarray | None:
    """Migrate the lm_head's input into the final norm (not for a tied or float lm_head), record its static scale;
    returns s or None."""
    x_max = rec.channel_max(name)
    s = None
    arrays = pipe.store.arrays
    if name == "output.weight" and not pipe.qtypes[name].is_float:
        s = smoothing_scales(x_max, [arrays[name]])
        new = awq.fold_into_norm(arrays["output_norm.weight"], s, offset=pipe.model.NORM_OFFSET)
        pipe.floats["output_norm.weight"] = arrays["output_norm.weight"] = new.astype(np.float32)
        arrays[name] = awq.scale_columns(arrays[name], s).astype(np.float32)
    pipe.act_scales[name] = static_scale(x_max, s)
    return s

