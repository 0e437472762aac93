"""The llama-family decoder block in PyTorch, for ``lowbit tune``: autograd through a block whose quantized weights
are ``scale * code - min`` with learnable scales and mins (codes fixed).

It computes what models/llama.py computes (RMSNorm, q/k/v with optional biases, qwen3's per-head q/k norms, RoPE on
halves of each head, grouped-query causal attention, SwiGLU), in float32, for whole sequences ``[batch, T, hidden]``.
tests/test_tune.py checks it against lowbit's own forward pass.
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.formats import scale_codes
from lowbit.formats.qtypes import QType, unpack_codes

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


class QuantLinear(torch.nn.Module):
    """``W = d * u - m`` per group (symmetric types: ``m = d * zero point``), ``d = d0 * exp(a)``,
    ``m = m0 + b * d0``; ``a`` and ``b`` start at zero, so the untuned layer is the stored one exactly."""

    def __init__(self, parts: dict[str, np.ndarray], qt: QType, shape: tuple[int, int]):
        super().__init__()
        rows, cols = shape
        self.qt, self.shape = qt, shape
        self.group = qt.layout_group(cols)
        ng = cols // self.group
        u = unpack_codes(np.asarray(parts["codes"]), qt, cols).astype(np.float32).reshape(rows, ng, self.group)
        self.register_buffer("u", torch.from_numpy(u))
        # a coded-scale type learns its decoded values; stored() puts them back on the matrix's grid
        self.grid = np.asarray(parts["grid"], np.float32) if qt.coded_scales else None
        scales, mins = scale_codes.decode_parts(parts, qt) if qt.coded_scales else (parts["scales"], parts.get("mins"))
        d0 = np.asarray(scales, dtype=np.float32)
        m0 = np.asarray(mins, dtype=np.float32) if qt.asym else d0 * np.float32(qt.zero_point)
        self.register_buffer("d0", torch.from_numpy(d0.copy()))
        self.register_buffer("m0", torch.from_numpy(m0.copy()))
        # one parameter per stored scale: [rows, ng], or [1, 1] for a per-tensor type (broadcast over the rows)
        self.a = torch.nn.Parameter(torch.zeros(d0.shape))
        self.b = torch.nn.Parameter(torch.zeros(d0.shape)) if qt.asym else None

    def scales_mins(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.d0 * torch.exp(self.a)
        m = self.m0 + self.b * self.d0 if self.b is not None else d * float(self.qt.zero_point)
        return d, m

    def weight(self) -> torch.Tensor:
        d, m = self.scales_mins()
        return (d[:, :, None] * self.u - m[:, :, None]).reshape(self.shape)

    def stored(self) -> dict[str, np.ndarray]:
        """The tuned scales (and mins) as the container stores them: float16, or a coded-scale type's nearest codes on
        its grid (the grid itself is kept)."""
        with torch.no_grad():
            d, m = self.scales_mins()
        if self.grid is not None:
            sc, mc = scale_codes.encode(d.numpy(), m.numpy() if self.qt.asym else None, self.grid, self.qt)
            return {"scales": sc, **({"mins": mc} if self.qt.asym else {})}
        out = {"scales": d.numpy().astype(np.float16)}
        if self.qt.asym:
            out["mins"] = m.numpy().astype(np.float16)
        return out


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: int) -> torch.Tensor:
    """RoPE on the first ``rot`` dims of each head (halves rotated, as transformers' rotate_half); x [B, H, T, D],
    ``cos``/``sin`` [T, rot] (models/common.py's half tables, repeated for both halves)."""
    xr, rest = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    return torch.cat([xr * cos + rotated * sin, rest], dim=-1)


class Block(torch.nn.Module):
    """One decoder layer. ``weights``: canonical short name (``attn_q``, ``attn_norm``, ``attn_q.bias``, ...) ->
    a float array, or a :class:`QuantLinear` for the tuned matrices; ``cos``/``sin``: the runtime's rope tables
    ``[T, rotated dims / 2]`` (models/common.py's ``rope_tables``)."""

    def __init__(self, args, weights: dict, cos: np.ndarray, sin: np.ndarray):
        super().__init__()
        self.args = args
        self.quant = torch.nn.ModuleDict({k: v for k, v in weights.items() if isinstance(v, QuantLinear)})
        for k, v in weights.items():
            if not isinstance(v, QuantLinear):
                self.register_buffer(k.replace(".", "_"), torch.from_numpy(np.array(v, dtype=np.float32)))
        self.register_buffer("cos", torch.from_numpy(np.concatenate([cos, cos], axis=1)))  # both halves
        self.register_buffer("sin", torch.from_numpy(np.concatenate([sin, sin], axis=1)))

    def _w(self, name: str) -> torch.Tensor:
        return self.quant[name].weight() if name in self.quant else getattr(self, name)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ self._w(name).T
        bias = getattr(self, f"{name}_bias", None)
        return y if bias is None else y + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.args
        bsz, t, _ = x.shape
        heads, kv, hd = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        h = rms_norm(x, self.attn_norm, a.rms_norm_eps)
        q = self._linear(h, "attn_q").view(bsz, t, heads, hd).transpose(1, 2)
        k = self._linear(h, "attn_k").view(bsz, t, kv, hd).transpose(1, 2)
        v = self._linear(h, "attn_v").view(bsz, t, kv, hd).transpose(1, 2)
        if hasattr(self, "attn_q_norm"):
            q = rms_norm(q, self.attn_q_norm, a.rms_norm_eps)
            k = rms_norm(k, self.attn_k_norm, a.rms_norm_eps)
        rot = a.rotary_dim or hd
        cos, sin = self.cos[:t], self.sin[:t]
        q, k = _rope(q, cos, sin, rot), _rope(k, cos, sin, rot)
        k = k.repeat_interleave(heads // kv, dim=1)
        v = v.repeat_interleave(heads // kv, dim=1)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self._linear(att.transpose(1, 2).reshape(bsz, t, heads * hd), "attn_output")
        h = rms_norm(x, self.ffn_norm, a.rms_norm_eps)
        gate = torch.nn.functional.silu(self._linear(h, "ffn_gate"))
        return x + self._linear(gate * self._linear(h, "ffn_up"), "ffn_down")
