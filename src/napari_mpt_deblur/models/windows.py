"""CSWA's window layouts and shift masks, written once on maps of pixel numbers.

A layout (window partitions, cyclic shifts and, for the ``official`` pairing,
the group images) is run once per map size on a map of pixel numbers, and kept
as index tensors (:class:`WindowLayout`); the forward pass applies each
reordering as one gather. The masks of shifted windows (:class:`ShiftMask`)
are kept for the windows that need them alone. Both are cached per size and
shared by every block with the same scale and pairing.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

MASK_VALUE = -100.0  # Swin's additive mask between tokens of different shift regions


def window_partition(tokens: Tensor, ws: int) -> Tensor:
    """(B, H, W, C) -> (B, nW, ws*ws, C), windows in raster order."""
    b, h, w, c = tokens.shape
    x = tokens.reshape(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // ws) * (w // ws), ws * ws, c)


def window_reverse(windows: Tensor, ws: int, h: int, w: int) -> Tensor:
    """(B, nW, ws*ws, C) in raster order -> (B, H, W, C)."""
    b, _, _, c = windows.shape
    x = windows.reshape(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def group_by_pooled_window(full_map: Tensor, stride: int, ws: int) -> Tensor:
    """Aligned pairing: an (H, W) map's values ordered (pooled window, s*s*ws*ws tokens).

    Full window (I*s + a, J*s + b) belongs to pooled window (I, J); its tokens are
    ordered (a, b, u, v).
    """
    h, w = full_map.shape
    grouped = full_map.reshape(h // (stride * ws), stride, ws, w // (stride * ws), stride, ws)
    return grouped.permute(0, 3, 1, 4, 2, 5).reshape(-1, stride * stride * ws * ws)


def shift_region_labels(h: int, w: int, ws: int, shift: int, device: torch.device) -> Tensor:
    """Swin's region id of every pixel of an (h, w) map rolled by -shift (9 regions)."""
    labels = torch.zeros(h, w, dtype=torch.int64, device=device)
    spans = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    region = 0
    for rows in spans:
        for cols in spans:
            labels[rows, cols] = region
            region += 1
    return labels


def relative_position_index(ws: int) -> Tensor:
    """Swin's (ws*ws, ws*ws) index into the (2*ws-1)^2 bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (ws - 1)
    return rel[0] * (2 * ws - 1) + rel[1]


# --------------------------------------------------------------------------- layouts


class WindowLayout(NamedTuple):
    """Token orders of one CSWA layout, as indices for ``index_select`` over flattened maps."""

    query_groups: Tensor | None
    """Official pairing at s > 1 only: full map -> s^2 group images (their 3x3 conv runs there)."""
    queries: Tensor
    """(group) map -> queries ordered (pooled window, s^2*64 tokens), shift included."""
    keys: Tensor
    """Pooled map -> keys ordered (pooled window, 64 tokens), shift included."""
    output: Tensor
    """Attention output in query order -> full map, shift back included."""
    output_rows: Tensor
    """The inverse of ``output``: the map row of every attention output row."""


@functools.lru_cache(maxsize=256)
def window_layout(
    h: int, w: int, stride: int, ws: int, shifted: bool, pairing: str, device: torch.device
) -> WindowLayout:
    """The token orders of CSWA on an (h, w) map, built once per size.

    Each order is found by running the layout on a map of pixel numbers, so the
    layout is written once, readably, here, and applied as one gather each.
    """
    with torch.inference_mode(False):  # cached tensors must also serve autograd later
        return _window_layout(h, w, stride, ws, shifted, pairing, device)


def _window_layout(h: int, w: int, s: int, ws: int, shifted: bool, pairing: str, device: torch.device) -> WindowLayout:
    hp, wp = h // s, w // s

    def numbered(height: int, width: int, count: int = 1) -> Tensor:
        return torch.arange(count * height * width, device=device).view(count, height, width, 1)

    def shift(numbers: Tensor, offset: int) -> Tensor:
        return torch.roll(numbers, shifts=(offset, offset), dims=(1, 2))

    keys = numbered(hp, wp)
    if shifted:
        keys = shift(keys, -ws // 2)
    keys = window_partition(keys, ws).flatten()

    if pairing == "official":
        # Reference layout: the raster-ordered full windows are cut into s^2 consecutive
        # groups, each laid out as its own (H/s, W/s) image; window m = g*nWp + p then
        # pairs with pooled window m // s^2. Outputs go back to their true raster place.
        full_windows = window_partition(numbered(h, w), ws).reshape(s * s, -1, ws * ws, 1)
        query_groups = window_reverse(full_windows, ws, hp, wp).flatten() if s > 1 else None  # s=1: identity
        queries = numbered(hp, wp, s * s)
        if shifted:
            queries = shift(queries, -ws // 2)
        queries = window_partition(queries, ws).flatten()
        output = window_reverse(numbered(h * w // ws**2, ws * ws).view(1, -1, ws * ws, 1), ws, h, w)
        if shifted:
            output = shift(output, ws // 2)
        output = output.flatten()
        return WindowLayout(query_groups, queries, keys, output, torch.argsort(output))

    # Aligned: each full window reads the pooled window covering it; the full map
    # shifts by s*ws/2, the same physical offset as the pooled map's ws/2.
    full = numbered(h, w)
    if shifted:
        full = shift(full, -s * ws // 2)
    queries = group_by_pooled_window(full[0, :, :, 0], s, ws).flatten()
    output = torch.argsort(queries)  # the output returns every token to where its query came from
    return WindowLayout(None, queries, keys, output, queries)


# --------------------------------------------------------------------------- masks


class ShiftMask(NamedTuple):
    """Swin's additive mask, kept only for the pooled windows that need it."""

    windows: Tensor
    """Indices of the pooled windows whose tokens span several shift regions."""
    values: Tensor
    """(len(windows), s*s*ws*ws, ws*ws): -100 between query and key tokens of different regions, else 0."""

    def restricted_to(self, windows: slice) -> ShiftMask:
        """The mask of the pooled windows ``windows`` alone, numbered from ``windows.start``."""
        inside = (self.windows >= windows.start) & (self.windows < windows.stop)
        return ShiftMask(self.windows[inside] - windows.start, self.values[inside])


@functools.lru_cache(maxsize=64)
def shift_mask(hp: int, wp: int, stride: int, ws: int, pairing: str, device: torch.device) -> ShiftMask:
    """The mask of shifted windows on a pooled map of (hp, wp).

    After the cyclic shift only the last row and column of windows mix regions,
    so the mask is stored for those alone: (hp/ws + wp/ws - 1) windows, not all.
    Built once per size and shared by every block with the same scale and pairing.
    """
    with torch.inference_mode(False):  # cached tensors must also serve autograd later
        return _shift_mask(hp, wp, stride, ws, pairing, device)


def _shift_mask(hp: int, wp: int, s: int, ws: int, pairing: str, device: torch.device) -> ShiftMask:
    pooled = shift_region_labels(hp, wp, ws, ws // 2, device)
    key_labels = window_partition(pooled[None, :, :, None], ws)[0, :, :, 0]  # (nWp, 64)
    if pairing == "official":
        # The query window reuses its pooled window's mask row for row.
        query_labels = key_labels.repeat(1, s * s)
    else:
        # A query token belongs to the region of the pooled pixel containing it.
        query_labels = group_by_pooled_window(pooled.repeat_interleave(s, 0).repeat_interleave(s, 1), s, ws)
    different = query_labels[:, :, None] != key_labels[:, None, :]
    windows = different.flatten(1).any(dim=1).nonzero().flatten()
    return ShiftMask(windows, different[windows].float() * MASK_VALUE)
