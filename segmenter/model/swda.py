"""Sliding-window dilated attention (SWDA, DilateFormer) with one dilation.

Every query pixel attends to the ``k x k`` keys around it sampled ``r`` pixels apart. Border semantics (both
implementations): keys and values are zero-padded, so a window position outside the map takes part in the
softmax with score 0 and contributes a zero value, exactly as DilateFormer's ``nn.Unfold`` reference does.

``swda_reference`` materialises the ``k^2`` shifted copies of K and V with ``F.unfold`` (as DilateFormer does);
``swda`` walks the ``k^2`` offsets over one padded K and V, holding one shifted product at a time, and its
custom backward recomputes the shifts instead of saving them, so neither pass stores ``k^2`` copies. On CUDA
both passes are compiled (inductor) so the ``k^2`` offsets become a few fused kernels instead of many launches.
Tensors are ``(B, heads, head_dim, H, W)``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def _offsets(kernel: int, dilation: int) -> list[tuple[int, int]]:
    half = kernel // 2
    return [(dy * dilation, dx * dilation) for dy in range(-half, half + 1) for dx in range(-half, half + 1)]


def _window(padded: torch.Tensor, pad: int, dy: int, dx: int, height: int, width: int) -> torch.Tensor:
    """The view of a padded map shifted by (dy, dx): ``out[..., y, x] = map[..., y + dy, x + dx]``."""
    return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def swda_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: int = 3, dilation: int = 1
) -> torch.Tensor:
    """DilateFormer's formulation with ``F.unfold`` (k^2 copies of K and V); the test oracle."""
    batch, heads, dim, height, width = q.shape
    pad = dilation * (kernel // 2)

    def unfold(t: torch.Tensor) -> torch.Tensor:
        cols = F.unfold(t.reshape(batch, heads * dim, height, width), kernel, dilation=dilation, padding=pad)
        return cols.reshape(batch, heads, dim, kernel * kernel, height, width)

    scores = (q.unsqueeze(3) * unfold(k)).sum(2) * dim**-0.5  # (B, h, k^2, H, W)
    attention = scores.softmax(dim=2)
    return (attention.unsqueeze(2) * unfold(v)).sum(3)


def _shift_into(values: torch.Tensor, pad: int, dy: int, dx: int) -> torch.Tensor:
    """``values`` placed in the padded frame at the window offset (dy, dx): the adjoint of ``_window``."""
    return F.pad(values, (pad + dx, pad - dx, pad + dy, pad - dy))


def _forward_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: int, dilation: int):
    height, width = q.shape[-2:]
    pad = dilation * (kernel // 2)
    offsets = _offsets(kernel, dilation)
    k_pad = F.pad(k, (pad, pad, pad, pad))
    v_pad = F.pad(v, (pad, pad, pad, pad))
    scores = torch.stack([(q * _window(k_pad, pad, dy, dx, height, width)).sum(2) for dy, dx in offsets], dim=2)
    attention = (scores * q.shape[2] ** -0.5).softmax(dim=2)
    out = sum(
        attention[:, :, index].unsqueeze(2) * _window(v_pad, pad, dy, dx, height, width)
        for index, (dy, dx) in enumerate(offsets)
    )
    return out, attention


def _backward_math(grad_out, saved: tuple[torch.Tensor, ...], kernel: int, dilation: int):
    """Gradients of q, k and v from the forward's saved ``(q, k, v, attention)``, walking the same offsets."""
    q, k, v, attention = saved
    height, width = q.shape[-2:]
    pad = dilation * (kernel // 2)
    offsets = _offsets(kernel, dilation)
    k_pad = F.pad(k, (pad, pad, pad, pad))
    v_pad = F.pad(v, (pad, pad, pad, pad))
    grad_attention = torch.stack(
        [(grad_out * _window(v_pad, pad, dy, dx, height, width)).sum(2) for dy, dx in offsets], dim=2
    )
    # softmax backward: dS = A * (dA - sum(A * dA)), then the 1/sqrt(d) scale
    grad_scores = attention * (grad_attention - (attention * grad_attention).sum(2, keepdim=True)) * q.shape[2] ** -0.5
    grad_q = sum(
        grad_scores[:, :, i].unsqueeze(2) * _window(k_pad, pad, dy, dx, height, width)
        for i, (dy, dx) in enumerate(offsets)
    )
    grad_k_pad = sum(
        _shift_into(grad_scores[:, :, i].unsqueeze(2) * q, pad, dy, dx) for i, (dy, dx) in enumerate(offsets)
    )
    grad_v_pad = sum(
        _shift_into(attention[:, :, i].unsqueeze(2) * grad_out, pad, dy, dx) for i, (dy, dx) in enumerate(offsets)
    )
    crop = (..., slice(pad, pad + height), slice(pad, pad + width))
    return grad_q, grad_k_pad[crop], grad_v_pad[crop]


_COMPILED: dict[str, object] = {}


def _implementation(name: str, tensor: torch.Tensor):
    """On CUDA the offset loop is compiled into fused kernels (one launch instead of dozens; no k^2 copies
    either way); elsewhere, or with ``MPERS_SWDA_COMPILE=0``, it runs eagerly."""
    function = _forward_math if name == "forward" else _backward_math
    if not tensor.is_cuda or os.environ.get("MPERS_SWDA_COMPILE", "1") == "0":
        return function
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(function, dynamic=False)
    return _COMPILED[name]


class _SlidingDilatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kernel: int, dilation: int):
        out, attention = _implementation("forward", q)(q, k, v, kernel, dilation)
        ctx.save_for_backward(q, k, v, attention)
        ctx.kernel, ctx.dilation = kernel, dilation
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        grads = _implementation("backward", saved[0])(grad_out.contiguous(), saved, ctx.kernel, ctx.dilation)
        return (*grads, None, None)


def swda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: int = 3, dilation: int = 1) -> torch.Tensor:
    """Sliding-window dilated attention without ``k^2`` copies of K and V (same semantics as the reference)."""
    if kernel % 2 != 1:
        raise ValueError(f"kernel must be odd, got {kernel}")
    return _SlidingDilatedAttention.apply(q, k, v, kernel, dilation)
