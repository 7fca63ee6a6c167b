"""The Multi-Pyramid Transformer (MPT) for defocus deblurring.

One module, top to bottom: helpers, the two attentions (ISCA and CSWA), the
FEFN feed-forward, the pyramid sub-block, and the U-shaped network.
``docs/architecture.md`` maps each part to the paper and lists where the
computation departs from the reference code.

Inside a stage, feature maps are kept as ``(B, H, W, C)`` "token" tensors: every
per-pixel projection is then one GEMM over contiguous memory, and the 3x3
convolutions see the same memory as a channels-last ``(B, C, H, W)`` view, so
no layout copies are made between them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MPTConfig

MASK_VALUE = -100.0  # Swin's additive mask between tokens of different shift regions


# --------------------------------------------------------------------------- helpers


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


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Reflect-pad the bottom/right of (B, C, H, W) up to multiples of ``multiple``.

    Reflection needs a pad smaller than the side, so small images are reflected
    repeatedly (a mirror of the mirror) until the size is reached.
    """
    while True:
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % multiple, (-w) % multiple
        if not pad_h and not pad_w:
            return x
        step_h, step_w = min(pad_h, h - 1), min(pad_w, w - 1)
        if (pad_h and step_h < 1) or (pad_w and step_w < 1):  # a 1-pixel side cannot reflect
            return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        x = F.pad(x, (0, step_w, 0, step_h), mode="reflect")


# --------------------------------------------------------------------------- attention


class IntraScaleChannelAttention(nn.Module):
    """ISCA: transposed (channel) attention over the whole map of a level.

    Q and K are L2-normalised over the H*W axis; each head forms a (C/heads)^2
    attention map. The map is global, so the output depends on the tile size.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads))
        self.to_qkv = nn.Parameter(torch.empty(3 * dim, dim))  # rows: Q (C), K (C), V (C)
        self.qkv_dwconv = nn.Parameter(torch.empty(3 * dim, 1, 3, 3))
        self.project_out = nn.Parameter(torch.empty(dim, dim))

    def forward(self, y: Tensor, residual: Tensor) -> Tensor:
        """residual + ISCA(y), both (B, H, W, C)."""
        b, h, w, c = y.shape
        heads, d = self.heads, c // self.heads
        strips = row_strips(y, 2 * c)
        # A whole map gets Q, K and V in one projection; in strips, V waits for pass 2.
        first_rows = 3 * c if len(strips) == 1 else 2 * c
        to_first, first_dwconv = self.to_qkv[:first_rows], self.qkv_dwconv[:first_rows]
        # Pass 1, strip by strip: Q^T K and the squared norms of Q's and K's channels.
        # Normalising Q and K over H*W only rescales rows/columns of Q^T K, so the
        # small (d x d) product is rescaled instead of the two full maps.
        squares = y.new_zeros(b, 2 * c)
        products = y.new_zeros(b, heads, d, d)
        for strip in strips:
            first = pointwise_depthwise(y, to_first, first_dwconv, strip).reshape(b, -1, first_rows)
            n = first.shape[1]
            squares = squares + first[..., : 2 * c].square().sum(dim=1)  # Q and K in one pass
            qh = first[..., :c].reshape(b, n, heads, d).permute(0, 2, 3, 1)  # (B, heads, d, n)
            kh = first[..., c : 2 * c].reshape(b, n, heads, d).permute(0, 2, 1, 3)  # (B, heads, n, d)
            products = products + qh @ kh
        # clamp before the root: sqrt's gradient at 0 is infinite, and 0 * inf made every gradient NaN
        # for a constant (blank) patch; the values are those of max(norm, 1e-12), as F.normalize's
        norms = squares.clamp_min(1e-24).sqrt()
        q_norm = norms[:, :c].reshape(b, heads, d, 1)
        k_norm = norms[:, c:].reshape(b, heads, 1, d)
        attn = (products / (q_norm * k_norm) * self.temperature.view(1, -1, 1, 1)).softmax(dim=-1)
        # out = project_out(attn @ V) == V @ (project_out @ blockdiag(attn))^T: one GEMM on the map.
        mixing = torch.zeros(b, c, c, dtype=attn.dtype, device=attn.device)
        for head in range(heads):
            rows = slice(head * d, (head + 1) * d)
            mixing[:, rows, rows] = attn[:, head]
        mixing = self.project_out @ mixing

        def mix_values(strip: slice) -> Tensor:  # pass 2
            if len(strips) == 1:
                v = first[..., 2 * c :]
            else:
                v = pointwise_depthwise(y, self.to_qkv[2 * c :], self.qkv_dwconv[2 * c :], strip)
            part = residual[:, strip]
            if b == 1:
                return project_add(part, v, mixing[0])
            return torch.baddbmm(part.reshape(b, -1, c), v.reshape(b, -1, c), mixing.transpose(1, 2)).view(part.shape)

        return assemble_rows(strips, mix_values)


class CrossScaleWindowAttention(nn.Module):
    """CSWA at scale r: full-resolution windows attend to windows of a pooled map.

    Each 8x8 query window reads one 8x8 window of the map pooled by s = 1/r, so
    its keys cover an (8s x 8s) region. ``pairing`` decides which pooled window a
    query window reads (see ``docs/architecture.md``). All s^2 query windows that
    share a pooled window are batched into one attention call of s^2*64 queries
    against 64 keys.
    """

    def __init__(self, dim: int, heads: int, scale: float, window_size: int, shifted: bool, pairing: str) -> None:
        super().__init__()
        self.heads = heads
        self.stride = int(round(1 / scale))  # s
        self.window_size = window_size
        self.shifted = shifted
        self.pairing = pairing
        self.temperature = nn.Parameter(torch.ones(heads))
        self.to_q = nn.Parameter(torch.empty(dim, dim))
        self.q_dwconv = nn.Parameter(torch.empty(dim, 1, 3, 3))
        self.to_kv = nn.Parameter(torch.empty(2 * dim, dim))
        self.kv_dwconv = nn.Parameter(torch.empty(2 * dim, 1, 3, 3))
        self.pool_proj = nn.Parameter(torch.empty(dim, dim)) if self.stride > 1 else None
        self.project_out = nn.Parameter(torch.empty(dim, dim))
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)

    def _shift_mask(self, hp: int, wp: int, device: torch.device) -> ShiftMask | None:
        """The shifted layout's mask (None when not shifted)."""
        if not self.shifted:
            return None
        return shift_mask(hp, wp, self.stride, self.window_size, self.pairing, device)

    def _position_bias(self) -> Tensor:
        """(heads, ws*ws, ws*ws): Swin's relative position bias of one window."""
        n = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.heads).permute(2, 0, 1)

    def forward(self, y: Tensor, residual: Tensor) -> Tensor:
        """residual + CSWA(y), both (B, H, W, C)."""
        b, h, w, c = y.shape
        s, ws = self.stride, self.window_size
        hp, wp = h // s, w // s

        layout = window_layout(h, w, s, ws, self.shifted, self.pairing, y.device)
        n_queries = s * s * ws * ws  # per pooled window

        def query_order(windows: slice) -> Tensor:
            """The tokens that the queries of pooled windows ``windows`` are taken from, in order."""
            return layout.queries[windows.start * n_queries : windows.stop * n_queries]

        if s == 1:
            # Q, K and V come from the same map in the same token order: one
            # projection, one depthwise conv and one gather serve all three.
            to_qkv, qkv_dwconv = torch.cat([self.to_q, self.to_kv]), torch.cat([self.q_dwconv, self.kv_dwconv])
            qkv = assemble_rows(row_strips(y, 3 * c), lambda rows: pointwise_depthwise(y, to_qkv, qkv_dwconv, rows))
            qkv = qkv.reshape(b, h * w, 3 * c)

            def gather_windows(windows: slice) -> tuple[Tensor, Tensor]:
                tokens = gather_tokens(qkv, query_order(windows))
                return tokens.split([c, 2 * c], dim=-1)
        else:
            pooled = F.avg_pool2d(to_nchw(y), kernel_size=s, stride=s).permute(0, 2, 3, 1)
            pooled = pooled + pointwise(pooled, self.pool_proj)
            kv = depthwise_conv3x3(pointwise(pooled, self.to_kv), self.kv_dwconv)
            kv = gather_tokens(kv.reshape(b, hp * wp, 2 * c), layout.keys)
            if layout.query_groups is None:  # aligned: the 3x3 conv runs on the map itself
                q = assemble_rows(row_strips(y, c), lambda rows: pointwise_depthwise(y, self.to_q, self.q_dwconv, rows))
                q = q.reshape(b, h * w, c)

                def chunk_queries(windows: slice) -> Tensor:
                    return gather_tokens(q, query_order(windows))
            else:  # official: on the s^2 group images, only on those that a chunk of windows reads
                tokens, group_pixels, group_windows = y.reshape(b, h * w, c), hp * wp, hp * wp // ws**2

                def chunk_queries(windows: slice) -> Tensor:
                    # Query window m = g * group_windows + p reads pooled window m // s^2.
                    first = windows.start * s * s // group_windows
                    stop = -(-windows.stop * s * s // group_windows)
                    groups = gather_tokens(tokens, layout.query_groups[first * group_pixels : stop * group_pixels])
                    groups = groups.view(b * (stop - first), hp, wp, c)
                    q = depthwise_conv3x3(pointwise(groups, self.to_q), self.q_dwconv).reshape(b, -1, c)
                    order = query_order(windows)
                    return gather_tokens(q, order - first * group_pixels)

            def gather_windows(windows: slice) -> tuple[Tensor, Tensor]:
                return chunk_queries(windows), kv[:, windows.start * ws * ws : windows.stop * ws * ws]

        bias = self._position_bias().repeat(1, s * s, 1)  # every query sub-window uses the window's bias
        mask = self._shift_mask(hp, wp, y.device)

        def attend_projected(windows: slice, windows_mask: ShiftMask | None) -> Tensor:
            """project_out(attention) of pooled windows ``windows``, (B, tokens, C) in query order.

            The projection is per token, so it runs here, on outputs still in cache,
            before they are put back in map order.
            """
            attended = self._attend(*gather_windows(windows), bias, windows_mask)
            return pointwise(attended.unsqueeze(2), self.project_out).view(attended.shape)

        chunks = window_chunks(y, hp * wp // ws**2, n_queries * ws * ws)
        if len(chunks) == 1:
            out = gather_tokens(attend_projected(chunks[0], mask), layout.output)
        else:
            # Each chunk's logits stay in cache; its outputs go straight to their place in the map.
            out = y.new_empty(b * h * w, c)
            for windows in chunks:
                rows = batch_rows(layout.output_rows[windows.start * n_queries : windows.stop * n_queries], b, h * w)
                chunk_mask = mask.restricted_to(windows) if mask is not None else None
                out.index_copy_(0, rows, attend_projected(windows, chunk_mask).reshape(-1, c))
        return out.view(residual.shape).add_(residual)

    def _attend(self, q: Tensor, kv: Tensor, bias: Tensor, mask: ShiftMask | None) -> Tensor:
        """Cosine attention in n pooled windows: (B, n*s^2*64, C) queries, (B, n*64, 2C) keys and values.

        ``bias`` is (heads, s^2*64, 64), the relative position bias of every query sub-window.
        """
        b, c = q.shape[0], q.shape[-1]
        heads, ws, s = self.heads, self.window_size, self.stride
        d = c // heads
        n_windows = kv.shape[1] // (ws * ws)
        # Unit q and k per head, the temperature folded into q's scale.
        q = q.view(b, n_windows, s * s * ws * ws, heads, d)
        k, v = kv.reshape(b, n_windows, ws * ws, 2, heads, d).unbind(dim=3)
        q = q * (self.temperature.view(heads, 1) / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(1e-12))
        k = k / torch.linalg.vector_norm(k, dim=-1, keepdim=True).clamp_min(1e-12)
        per_sample = []
        for sample in range(b):
            per_head = []
            for head in range(heads):
                # The bias enters the logits GEMM as its addend: one pass fewer than adding it after.
                logits = torch.baddbmm(bias[head], q[sample, :, :, head], k[sample, :, :, head].transpose(1, 2))
                if mask is not None:  # only the windows on the wrap-around border hold masked pairs
                    logits.index_add_(0, mask.windows, mask.values.to(logits.dtype))
                if inference_only(logits):
                    attention = torch.softmax(logits, dim=-1, out=logits)
                else:
                    attention = logits.softmax(dim=-1)
                per_head.append(torch.bmm(attention, v[sample, :, :, head]))
            per_sample.append(stack(per_head, dim=2))
        return stack(per_sample, dim=0).view(b, -1, c)  # (B, n*s^2*64, C)


def window_chunks(tokens: Tensor, n_windows: int, logits_per_window: int) -> list[slice]:
    """Ranges of pooled windows for CSWA's attention, so that the logits of one head stay in cache."""
    return cache_sized_ranges(n_windows, n_windows * logits_per_window * tokens.element_size(), tokens)


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


# --------------------------------------------------------------------------- block


class FrequencyEnhancedFFN(nn.Module):
    """FEFN: the channel-context branch is activated and gates the spatial branch."""

    def __init__(self, dim: int, expansion: float) -> None:
        super().__init__()
        hidden = int(dim * expansion)
        self.context_in = nn.Parameter(torch.empty(hidden, dim))
        self.context_dwconv = nn.Parameter(torch.empty(hidden, 1, 3, 3))
        self.spatial_in = nn.Parameter(torch.empty(hidden, dim))
        self.project_out = nn.Parameter(torch.empty(dim, hidden))

    def forward(self, x0: Tensor, x1: Tensor, norm0: nn.Module, norm1: nn.Module) -> Tensor:
        """x0 + FEFN(norm0(x0), norm1(x1)), all (B, H, W, C).

        The norms are applied here, strip by strip with the rest, so that their
        outputs are never written out whole.
        """

        def compute(strip: slice) -> Tensor:
            hidden = pointwise_depthwise(x0, self.context_in, self.context_dwconv, strip, norm=norm0)
            gate = pointwise(norm1(x1[:, strip]), self.spatial_in)
            if inference_only(hidden):  # reuse the wide hidden map instead of allocating two more
                gated = torch.ops.aten.gelu_(hidden).mul_(gate)
            else:
                gated = F.gelu(hidden) * gate
            return project_add(x0[:, strip], gated, self.project_out)

        return assemble_rows(row_strips(x0, self.context_in.shape[0]), compute)


class PyramidSubBlock(nn.Module):
    """x0 = x + ISCA(LN1 x); x1 = x + CSWA_r(LN1 x); out = x0 + FEFN(LN2a x0, LN2b x1)."""

    def __init__(
        self, dim: int, heads: int, scale: float, window_size: int, shifted: bool, expansion: float, pairing: str
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.isca = IntraScaleChannelAttention(dim, heads)
        self.cswa = CrossScaleWindowAttention(dim, heads, scale, window_size, shifted, pairing)
        self.norm2a = nn.LayerNorm(dim, eps=1e-5)
        self.norm2b = nn.LayerNorm(dim, eps=1e-5)
        self.ffn = FrequencyEnhancedFFN(dim, expansion)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        x0 = self.isca(y, residual=x)
        x1 = self.cswa(y, residual=x)
        return self.ffn(x0, x1, self.norm2a, self.norm2b)


class Stage(nn.Sequential):
    """The blocks of one level; block i uses shifted windows when i is odd."""

    def __init__(self, dim: int, heads: int, scales: tuple[float, ...], config: MPTConfig) -> None:
        super().__init__(
            *(
                PyramidSubBlock(dim, heads, r, config.window_size, i % 2 == 1, config.ffn_expansion, config.pairing)
                for i, r in enumerate(scales)
            )
        )


class Downsample(nn.Module):
    """conv3x3 w -> w/2, then PixelUnshuffle(2): width doubles, size halves."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim // 2, 3, padding=1, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        return to_tokens(F.pixel_unshuffle(self.conv(to_nchw(tokens)), 2))


class Upsample(nn.Module):
    """conv3x3 w -> 2w, then PixelShuffle(2): width halves, size doubles."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim * 2, 3, padding=1, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        return to_tokens(F.pixel_shuffle(self.conv(to_nchw(tokens)), 2))


# --------------------------------------------------------------------------- network


class MPT(nn.Module):
    """Multi-Pyramid Transformer: a 4-level U-shape of pyramid sub-blocks.

    Maps (B, in_channels, H, W) float images to the same shape. Any H and W are
    accepted: the input is reflect-padded to ``config.size_multiple`` and the
    output cropped back, in :meth:`forward` only.
    """

    def __init__(self, config: MPTConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.dim * 2**level for level in range(4)]
        self.stem = nn.Conv2d(config.in_channels, config.dim, 3, padding=1, bias=False)
        self.encoders = nn.ModuleList(
            Stage(widths[level], config.heads[level], config.scales[level], config) for level in range(3)
        )
        self.downsamples = nn.ModuleList(Downsample(widths[level]) for level in range(3))
        self.latent = Stage(widths[3], config.heads[3], config.scales[3], config)
        # Deepest first: upsamples[0] goes from the latent to level 3.
        self.upsamples = nn.ModuleList(Upsample(widths[level]) for level in (3, 2, 1))
        self.decoders = nn.ModuleList(
            Stage(widths[level], config.heads[level], config.scales[level], config) for level in (2, 1, 0)
        )
        self.head = nn.Conv2d(config.dim, config.out_channels, 3, padding=1, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise like the reference code: PyTorch's defaults for convs/linears."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()
        for name, param in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            is_projection = param.dim() == 2 and leaf != "relative_position_bias_table"
            if is_projection or leaf.endswith("dwconv"):
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected a (B, {self.config.in_channels}, H, W) tensor, got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        x = pad_to_multiple(x, self.config.size_multiple)
        skips = []
        features = to_tokens(self.stem(x))
        for encoder, downsample in zip(self.encoders, self.downsamples):
            features = encoder(features)
            skips.append(features)
            features = downsample(features)
        features = self.latent(features)
        for upsample, decoder, skip in zip(self.upsamples, self.decoders, reversed(skips)):
            features = decoder(upsample(features) + skip)
        out = self.head(to_nchw(features)) + x
        return out[..., :height, :width].contiguous(memory_format=torch.contiguous_format)
