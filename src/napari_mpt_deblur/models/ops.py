"""Token operations of the MPT network on ``(B, H, W, C)`` feature maps.

Inside a stage, feature maps are kept as ``(B, H, W, C)`` "token" tensors: every
per-pixel projection is then one GEMM over contiguous memory, and the 3x3
convolutions see the same memory as a channels-last ``(B, C, H, W)`` view, so
no layout copies are made between them. These helpers hold the few ways the
network touches that memory: layout views, projections, gathers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def to_nchw(tokens: Tensor) -> Tensor:
    """(B, H, W, C) -> (B, C, H, W) view with channels-last memory (no copy)."""
    return tokens.permute(0, 3, 1, 2)


def to_tokens(image: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H, W, C), contiguous (no copy when the image is channels-last)."""
    return image.permute(0, 2, 3, 1).contiguous()


def depthwise_conv3x3(tokens: Tensor, weight: Tensor) -> Tensor:
    """3x3 depthwise convolution (zero padding 1) of a (B, H, W, C) map."""
    return to_tokens(F.conv2d(to_nchw(tokens), weight, padding=1, groups=tokens.shape[-1]))


def pointwise(tokens: Tensor, weight: Tensor) -> Tensor:
    """F.linear(tokens, weight) for a (B, H, W, C) map, as a 1x1 convolution on the channels-last view.

    Same result; on CPU it runs through oneDNN, which beat the BLAS GEMM behind
    F.linear on the widening projections here (by up to 40 %; 3-4 % end to end).
    """
    return to_tokens(F.conv2d(to_nchw(tokens), weight[:, :, None, None]))


def pointwise_depthwise(
    tokens: Tensor, weight: Tensor, dw_weight: Tensor, rows: slice, norm: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """depthwise_conv3x3(pointwise(norm(tokens), weight), dw_weight)[:, rows] of a (B, H, W, C) map.

    Only the rows asked for (and the one above and below that the 3x3 kernel
    reads) are normalised and projected.
    """
    height = tokens.shape[1]
    first, stop = max(rows.start - 1, 0), min(rows.stop + 1, height)
    tokens = tokens[:, first:stop]
    hidden = pointwise(tokens if norm is None else norm(tokens), weight)
    return depthwise_conv3x3(hidden, dw_weight)[:, rows.start - first : rows.stop - first]


def project_add(residual: Tensor, tokens: Tensor, weight: Tensor) -> Tensor:
    """residual + F.linear(tokens, weight).

    The sum is added in place into the fresh projection: on CPU this beat
    ``addmm``'s fused addition, which first copies the residual into its output.
    """
    tokens = tokens.view(*residual.shape[:-1], tokens.shape[-1])
    return pointwise(tokens, weight).add_(residual)


def inference_only(t: Tensor) -> bool:
    """Whether ``t`` may be overwritten in place: no gradient will be asked of it."""
    return not (torch.is_grad_enabled() and t.requires_grad)


def gather_tokens(tokens: Tensor, order: Tensor) -> Tensor:
    """(B, N, C) -> (B, len(order), C): every sample's tokens taken in ``order``.

    A row gather over the flattened (B*N, C) matrix: several times faster on CPU
    than ``index_select`` along dim 1 of the 3-D tensor.
    """
    b, n, c = tokens.shape
    return tokens.reshape(b * n, c).index_select(0, batch_rows(order, b, n)).view(b, -1, c)


def batch_rows(order: Tensor, b: int, n: int) -> Tensor:
    """Rows ``order`` of every sample of a (B*N, C) matrix, sample after sample."""
    return order if b == 1 else (order + n * torch.arange(b, device=order.device)[:, None]).flatten()


def stack(tensors: list[Tensor], dim: int) -> Tensor:
    """torch.stack that makes no copy of a single tensor."""
    return tensors[0].unsqueeze(dim) if len(tensors) == 1 else torch.stack(tensors, dim=dim)
