"""CPU strip execution: wide maps a strip of rows at a time, attention a chunk of windows at a time.

Large maps do not fit in a CPU's caches, so every operation on them streams
from memory. Computed strip by strip, each strip is still in cache when the next
operation reads it. The network asks here how to split a map
(:func:`row_strips`, :func:`window_chunks`) and puts the strips back together
(:func:`assemble_rows`); on a GPU, under autograd and for small maps the answer
is always one piece, so the same code computes whole maps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

STRIP_BYTES = 4 * 2**20
"""Bytes of one strip of a wide map (see :func:`cache_sized_ranges`): a share of a CPU's L3 cache."""

MIN_STRIPS = 2
"""Maps smaller than this many strips are computed whole: splitting them gains nothing."""


def cache_sized_ranges(length: int, total_bytes: int, like: Tensor, min_length: int = 1) -> list[slice]:
    """Split ``length`` rows (or windows) whose maps take ``total_bytes`` into strips of about STRIP_BYTES.

    Large maps do not fit in a CPU's caches, so every operation on them streams
    from memory. Computed strip by strip, each strip is still in cache when the
    next operation reads it: at level 1 of a 256x256 plane ISCA and the FEFN
    get up to a quarter faster (less when other processes fill the shared
    cache), and maps of 32 MB and more (larger planes), which glibc would map
    and fault in afresh on every allocation, are never allocated.
    On a GPU, under autograd (training keeps the whole maps anyway) and for
    maps under MIN_STRIPS strips the whole range is one strip.
    """
    if like.device.type != "cpu" or torch.is_grad_enabled() or total_bytes < MIN_STRIPS * STRIP_BYTES:
        return [slice(0, length)]
    count = min(-(-total_bytes // STRIP_BYTES), max(1, length // min_length))
    size = -(-length // count)  # equal strips, the last one perhaps shorter
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


def row_strips(tokens: Tensor, channels: int) -> list[slice]:
    """Row ranges for computing ``channels``-wide maps of a (B, H, W, *) map (at least 8 rows each)."""
    b, height, width, _ = tokens.shape
    return cache_sized_ranges(height, b * height * width * channels * tokens.element_size(), tokens, min_length=8)


def window_chunks(tokens: Tensor, n_windows: int, logits_per_window: int) -> list[slice]:
    """Ranges of pooled windows for CSWA's attention, so that the logits of one head stay in cache."""
    return cache_sized_ranges(n_windows, n_windows * logits_per_window * tokens.element_size(), tokens)


def assemble_rows(strips: list[slice], compute: Callable[[slice], Tensor]) -> Tensor:
    """The (B, H, W, C) map whose rows ``strip`` are ``compute(strip)``, for every strip."""
    if len(strips) == 1:
        return compute(strips[0])
    out = None
    for strip in strips:
        part = compute(strip)
        if out is None:
            out = part.new_empty(part.shape[0], strips[-1].stop, *part.shape[2:])
        out[:, strip].copy_(part)
    return out
